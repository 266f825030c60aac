from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from agentd.errortable import error_lines
from bot import texts
from flowengine.broker import Broker
from flowengine.catalog import Catalog, load_catalog
from flowengine.clock import ManualClock, to_ms
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.engine import FlowEngine
from flowengine.errors import (
    CredentialsMissingError,
    NotConnectedError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
    UnknownProviderError,
)
from flowengine.protocol import code_challenge, parse_callback
from flowengine.states import FlowState
from flowengine.tokens import TokenSet, TokenStore
from tests.fakes import FakeProvider

REDIRECT = "https://broker.example.ts.net/oauth/callback"
START = 1_800_000_000.0


@dataclass
class Rig:
    broker: Broker
    engine: FlowEngine
    fake: FakeProvider
    clock: ManualClock
    tokens: TokenStore
    creds: CredentialStore
    ledger_path: Path


async def _rig(tmp_path: Path, fake: FakeProvider, client: httpx.AsyncClient) -> Rig:
    clock = ManualClock(START)
    ledger_path = tmp_path / "ledger.sqlite3"
    engine = await FlowEngine.open(ledger_path, clock=clock)
    creds = CredentialStore(tmp_path / "credentials.json")
    creds.put("fake", fake.credentials())
    tokens = TokenStore(tmp_path / "auth.json")
    catalog = Catalog().with_override(fake.spec())
    broker = Broker(engine, catalog=catalog, credentials=creds, tokens=tokens, http=client)
    return Rig(broker, engine, fake, clock, tokens, creds, ledger_path)


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture(name="rig")
async def _rig_fixture(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[Rig]:
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, fake, client)
        try:
            yield rig
        finally:
            await rig.engine.close()


async def _connect(rig: Rig, *, actor: str = "bot", chat_id: int | None = 42) -> TokenSet:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor=actor, chat_id=chat_id)
    query = parse_qs(urlsplit(start.authorize_url).query)
    verifier = await rig.engine.code_verifier(start.flow.id)
    assert query["code_challenge"] == [code_challenge(verifier or "")]
    code = rig.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
    await rig.engine.record_callback(parse_callback({"state": [start.state], "code": [code]}))
    return await rig.broker.complete_state(start.state, actor=actor)


async def _states(rig: Rig, flow_id: str) -> list[FlowState]:
    return [e.to_state for e in (await rig.engine.inspect(flow_id)).events]


# ------------------------------------------------------------------------ begin


@pytest.mark.anyio
async def test_begin_builds_the_authorize_url_and_waits(rig: Rig) -> None:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot", chat_id=7)
    parts = urlsplit(start.authorize_url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://fake.test/authorize"
    assert query["client_id"] == ["client-123"]
    assert query["redirect_uri"] == [REDIRECT]
    assert query["state"] == [start.state]
    assert len(start.state) >= 43  # 256 bits, url-safe base64
    assert query["code_challenge_method"] == ["S256"]
    assert query["scope"] == ["read"]
    assert start.flow.state is FlowState.AWAITING_CODE
    assert start.flow.chat_id == 7
    assert start.state not in repr(start)
    assert "authorize" not in repr(start).split("spec=")[0]


@pytest.mark.anyio
async def test_begin_uses_separator_and_extra_params_from_the_catalog(tmp_path: Path) -> None:
    withings = load_catalog().get("withings")
    fake = FakeProvider()
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, fake, client)
        rig.broker.catalog.register(withings)
        rig.creds.put("withings", ClientCredentials("wid", "wsecret"))
        start = await rig.broker.begin(
            "withings",
            redirect_uri=REDIRECT,
            actor="bot",
            scopes=["user.metrics", "user.activity"],
        )
        query = parse_qs(urlsplit(start.authorize_url).query)
        assert query["scope"] == ["user.metrics,user.activity"]
        assert "code_challenge" not in query  # Withings: no PKCE
        google = load_catalog().get("google")
        rig.broker.catalog.register(google)
        rig.creds.put("google", ClientCredentials("gid", "gsecret"))
        start = await rig.broker.begin("google", redirect_uri=REDIRECT, actor="bot")
        query = parse_qs(urlsplit(start.authorize_url).query)
        assert query["access_type"] == ["offline"]
        assert query["prompt"] == ["consent"]
        assert query["scope"] == ["openid email"]
        await rig.engine.close()


