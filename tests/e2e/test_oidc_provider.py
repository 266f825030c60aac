"""End to end against a real authorization server: npm oidc-provider v9 on 127.0.0.1.

Exchange with a public PKCE client, a client_secret_basic and a client_secret_post client;
a refresh storm (50 tasks + 3 processes at expiry) that the server's own log shows as one
refresh request; the rotated-away refresh token refused by the server; RFC 7009 revocation.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from flowengine.clock import ManualClock
from flowengine.errors import ReauthorizationRequired
from flowengine.oauth_http import refresh_tokens
from flowengine.states import FlowState
from flowengine.tokens import TokenStore
from tests.e2e.conftest import OidcServer
from tests.e2e.helpers import CLIENTS, Setup, connect, credentials_for, spec_for

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, server: OidcServer) -> Setup:
    setup = Setup(tmp_path, server.issuer, server.basic_secret, server.post_secret)
    setup.write_credentials()
    return setup


def _grants(server: OidcServer, *, client_id: str, grant_type: str) -> list[dict[str, Any]]:
    return [
        g
        for g in server.grants()
        if g.get("client_id") == client_id and g.get("grant_type") == grant_type
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("provider", sorted(CLIENTS))
async def test_code_exchange_and_refresh_for_each_client_auth_method(
    tmp_path: Path, oidc_server: OidcServer, provider: str
) -> None:
    setup = _setup(tmp_path, oidc_server)
    client_id = CLIENTS[provider][0]
    async with httpx.AsyncClient() as http:
        broker = await setup.open_broker(http)
        try:
            tokens = await connect(broker, provider)
            assert tokens.access
            assert tokens.refresh
            assert tokens.expires is not None
            flow = await broker.engine.get_flow(tokens.flow_id or "")
            assert flow.state is FlowState.STORED
            stored = TokenStore(tmp_path / "auth.json").read(provider)
            assert stored is not None
            assert stored.refresh == tokens.refresh
            # the token works at the provider's userinfo endpoint
            me = await http.get(
                f"{oidc_server.issuer}/me", headers={"Authorization": f"Bearer {tokens.access}"}
            )
            assert me.status_code == 200
            assert me.json()["sub"] == "e2e-user"
            refreshed = await broker.refresh(provider, actor="test", force=True)
            assert refreshed.refresh not in (None, tokens.refresh)  # rotation on
        finally:
            await broker.engine.close()
    ok = [g for g in _grants(oidc_server, client_id=client_id, grant_type="authorization_code")]
    assert [g["status"] for g in ok][-1] == 200
    assert [
        g["status"] for g in _grants(oidc_server, client_id=client_id, grant_type="refresh_token")
    ][-1] == 200


def _storm_child(root: str, issuer: str, basic: str, post: str, barrier: Any, out: str) -> None:
    async def main() -> str:
        setup = Setup(Path(root), issuer, basic, post)
        async with httpx.AsyncClient() as http:
            broker = await setup.open_broker(http, clock=ManualClock(time.time() + 7200))
            try:
                barrier.wait()
                return await broker.get_token("oidc-public", actor="cli")
            finally:
                await broker.engine.close()

    Path(out).write_text(anyio.run(main))


def test_refresh_storm_makes_one_request_and_rotation_kills_the_old_token(
    tmp_path: Path, oidc_server: OidcServer
) -> None:
    setup = _setup(tmp_path, oidc_server)
    provider = "oidc-public"
    client_id = CLIENTS[provider][0]

    async def first_connect() -> str:
        async with httpx.AsyncClient() as http:
            broker = await setup.open_broker(http)
            try:
                tokens = await connect(broker, provider)
            finally:
                await broker.engine.close()
        assert tokens.refresh
        return tokens.refresh

    old_refresh = anyio.run(first_connect)
    before = len(_grants(oidc_server, client_id=client_id, grant_type="refresh_token"))

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    outs = [tmp_path / f"child{i}.out" for i in range(3)]
    children = [
        ctx.Process(
            target=_storm_child,
            args=(
                str(tmp_path),
                oidc_server.issuer,
                oidc_server.basic_secret,
                oidc_server.post_secret,
                barrier,
                str(out),
            ),
        )
        for out in outs
    ]
    for child in children:
        child.start()

    async def storm() -> list[str]:
        async with httpx.AsyncClient() as http:
            # an hour and more later: the access token is past expiry for everybody
            broker = await setup.open_broker(http, clock=ManualClock(time.time() + 7200))
            results: list[str] = []

            async def one() -> None:
                results.append(await broker.get_token(provider, actor="cli"))

            try:
                await anyio.to_thread.run_sync(barrier.wait)
                async with anyio.create_task_group() as tg:
                    for _ in range(50):
                        tg.start_soon(one)
            finally:
                await broker.engine.close()
            return results

    results = anyio.run(storm)
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    answers = set(results) | {out.read_text() for out in outs}
    refreshes = _grants(oidc_server, client_id=client_id, grant_type="refresh_token")[before:]
    assert [g["status"] for g in refreshes] == [200]  # exactly one token-endpoint request
    stored = TokenStore(tmp_path / "auth.json").read(provider)
    assert stored is not None
    assert answers == {stored.access}
    assert stored.refresh not in (None, old_refresh)

    async def reuse_old() -> ReauthorizationRequired:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ReauthorizationRequired) as info:
                await refresh_tokens(
                    spec_for(provider, oidc_server.issuer),
                    credentials_for(
                        provider,
                        basic_secret=oidc_server.basic_secret,
                        post_secret=oidc_server.post_secret,
                    ),
                    refresh_token=old_refresh,
                    client=http,
                    now_ms=0,
                )
        return info.value

    error = anyio.run(reuse_old)
    assert error.oauth_error == "invalid_grant"
    assert old_refresh not in str(error)
    last = _grants(oidc_server, client_id=client_id, grant_type="refresh_token")[-1]
    assert (last["status"], last["error"]) == (400, "invalid_grant")


@pytest.mark.anyio
async def test_disconnect_revokes_at_the_provider(tmp_path: Path, oidc_server: OidcServer) -> None:
    setup = _setup(tmp_path, oidc_server)
    provider = "oidc-post"
    async with httpx.AsyncClient() as http:
        broker = await setup.open_broker(http)
        try:
            tokens = await connect(broker, provider)
            assert tokens.refresh
            result = await broker.disconnect(provider, actor="test")
            assert result.revoked_remotely is True
            assert result.has_revocation_endpoint is True
            assert TokenStore(tmp_path / "auth.json").read(provider) is None
            flow = await broker.engine.get_flow(tokens.flow_id or "")
            assert flow.state is FlowState.REVOKED
            with pytest.raises(ReauthorizationRequired) as info:
                await refresh_tokens(
                    spec_for(provider, oidc_server.issuer),
                    credentials_for(
                        provider,
                        basic_secret=oidc_server.basic_secret,
                        post_secret=oidc_server.post_secret,
                    ),
                    refresh_token=tokens.refresh,
                    client=http,
                    now_ms=0,
                )
            assert info.value.oauth_error == "invalid_grant"
        finally:
            await broker.engine.close()
    revocations = [g for g in oidc_server.grants() if g["event"] == "revocation"]
    assert revocations[-1]["status"] == 200
    assert revocations[-1]["client_id"] == "e2e-post"
