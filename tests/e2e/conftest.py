"""The real authorization server (npm oidc-provider) for the end-to-end tests.

Started once per session on 127.0.0.1 with a random port: plain HTTP, and a second one over
HTTPS with a private CA (trustme). Skipped, and named in the run's summary, when node or
tests/e2e/oidc/node_modules is missing (``make test`` and ``.ci/run`` run ``npm install``).

"Connect anything" (issue 13) has its own servers (tests/e2e/oidc/anything.mjs: several
issuers on one origin with registration, resource indicators and the device flow), over
HTTPS with a private CA and over plain HTTP, and a protected resource (resource.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import real_peer_missing

from .resource import ProtectedResource, running_resource

OIDC_DIR = Path(__file__).parent / "oidc"


#: what a client secret may hold (RFC 6749 Appendix A, VSCHAR) and Basic auth must encode
SPECIAL = ":+%/ x"


@dataclass(frozen=True)
class OidcServer:
    issuer: str
    grant_log: Path
    basic_secret: str
    post_secret: str
    ca_file: Path | None = None  # the private CA of an HTTPS server

    def grants(self) -> list[dict[str, object]]:
        """Every token-endpoint request the server saw, oldest first."""
        if not self.grant_log.exists():
            return []
        return [json.loads(line) for line in self.grant_log.read_text().splitlines() if line]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip(real_peer_missing("oidc-provider", "node is not installed (Node.js 20)"))
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.skip(
            real_peer_missing(
                "oidc-provider",
                "tests/e2e/oidc/node_modules is missing: `make test` installs it when npm is"
                " on PATH, or run `npm install` in tests/e2e/oidc",
            )
        )
    return node


@dataclass(frozen=True)
class AnythingServer:
    """tests/e2e/oidc/anything.mjs: issuers ``<origin>/oauth``, ``<origin>/oidc`` (and the
    broken ``/liar`` and ``/downgrade``) with registration, resource indicators, device flow."""

    origin: str
    grant_log: Path
    ca_file: Path | None = None

    def issuer(self, tenant: str) -> str:
        return f"{self.origin}/{tenant}"

    def log(self, event: str | None = None) -> list[dict[str, Any]]:
        """The server's request log, oldest first (one event kind, or all)."""
        if not self.grant_log.exists():
            return []
        entries = [json.loads(line) for line in self.grant_log.read_text().splitlines() if line]
        return [e for e in entries if event is None or e.get("event") == event]

    def control(self, name: str, **values: Any) -> None:
        import httpx

        verify: Any = str(self.ca_file) if self.ca_file else True
        if self.ca_file:
            import ssl

            verify = ssl.create_default_context(cafile=str(self.ca_file))
        with httpx.Client(verify=verify, timeout=30) as client:
            client.post(f"{self.origin}/__test__/{name}", json=values).raise_for_status()


@contextmanager
def oidc_provider(workdir: Path, *, tls: trustme.CA | None = None) -> Iterator[OidcServer]:
    with _node_server(workdir, "server.mjs", tls=tls) as (info, server, ca_file):
        yield OidcServer(
            issuer=info["issuer"],
            grant_log=server.grant_log,
            basic_secret=server.basic_secret,
            post_secret=server.post_secret,
            ca_file=ca_file,
        )


@contextmanager
def _node_server(
    workdir: Path, script: str, *, tls: trustme.CA | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[dict[str, Any], OidcServer, Path | None]]:
    node = _node()
    server = OidcServer(
        issuer="",
        grant_log=workdir / "grants.jsonl",
        # the Basic client's secret holds every character RFC 6749 §2.3.1 must encode
        basic_secret="basic-" + secrets.token_urlsafe(12) + SPECIAL,
        post_secret="post-" + secrets.token_urlsafe(16),
    )
    env = {
        **os.environ,
        "PORT": "0",
        "GRANT_LOG": str(server.grant_log),
        "BASIC_SECRET": server.basic_secret,
        "POST_SECRET": server.post_secret,
        "NODE_NO_WARNINGS": "1",
        **(env or {}),
    }
    ca_file = None
    if tls is not None:
        ca_file = workdir / "ca.pem"
        tls.cert_pem.write_to_path(str(ca_file))
        cert = tls.issue_cert("localhost")
        cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
        env.update(TLS_CERT=str(workdir / "cert.pem"), TLS_KEY=str(workdir / "key.pem"))
    stderr = (workdir / "server.stderr").open("wb")
    proc = subprocess.Popen(
        [node, script], cwd=OIDC_DIR, env=env, stdout=subprocess.PIPE, stderr=stderr
    )
    ready: list[str] = []

    def read_first_line() -> None:
        assert proc.stdout is not None
        ready.append(proc.stdout.readline().decode())

    reader = threading.Thread(target=read_first_line, daemon=True)
    reader.start()
    reader.join(60)
    try:
        if not ready or not ready[0].strip():
            raise RuntimeError(
                "oidc-provider did not start: " + (workdir / "server.stderr").read_text()[-2000:]
            )
        info = json.loads(ready[0])
        yield info, server, ca_file
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        stderr.close()


@pytest.fixture(name="oidc_server", scope="session")
def _oidc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    with oidc_provider(tmp_path_factory.mktemp("oidc")) as server:
        yield server


@pytest.fixture(name="anything_ca", scope="session")
def _anything_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(name="anything_server", scope="session")
def _anything_server(
    tmp_path_factory: pytest.TempPathFactory, anything_ca: trustme.CA
) -> Iterator[AnythingServer]:
    """anything.mjs over HTTPS as https://localhost:<port>, certified by a private CA."""
    workdir = tmp_path_factory.mktemp("anything")
    with _node_server(workdir, "anything.mjs", tls=anything_ca) as (info, server, ca_file):
        yield AnythingServer(origin=info["origin"], grant_log=server.grant_log, ca_file=ca_file)


@pytest.fixture(name="anything_http_server", scope="session")
def _anything_http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnythingServer]:
    """anything.mjs over plain HTTP on 127.0.0.1 (what only the tests' URL policy accepts)."""
    workdir = tmp_path_factory.mktemp("anything-http")
    with _node_server(workdir, "anything.mjs") as (info, server, _):
        yield AnythingServer(origin=info["origin"], grant_log=server.grant_log)


@pytest.fixture(name="protected_resource", scope="session")
def _protected_resource(
    anything_server: AnythingServer, anything_ca: trustme.CA
) -> Iterator[ProtectedResource]:
    assert anything_server.ca_file is not None
    with running_resource(anything_server.origin, anything_ca, anything_server.ca_file) as resource:
        yield resource


@pytest.fixture(name="oidc_tls_server", scope="session")
def _oidc_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """oidc-provider over HTTPS as https://localhost:<port>, certified by a private CA."""
    with oidc_provider(tmp_path_factory.mktemp("oidc-tls"), tls=trustme.CA()) as server:
        yield server