@pytest.mark.anyio
async def test_begin_without_credentials_or_unknown_provider(rig: Rig) -> None:
    rig.creds.delete("fake")
    with pytest.raises(CredentialsMissingError) as info:
        await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    assert info.value.needs_secret is True
    rig.creds.put("fake", ClientCredentials("client-123"))  # secret missing
    with pytest.raises(CredentialsMissingError):
        await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    with pytest.raises(UnknownProviderError):
        await rig.broker.begin("fakes", redirect_uri=REDIRECT, actor="bot")
    assert await rig.engine.list_flows() == []


# --------------------------------------------------------------------- complete


@pytest.mark.anyio
async def test_complete_stores_tokens_with_flow_id_and_records_every_step(rig: Rig) -> None:
    tokens = await _connect(rig)
    flow_id = tokens.flow_id
    assert flow_id is not None
    entry = json.loads(rig.tokens.path.read_text())["fake"]
    assert entry["access"] == tokens.access
    assert entry["refresh"] == tokens.refresh
    assert entry["flow_id"] == flow_id
    assert entry["expires"] == to_ms(START) + 3_600_000
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED
    assert flow.token_expires_at == entry["expires"]
    assert await _states(rig, flow_id) == [
        FlowState.INITIATED,
        FlowState.AWAITING_CODE,
        FlowState.CODE_RECEIVED,
        FlowState.EXCHANGED,
        FlowState.STORED,
    ]
    assert await rig.engine.code_verifier(flow_id) is None


@pytest.mark.anyio
async def test_complete_with_a_refused_code_fails_the_flow_and_stores_nothing(rig: Rig) -> None:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    await rig.engine.record_callback(parse_callback({"state": [start.state], "code": ["bogus"]}))
    with pytest.raises(ReauthorizationRequired):
        await rig.broker.complete_state(start.state, actor="bot")
    flow = await rig.engine.get_flow(start.flow.id)
    assert flow.state is FlowState.FAILED
    assert flow.error_code == "invalid_grant"
    assert not rig.tokens.path.exists()


# -------------------------------------------------------------------- get_token


@pytest.mark.anyio
async def test_get_token_fresh_needs_no_request(rig: Rig) -> None:
    tokens = await _connect(rig)
    before = len(rig.fake.requests)
    assert await rig.broker.get_token("fake") == tokens.access
    assert len(rig.fake.requests) == before


