"""The real authorization server (npm oidc-provider) for the end-to-end tests.

Started once per session on 127.0.0.1 with a random port: plain HTTP, and a second one over
HTTPS with a private CA (trustme). Skipped, and named in the run's summary, when node or
tests/e2e/oidc/node_modules is missing (``make test`` and ``.ci/run`` run ``npm install``).
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

import pytest
import trustme

from tests.conftest import real_peer_missing

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


@contextmanager
def _running(workdir: Path, *, tls: trustme.CA | None = None) -> Iterator[OidcServer]:
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
        [node, "server.mjs"], cwd=OIDC_DIR, env=env, stdout=subprocess.PIPE, stderr=stderr
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
        yield OidcServer(
            issuer=info["issuer"],
            grant_log=server.grant_log,
            basic_secret=server.basic_secret,
            post_secret=server.post_secret,
            ca_file=ca_file,
        )
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
    with _running(tmp_path_factory.mktemp("oidc")) as server:
        yield server


@pytest.fixture(name="oidc_tls_server", scope="session")
def _oidc_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """oidc-provider over HTTPS as https://localhost:<port>, certified by a private CA."""
    with _running(tmp_path_factory.mktemp("oidc-tls"), tls=trustme.CA()) as server:
        yield server
