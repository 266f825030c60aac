"""Kill points against a real authorization server: npm oidc-provider, rotation on.

oidc-provider consumes a refresh token on use and, when a consumed one comes back, revokes
the whole grant (``refresh token already used``): there is no reuse grace. Its token
endpoint is reached through :class:`TokenProxy`, which can hold one answer back after the
server issued it. The client is the real ``agentd token`` command, killed with SIGKILL at
each step (see tests/flowengine/crash_rig.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agentd.config import load_config
from agentd.context import open_context
from flowengine.catalog import load_catalog
from flowengine.states import FlowState
from tests.agentd.cli_helpers import SimServer
from tests.e2e.conftest import OidcServer
from tests.e2e.helpers import CLIENTS, follow_to_redirect
from tests.flowengine.crash_rig import HOLD, REFRESH_POINTS, CrashRig

pytestmark = pytest.mark.slow

PROVIDER = "oidc-post"
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding", "host"}


class TokenProxy:
    """ASGI: forwards every request to the authorization server; holds one answer if armed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.armed = False
        self.holding = threading.Event()
        self.release = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [
            (k.decode(), v.decode()) for k, v in scope["headers"] if k.decode() not in _HOP_BY_HOP
        ]
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.request(
                scope["method"], self.upstream + scope["path"], content=body, headers=headers
            )
        if self.armed and scope["path"] == "/token":
            self.armed = False
            self.holding.set()  # the server issued (and rotated); the client waits
            await asyncio.to_thread(self.release.wait, 120)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status_code,
                    "headers": [
                        (k.encode(), v.encode())
                        for k, v in answer.headers.items()
                        if k.lower() not in _HOP_BY_HOP
                    ],
                }
            )
            await send({"type": "http.response.body", "body": answer.content})
        except Exception:  # noqa: BLE001 - the client died: the answer is lost
            return


@dataclass
class OidcCrashRig(CrashRig):
    oidc: OidcServer | None = None

    def start_provider(self) -> None:
        assert self.oidc is not None
        self.holder = TokenProxy(self.oidc.issuer)
        self.server = SimServer(self.instance.cert_file, self.instance.key_file)
        self.server.app = self.holder
        self.server.start()
        client_id, method, redirect = CLIENTS[PROVIDER]
        self.redirect = redirect
        (self.instance.config_home / "agent" / "providers.toml").write_text(
            f"""
[providers.{PROVIDER}]
name = "oidc-provider"
authorize_url = "{self.oidc.issuer}/auth"
token_url = "{self.server.base_url}/token"
revocation_url = "{self.oidc.issuer}/token/revocation"
scopes = ["openid", "offline_access"]
use_pkce = true
token_auth_method = "{method}"
rotates_refresh_tokens = true

[providers.{PROVIDER}.authorize_params]
prompt = "consent"
""",
            encoding="utf-8",
        )
        self.store_credentials(client_id, self.oidc.post_secret)

    def connected(self) -> None:
        async def connect() -> None:
            config = load_config(self.instance.config_file, env=self.env())
            catalog = load_catalog(self.instance.config_home / "agent" / "providers.toml")
            async with (
                httpx.AsyncClient(verify=self.instance.ssl_context(), timeout=20) as http,
                open_context(config, catalog=catalog, http=http) as ctx,
            ):
                start = await ctx.broker.begin(PROVIDER, redirect_uri=self.redirect, actor="cli")
                query = await follow_to_redirect(start.authorize_url, self.redirect)
                from flowengine.protocol import parse_callback

                await ctx.engine.record_callback(parse_callback(query), actor="api")
                await ctx.broker.complete_state(start.state, actor="cli")

        anyio.run(connect)

    def works_at_provider(self, access: str) -> bool:
        assert self.oidc is not None
        response = httpx.get(
            f"{self.oidc.issuer}/me", headers={"Authorization": f"Bearer {access}"}, timeout=10
        )
        return response.status_code == 200

    def refreshes(self) -> int:
        assert self.oidc is not None
        client_id = CLIENTS[PROVIDER][0]
        return sum(
            1
            for g in self.oidc.grants()
            if g.get("client_id") == client_id and g.get("grant_type") == "refresh_token"
        )

    def close(self) -> None:
        self.holder.release.set()
        self.server.stop()


@pytest.fixture(name="rig")
def _rig(tmp_path: Path, oidc_server: OidcServer) -> Iterator[OidcCrashRig]:
    rig = OidcCrashRig(tmp_path / "agentd", provider=PROVIDER, oidc=oidc_server)
    try:
        rig.connected()
        yield rig
    finally:
        rig.close()


def _flow(rig: OidcCrashRig) -> tuple[FlowState, str | None, list[str | None]]:
    async def read() -> tuple[FlowState, str | None, list[str | None]]:
        config = load_config(rig.instance.config_file, env=rig.env())
        async with open_context(config) as ctx:
            flow = await ctx.engine.connection(PROVIDER)
            assert flow is not None
            notes = [n.reason for n in await ctx.engine.notifications()]
            return flow.state, flow.error_code, notes

    return anyio.run(read)


@pytest.mark.parametrize(
    ("label", "stop_at"), [p for p in REFRESH_POINTS if p[1] != HOLD], ids=lambda x: str(x)
)
def test_a_kill_after_the_answer_reached_the_process_loses_nothing(
    rig: OidcCrashRig, label: str, stop_at: str
) -> None:
    rig.make_due()
    before = rig.refreshes()
    rig.kill_at(stop_at)
    verdict = rig.judge(label)
    assert not verdict.lost, verdict.detail
    assert rig.refreshes() - before == 2  # never a second request for one answer
    assert _flow(rig) == (FlowState.STORED, None, [])


def test_an_answer_lost_on_the_wire_expires_the_connection_with_its_reason(
    rig: OidcCrashRig,
) -> None:
    rig.make_due()
    rig.kill_at(HOLD)
    result = rig.token()
    assert result.returncode == 4, result.stderr
    assert "lost in transit" in result.stderr
    assert _flow(rig) == (FlowState.EXPIRED, "answer_lost", ["answer_lost"])