@pytest.mark.anyio
async def test_get_token_refreshes_within_leeway_and_rotates(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.clock.advance(3600 - 30)  # 30 s left, leeway 60 s
    access = await rig.broker.get_token("fake", actor="cli")
    assert access != tokens.access
    stored = rig.tokens.read("fake")
    assert stored is not None
    assert stored.access == access
    assert stored.refresh not in (None, tokens.refresh)
    assert stored.flow_id == tokens.flow_id
    assert rig.fake.grants("refresh_token") == 1
    assert tokens.refresh not in rig.fake.valid_refresh
    flow = await rig.engine.get_flow(tokens.flow_id or "")
    assert flow.state is FlowState.STORED
    assert (await _states(rig, flow.id))[-2:] == [FlowState.REFRESHING, FlowState.STORED]
    assert flow.token_expires_at == stored.expires


@pytest.mark.anyio
async def test_min_valid_asks_for_a_longer_margin(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.clock.advance(1800)
    assert await rig.broker.get_token("fake") == tokens.access
    assert await rig.broker.get_token("fake", min_valid=2000) != tokens.access


@pytest.mark.anyio
async def test_fifty_concurrent_callers_cause_one_refresh(rig: Rig) -> None:
    await _connect(rig)
    rig.clock.advance(3600)
    rig.fake.delay = 0.05
    results: list[str] = []

    async def one() -> None:
        results.append(await rig.broker.get_token("fake"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert rig.fake.grants("refresh_token") == 1
    assert len(set(results)) == 1
    assert results[0] == rig.tokens.read("fake").access  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_concurrent_forced_refreshes_cause_one_request(rig: Rig) -> None:
    await _connect(rig)
    rig.fake.delay = 0.02
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(lambda: rig.broker.refresh("fake", actor="timer", force=True))
    assert rig.fake.grants("refresh_token") == 1
    await rig.broker.refresh("fake", actor="timer", force=True)
    assert rig.fake.grants("refresh_token") == 2
    await rig.broker.refresh("fake", actor="timer")  # not due: no request
    assert rig.fake.grants("refresh_token") == 2


@pytest.mark.anyio
async def test_not_connected(rig: Rig) -> None:
    with pytest.raises(NotConnectedError) as info:
        await rig.broker.get_token("fake")
    assert info.value.provider == "fake"
    # the CLI words it (agentd/errortable.py)
    assert re.search("agentd connect fake", error_lines(info.value)[0])


@pytest.mark.anyio
async def test_transient_failure_returns_the_still_valid_token(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.clock.advance(3600 - 30)
    rig.fake.fail_next(httpx.Response(503))
    assert await rig.broker.get_token("fake") == tokens.access
    flow = await rig.engine.get_flow(tokens.flow_id or "")
    assert flow.state is FlowState.STORED
    assert flow.error_code == "provider_unavailable"
    assert rig.tokens.read("fake") == TokenSet.from_entry(
        json.loads(rig.tokens.path.read_text())["fake"]
    )
    assert rig.tokens.read("fake").refresh == tokens.refresh  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_transient_failure_after_expiry_raises_with_retry_after(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.clock.advance(4000)
    rig.fake.fail_next(httpx.Response(429, headers={"Retry-After": "90"}))
    with pytest.raises(ProviderTransientError) as info:
        await rig.broker.get_token("fake")
    assert info.value.retry_after == 90.0
    stored = rig.tokens.read("fake")
    assert stored is not None
    assert stored.refresh == tokens.refresh
    flow = await rig.engine.get_flow(tokens.flow_id or "")
    assert flow.state is FlowState.STORED
    # the next attempt works with the kept refresh token
    assert await rig.broker.get_token("fake") != tokens.access


@pytest.mark.anyio
async def test_invalid_grant_expires_the_connection_and_tells_the_owner(rig: Rig) -> None:
    tokens = await _connect(rig, chat_id=99)
    rig.fake.valid_refresh.clear()  # the provider forgot the grant
    rig.clock.advance(4000)
    with pytest.raises(ReauthorizationRequired) as info:
        await rig.broker.get_token("fake")
    assert (info.value.provider, info.value.oauth_error) == ("fake", "invalid_grant")
    # the edges word what to do: the bot (bot/texts.py) and the CLI (agentd/errortable.py)
    assert 'say "connect fake"' in texts.error(info.value)
    assert "agentd connect fake" in error_lines(info.value)[0]
    assert tokens.refresh is not None
    assert tokens.refresh not in str(info.value)
    flow = await rig.engine.get_flow(tokens.flow_id or "")
    assert flow.state is FlowState.EXPIRED
    assert flow.error_code == "invalid_grant"
    notes = await rig.engine.notifications()
    assert [(n.kind, n.provider, n.chat_id) for n in notes] == [("expired", "fake", 99)]
    requests = len(rig.fake.requests)
    with pytest.raises(ReauthorizationRequired):
        await rig.broker.get_token("fake")
    assert len(rig.fake.requests) == requests  # no more hammering the provider


@pytest.mark.anyio
async def test_envelope_error_never_overwrites_stored_tokens(tmp_path: Path) -> None:
    fake = FakeProvider(envelope=True, token_params={"action": "requesttoken"})
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, fake, client)
        await _connect(rig)
        before = rig.tokens.path.read_bytes()
        rig.clock.advance(4000)
        fake.fail_next(httpx.Response(200, json={"status": 601, "error": "Too many requests"}))
        with pytest.raises(ProviderTransientError):
            await rig.broker.get_token("fake")
        fake.fail_next(httpx.Response(200, json={"status": 0, "body": {"token_type": "Bearer"}}))
        with pytest.raises(ProviderError):
            await rig.broker.get_token("fake")
        assert rig.tokens.path.read_bytes() == before
        assert await rig.broker.get_token("fake") != json.loads(before)["fake"]["access"]
        await rig.engine.close()


@pytest.mark.anyio
async def test_refresh_without_new_refresh_token_keeps_the_old_one(tmp_path: Path) -> None:
    fake = FakeProvider(rotate=False)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, fake, client)
        tokens = await _connect(rig)
        fresh = await rig.broker.refresh("fake", actor="timer", force=True)
        assert fresh.refresh == tokens.refresh
        assert rig.tokens.read("fake").refresh == tokens.refresh  # type: ignore[union-attr]
        await rig.engine.close()


@pytest.mark.anyio
async def test_missing_expires_in_is_unknown_and_not_refreshed_until_forced(tmp_path: Path) -> None:
    fake = FakeProvider(expires_in=None)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, fake, client)
        tokens = await _connect(rig)
        assert rig.tokens.read("fake").expires is None  # type: ignore[union-attr]
        rig.clock.advance(10**6)
        assert await rig.broker.get_token("fake") == tokens.access
        forced = await rig.broker.refresh("fake", actor="api", force=True)
        assert forced.access != tokens.access
        await rig.engine.close()


# ------------------------------------------------------------------- disconnect


@pytest.mark.anyio
async def test_disconnect_revokes_forgets_and_ends_the_flow(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.tokens.write("other", TokenSet(access="x"))
    result = await rig.broker.disconnect("fake", actor="cli")
    assert result.revoked_remotely is True
    assert result.has_revocation_endpoint is True
    assert rig.fake.revoked == [tokens.refresh]
    assert rig.tokens.read("fake") is None
    assert rig.tokens.read("other") is not None
    assert (await rig.engine.get_flow(tokens.flow_id or "")).state is FlowState.REVOKED
    with pytest.raises(NotConnectedError):
        await rig.broker.disconnect("fake", actor="cli")


@pytest.mark.anyio
async def test_disconnect_without_revocation_endpoint(tmp_path: Path) -> None:
    fake = FakeProvider(revocation=False)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, fake, client)
        await _connect(rig)
        result = await rig.broker.disconnect("fake", actor="bot")
        assert result.revoked_remotely is False
        assert result.has_revocation_endpoint is False
        assert rig.tokens.read("fake") is None
        await rig.engine.close()


@pytest.mark.anyio
async def test_disconnect_when_revocation_fails_still_forgets(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.fake.fail_next(httpx.ConnectError("down"))
    result = await rig.broker.disconnect("fake", actor="bot")
    assert result.revoked_remotely is False
    assert rig.tokens.read("fake") is None
    assert (await rig.engine.get_flow(tokens.flow_id or "")).state is FlowState.REVOKED


# -------------------------------------------------------------------- reconcile


@pytest.mark.anyio
async def test_reconcile_interrupted_refresh_keeps_the_refresh_token(rig: Rig) -> None:
    tokens = await _connect(rig)
    before = rig.tokens.path.read_bytes()
    rig.clock.advance(10)
    await rig.engine.begin_refresh(tokens.flow_id or "", actor="timer")  # then "crash"
    report = await rig.broker.reconcile()
    assert report.refresh_failed == [tokens.flow_id]
    flow = await rig.engine.get_flow(tokens.flow_id or "")
    assert flow.state is FlowState.STORED
    assert flow.error_code == "interrupted"
    assert rig.tokens.path.read_bytes() == before


@pytest.mark.anyio
async def test_reconcile_refresh_that_stored_its_tokens(rig: Rig) -> None:
    tokens = await _connect(rig)
    flow_id = tokens.flow_id or ""
    rig.clock.advance(10)
    await rig.engine.begin_refresh(flow_id, actor="timer")
    rig.clock.advance(1)
    newer = TokenSet(
        access="new",
        refresh="r2",
        expires=to_ms(rig.clock.now()) + 1000,
        obtained_at=to_ms(rig.clock.now()),
    )
    # the new pair reached the vault, then the process died before the ledger heard of it
    rig.broker.vault.provider("fake").write(newer, flow_id=flow_id, now_ms=to_ms(rig.clock.now()))
    report = await rig.broker.reconcile()
    assert report.refreshed == [flow_id]
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED
    assert flow.token_expires_at == newer.expires


@pytest.mark.anyio
async def test_reconcile_exchanged_flows(rig: Rig) -> None:
    async def exchanged() -> str:
        start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
        await rig.engine.record_callback(parse_callback({"state": [start.state], "code": ["c"]}))
        taken = await rig.engine.take_code(start.state)
        await rig.engine.record_exchange(taken.flow_id, actor="bot")
        return taken.flow_id

    lost = await exchanged()
    kept = await exchanged()
    # the kept flow's pair reached the vault before the process died
    rig.broker.vault.provider("fake").write(
        TokenSet(access="a", refresh="r", obtained_at=1), flow_id=kept
    )
    report = await rig.broker.reconcile()
    assert report.stored == [kept]
    assert report.store_failed == [lost]
    assert (await rig.engine.get_flow(kept)).state is FlowState.STORED
    assert (await rig.engine.get_flow(lost)).state is FlowState.FAILED


@pytest.mark.anyio
async def test_stale_refreshing_flow_is_settled_by_the_next_refresh(rig: Rig) -> None:
    tokens = await _connect(rig)
    await rig.engine.begin_refresh(tokens.flow_id or "", actor="timer")  # crashed process
    rig.clock.advance(4000)
    assert await rig.broker.get_token("fake") != tokens.access
    states = await _states(rig, tokens.flow_id or "")
    assert states[-4:] == [
        FlowState.REFRESHING,
        FlowState.STORED,
        FlowState.REFRESHING,
        FlowState.STORED,
    ]


# ----------------------------------------------------------------------- status


@pytest.mark.anyio
async def test_status_lists_connections(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.clock.advance(3590)
    await rig.broker.get_token("fake")
    [status] = await rig.broker.status()
    assert status.provider == "fake"
    assert status.name == "Fake"
    assert status.state == "stored"
    assert status.flow_id == tokens.flow_id
    assert status.last_refresh == to_ms(rig.clock.now())
    assert status.expires == rig.tokens.read("fake").expires  # type: ignore[union-attr]
    assert status.scopes == ("read",)
    assert status.has_refresh_token is True
    assert "access" not in json.dumps(status.public()).replace("access_token", "")


# ---------------------------------------------------------------- secrets stay out


@pytest.mark.anyio
async def test_no_secret_reaches_the_ledger(rig: Rig) -> None:
    tokens = await _connect(rig)
    rig.clock.advance(4000)
    await rig.broker.get_token("fake")
    newest = rig.tokens.read("fake")
    assert newest is not None
    await rig.engine.close()
    blob = b"".join(p.read_bytes() for p in rig.ledger_path.parent.glob("ledger.sqlite3*"))
    for secret in (
        tokens.access,
        tokens.refresh,
        newest.access,
        newest.refresh,
        rig.fake.client_secret,
    ):
        assert secret
        assert secret.encode() not in blob


# --------------------------------------------------------------- several processes


def _child(tmp: str, barrier: Any, out: str) -> None:
    async def main() -> str:
        fake = FakeProvider(delay=0.3)
        fake.valid_refresh.update(json.loads((Path(tmp) / "refresh.json").read_text()))
        transport = fake.logged_transport(Path(tmp) / "requests.log")
        async with httpx.AsyncClient(transport=transport) as client:
            rig = await _rig(Path(tmp), fake, client)
            rig.clock.set(START + 4000)
            barrier.wait()
            token = await rig.broker.get_token("fake")
            await rig.engine.close()
            return token

    Path(out).write_text(anyio.run(main))


def test_three_processes_at_expiry_make_one_refresh_request(tmp_path: Path) -> None:
    fake = FakeProvider()

    async def setup() -> None:
        async with httpx.AsyncClient(transport=fake.transport()) as client:
            rig = await _rig(tmp_path, fake, client)
            await _connect(rig)
            await rig.engine.close()

    anyio.run(setup)
    (tmp_path / "refresh.json").write_text(json.dumps(sorted(fake.valid_refresh)))
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"out{i}" for i in range(3)]
    procs = [ctx.Process(target=_child, args=(str(tmp_path), barrier, str(out))) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (tmp_path / "requests.log").read_text().splitlines() == ["/token"]
    tokens = {out.read_text() for out in outs}
    assert len(tokens) == 1
    assert tokens == {TokenStore(tmp_path / "auth.json").read("fake").access}  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_publish_under_way_is_waited_for(rig: Rig) -> None:
    """Whoever returns from publish() finds auth.json written, also when another task's
    publish took the work a moment earlier (the daemon's page and its exchange race so)."""
    import threading

    await _connect(rig)
    assert rig.tokens.read("fake") is not None
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    slow = rig.broker._publish_sync

    def held(dirty: set[str], full: bool) -> list[str]:
        started.set()
        release.wait(10)
        try:
            return slow(dirty, full)
        finally:
            done.set()

    rig.broker._dirty.add("fake")
    rig.broker._publish_sync = held  # type: ignore[method-assign]
    seen: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.broker.publish)
        await anyio.to_thread.run_sync(started.wait, 10)
        rig.broker._publish_sync = slow  # type: ignore[method-assign]

        async def second() -> None:
            await rig.broker.publish()
            seen.append(done.is_set())

        tg.start_soon(second)
        await anyio.sleep(0.2)
        assert seen == []  # still waiting for the first one
        release.set()
    assert seen == [True]
