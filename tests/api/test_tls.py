"""Own TLS (Mode A): real Hypercorn with trustme certificates; reload by swapping files."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from anyio.streams.tls import TLSAttribute

from api.app import create_app
from api.serve import ServePlan, serve
from api.settings import ApiSettings
from api.tls import CertManager
from flowengine.engine import FlowEngine

from .conftest import TOKEN

pytestmark = pytest.mark.anyio

NAME = "host.tailnet-name.ts.net"


@pytest.fixture(name="ca")
def _ca() -> trustme.CA:
    return trustme.CA()


def write_pair(cert: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    """Like `tailscale cert`: temp file then rename, so each write is a new inode."""
    for path, blob in (
        (key_file, cert.private_key_pem.bytes()),
        (cert_file, b"".join(b.bytes() for b in cert.cert_chain_pems)),
    ):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def peer_certificate(port: int, ca: trustme.CA) -> bytes:
    """DER of the certificate a fresh TLS handshake with the server presents."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    stream = await anyio.connect_tcp(
        "127.0.0.1", port, tls=True, ssl_context=context, tls_hostname=NAME
    )
    async with stream:
        peer = stream.extra(TLSAttribute.peer_certificate_binary)
    assert peer is not None
    return peer


@asynccontextmanager
async def tls_server(
    engine: FlowEngine, certs: CertManager, **settings_kwargs: Any
) -> AsyncIterator[ServePlan]:
    settings = ApiSettings(
        mode="tls", host="127.0.0.1", port=0, public_name=NAME, api_token=TOKEN, **settings_kwargs
    )
    app = create_app(engine, settings=settings)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        plan = await tg.start(
            partial(serve, app, settings, shutdown_trigger=stop.wait, certs=certs)
        )
        try:
            yield plan
        finally:
            stop.set()


async def test_second_handshake_sees_the_new_certificate(
    engine: FlowEngine, ca: trustme.CA, tmp_path: Path
) -> None:
    first, second = ca.issue_cert(NAME), ca.issue_cert(NAME)
    assert der(first) != der(second)
    cert_file, key_file = tmp_path / f"{NAME}.crt", tmp_path / f"{NAME}.key"
    write_pair(first, cert_file, key_file)
    certs = CertManager(cert_file, key_file)
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with tls_server(engine, certs, cert_check_interval=3600) as plan:
        assert await peer_certificate(plan.port, ca) == der(first)
        async with httpx.AsyncClient(verify=trust) as kept:
            before = await kept.get(
                f"https://127.0.0.1:{plan.port}/healthz",
                extensions={"sni_hostname": NAME},
            )
            assert before.status_code == 200
            assert not certs.reload_if_changed()  # nothing changed yet
            write_pair(second, cert_file, key_file)
            assert certs.reload_if_changed()
            assert certs.reloads == 1
            assert await peer_certificate(plan.port, ca) == der(second)
            # the connection opened before the swap keeps working
            after = await kept.get(
                f"https://127.0.0.1:{plan.port}/healthz",
                extensions={"sni_hostname": NAME},
            )
            assert after.status_code == 200


async def test_watch_loop_picks_up_renewed_files(
    engine: FlowEngine, ca: trustme.CA, tmp_path: Path
) -> None:
    first, second = ca.issue_cert(NAME), ca.issue_cert(NAME)
    cert_file, key_file = tmp_path / "c.crt", tmp_path / "c.key"
    write_pair(first, cert_file, key_file)
    certs = CertManager(cert_file, key_file)
    async with tls_server(engine, certs, cert_check_interval=0.05) as plan:
        assert await peer_certificate(plan.port, ca) == der(first)
        write_pair(second, cert_file, key_file)
        with anyio.fail_after(30):
            while await peer_certificate(plan.port, ca) != der(second):
                await anyio.sleep(0.05)
    assert certs.reloads == 1


async def test_a_mismatched_pair_keeps_the_old_certificate(
    engine: FlowEngine, ca: trustme.CA, tmp_path: Path
) -> None:
    first, second = ca.issue_cert(NAME), ca.issue_cert(NAME)
    cert_file, key_file = tmp_path / "c.crt", tmp_path / "c.key"
    write_pair(first, cert_file, key_file)
    certs = CertManager(cert_file, key_file)
    async with tls_server(engine, certs, cert_check_interval=3600) as plan:
        # half-way through a renewal: new certificate, old key
        cert_file.write_bytes(b"".join(b.bytes() for b in second.cert_chain_pems))
        assert not certs.reload_if_changed()
        assert await peer_certificate(plan.port, ca) == der(first)
        write_pair(second, cert_file, key_file)
        assert certs.reload_if_changed()
        assert await peer_certificate(plan.port, ca) == der(second)


def test_unloadable_files_are_a_config_error(tmp_path: Path) -> None:
    from flowengine.errors import ConfigError

    (tmp_path / "c.crt").write_text("not a certificate")
    (tmp_path / "c.key").write_text("not a key")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate pair"):
        CertManager(tmp_path / "c.crt", tmp_path / "c.key")
