"""The lifecycle timer against a real ledger, the real Broker, vault and auth.json, a fake provider.

Time is driven two ways: a ManualClock injected everywhere, and freezegun (real_asyncio)
against SystemClock. ``timer.sweep()`` is called directly; ``run()`` gets a fast sleep.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
from freezegun import freeze_time

from api.app import create_app
from api.settings import ApiSettings
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.clock import Clock, ManualClock, SystemClock, to_ms
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.ledger import Ledger
from flowengine.protocol import parse_callback
from flowengine.schedule import TimerPolicy
from flowengine.states import FlowState, FlowTrigger
from flowengine.timer import RefreshTimer
from flowengine.tokens import TokenSet, TokenStore
from tests.fakes import FakeProvider

REDIRECT = "https://broker.example.ts.net/oauth/callback"
START = 1_800_000_000.0
LIFETIME = 3600  # the fake's expires_in


@dataclass
class Rig:
    broker: Broker
    engine: FlowEngine
    fake: FakeProvider
    clock: Clock
    tokens: TokenStore
    timer: RefreshTimer
    ledger_path: Path

    def refreshes(self) -> int:
        return self.fake.grants("refresh_token")

    async def states(self, flow_id: str) -> list[tuple[FlowState, str]]:
        return [(e.to_state, e.actor) for e in (await self.engine.inspect(flow_id)).events]

    async def next_check(self, flow_id: str) -> float | None:
        at = await self.engine.ledger.next_check_at(flow_id)
        return None if at is None else at / 1000


async def _make_rig(
    tmp_path: Path,
    fake: FakeProvider,
    client: httpx.AsyncClient,
    clock: Clock,
    policy: TimerPolicy | None = None,
) -> Rig:
    ledger_path = tmp_path / "ledger.sqlite3"
    engine = await FlowEngine.open(ledger_path, clock=clock)
    creds = CredentialStore(tmp_path / "credentials.json")
    creds.put("fake", fake.credentials())
    tokens = TokenStore(tmp_path / "auth.json")
    catalog = Catalog().with_override(fake.spec())
    broker = Broker(engine, catalog=catalog, credentials=creds, tokens=tokens, http=client)
    timer = RefreshTimer(broker, policy=policy, rng=random.Random(5))
    return Rig(broker, engine, fake, clock, tokens, timer, ledger_path)


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider(expires_in=LIFETIME)


@pytest.fixture(name="rig")
async def _rig(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[Rig]:
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _make_rig(tmp_path, fake, client, ManualClock(START))
        try:
            yield rig
        finally:
            await rig.engine.close()


def _advance(rig: Rig, seconds: float) -> None:
    assert isinstance(rig.clock, ManualClock)
    rig.clock.advance(seconds)


def _travel_to(rig: Rig, when: float) -> None:
    assert isinstance(rig.clock, ManualClock)
    rig.clock.set(when)


async def _connect(rig: Rig) -> tuple[str, TokenSet]:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot", chat_id=42)
    verifier = await rig.engine.code_verifier(start.flow.id)
    code = rig.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
    await rig.engine.record_callback(parse_callback({"state": [start.state], "code": [code]}))
    await rig.broker.complete_state(start.state, actor="bot")
    tokens = rig.tokens.read("fake")
    assert tokens is not None
    return start.flow.id, tokens


async def _notifications(rig: Rig) -> list[tuple[str, str | None]]:
    return [(n.kind, n.flow_id) for n in await rig.engine.notifications()]


def _timer_events(states: list[tuple[FlowState, str]]) -> list[FlowState]:
    return [s for s, actor in states if actor == "timer"]


# --------------------------------------------------------------- proactive refresh


@pytest.mark.anyio
async def test_no_request_before_due_then_refresh_near_expiry(rig: Rig) -> None:
    flow_id, first = await _connect(rig)
    assert first.expires == to_ms(START + LIFETIME)
    for _ in range(3):
        _advance(rig, 60)
        report = await rig.timer.sweep()
        assert report.refreshed == []
    assert rig.refreshes() == 0  # nothing due yet: not a single request

    _travel_to(rig, START + LIFETIME - 90)  # near expiry
    report = await rig.timer.sweep()
    assert report.refreshed == [flow_id]
    assert rig.refreshes() == 1
    states = await rig.states(flow_id)
    assert _timer_events(states) == [FlowState.REFRESHING, FlowState.STORED]
    assert [s for s, _ in states][-3:] == [
        FlowState.STORED,
        FlowState.REFRESHING,
        FlowState.STORED,
    ]
    second = rig.tokens.read("fake")
    assert second is not None
    assert second.access != first.access
    assert second.refresh != first.refresh
    assert second.refresh in rig.fake.valid_refresh  # the rotated pair is the live one
    assert second.expires == to_ms(rig.clock.now() + LIFETIME)

    # the timer schedules the next refresh by its policy: 25 % of the lifetime left
    nxt = await rig.next_check(flow_id)
    assert nxt is not None
    now = rig.clock.now()
    assert now + 0.9 * 2700 <= nxt <= now + 2700
    _travel_to(rig, nxt - 1)
    assert (await rig.timer.sweep()).refreshed == []
    assert rig.refreshes() == 1
    _travel_to(rig, nxt)
    assert (await rig.timer.sweep()).refreshed == [flow_id]
    assert rig.refreshes() == 2


@pytest.mark.anyio
async def test_due_check_with_a_fresh_token_makes_no_request(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    await rig.engine.ledger.set_next_check(flow_id, to_ms(rig.clock.now()))
    report = await rig.timer.sweep()
    assert report.checked == 1
    assert report.scheduled == 1
    assert rig.refreshes() == 0
    nxt = await rig.next_check(flow_id)
    assert nxt is not None
    assert nxt > rig.clock.now() + 2000


@pytest.mark.anyio
async def test_start_up_schedules_stored_connections_by_policy(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    before = await rig.next_check(flow_id)
    await rig.timer.start_up()
    after = await rig.next_check(flow_id)
    assert after is not None
    assert after <= START + 2700
    assert before is None or after <= before


@pytest.mark.anyio
async def test_timer_and_bot_at_once_make_one_request(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    _travel_to(rig, START + LIFETIME - 30)
    rig.fake.delay = 0.05
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.timer.sweep)
        for _ in range(5):
            tg.start_soon(lambda: rig.broker.get_token("fake", actor="bot"))
    assert rig.refreshes() == 1
    assert (await rig.engine.get_flow(flow_id)).state is FlowState.STORED


# ----------------------------------------------------------------- permanent failure


@pytest.mark.anyio
async def test_invalid_grant_expires_with_one_notification(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    rig.fake.valid_refresh.clear()  # the owner revoked access at the provider
    _travel_to(rig, START + LIFETIME - 120)
    report = await rig.timer.sweep()
    assert report.expired_connections == [flow_id]
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.EXPIRED
    assert flow.error_code == "invalid_grant"
    assert _timer_events(await rig.states(flow_id)) == [FlowState.REFRESHING, FlowState.EXPIRED]
    assert await _notifications(rig) == [("expired", flow_id)]
    assert await rig.next_check(flow_id) is None
    for _ in range(5):  # no retry storm, no notification storm
        _advance(rig, 3600)
        await rig.timer.sweep()
    assert rig.refreshes() == 1
    assert await _notifications(rig) == [("expired", flow_id)]


@pytest.mark.anyio
async def test_token_without_refresh_dies_then_expired_and_notified(rig: Rig) -> None:
    flow_id, tokens = await _connect(rig)
    # a provider that gave no refresh token
    rig.broker.vault.provider("fake").write(
        TokenSet(access=tokens.access, expires=tokens.expires, obtained_at=to_ms(START)),
        flow_id=flow_id,
    )
    await rig.engine.ledger.set_next_check(flow_id, to_ms(START + 60))
    _travel_to(rig, START + 60)
    report = await rig.timer.sweep()
    assert await rig.next_check(flow_id) == START + LIFETIME  # exactly when it dies
    _travel_to(rig, START + LIFETIME - 1)
    report = await rig.timer.sweep()
    assert report.expired_connections == []
    assert (await rig.engine.get_flow(flow_id)).state is FlowState.STORED
    _travel_to(rig, START + LIFETIME)
    report = await rig.timer.sweep()
    assert report.expired_connections == [flow_id]
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.EXPIRED
    assert flow.error_code == "token_expired"
    assert _timer_events(await rig.states(flow_id)) == [FlowState.EXPIRED]
    notes = await rig.engine.notifications()
    assert [(n.kind, n.flow_id, n.chat_id) for n in notes] == [("expired", flow_id, 42)]
    assert notes[0].reason == "token_expired"
    _advance(rig, 600)
    await rig.timer.sweep()
    assert len(await rig.engine.notifications()) == 1
    assert rig.refreshes() == 0


@pytest.mark.anyio
async def test_tokens_gone_from_vault_and_auth_json_expire_the_connection(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    rig.broker.vault.provider("fake").remove()
    rig.tokens.delete("fake")
    await rig.engine.ledger.set_next_check(flow_id, to_ms(rig.clock.now()))
    report = await rig.timer.sweep()
    assert report.expired_connections == [flow_id]
    assert (await rig.engine.get_flow(flow_id)).error_code == "tokens_missing"
    assert await _notifications(rig) == [("expired", flow_id)]


@pytest.mark.anyio
async def test_entry_deleted_from_auth_json_is_put_back_by_the_next_sweep(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    flow_id, tokens = await _connect(rig)
    rig.tokens.delete("fake")  # another program rewrote auth.json without our entry
    report = await rig.timer.sweep()
    assert report.published == 1
    assert rig.tokens.read("fake") == tokens
    assert (await rig.engine.get_flow(flow_id)).state is FlowState.STORED
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "auth.json entry for fake was removed by another writer; re-published from the vault"
    ]
    assert tokens.access not in caplog.text
    assert (await rig.timer.sweep()).published == 0  # in sync: no rewrite


# ----------------------------------------------------------------- transient failure


def _unavailable() -> httpx.Response:
    return httpx.Response(503, json={"error": "temporarily_unavailable"})


@pytest.mark.anyio
async def test_provider_down_backs_off_keeps_tokens_warns_once(rig: Rig) -> None:
    flow_id, tokens = await _connect(rig)
    await rig.timer.start_up()  # scheduled by the policy (25 % left)
    raw_before = json.loads(rig.tokens.path.read_text())
    rig.fake.fail_next(*[_unavailable() for _ in range(3)], httpx.ConnectError("down"))
    _travel_to(rig, START + LIFETIME - 900)  # 25 % left: due, token still valid

    delays = []
    for attempt in range(1, 5):
        now = rig.clock.now()
        report = await rig.timer.sweep()
        assert report.retrying == [flow_id]
        assert rig.refreshes() == attempt
        flow = await rig.engine.get_flow(flow_id)
        assert flow.state is FlowState.STORED  # no state loss
        assert json.loads(rig.tokens.path.read_text()) == raw_before  # the pair is kept
        assert await rig.broker.get_token("fake", actor="bot") == tokens.access
        nxt = await rig.next_check(flow_id)
        assert nxt is not None
        delays.append(nxt - now)
        # sweeping again before the retry time sends nothing: no retry storm
        _advance(rig, 30)
        await rig.timer.sweep()
        assert rig.refreshes() == attempt
        _travel_to(rig, nxt)
    assert 60 <= delays[0] <= 66
    assert all(b > a * 1.5 for a, b in zip(delays, delays[1:], strict=False))
    # one refresh_failing notification after three failures in a row, not every sweep
    assert await _notifications(rig) == [("refresh_failing", flow_id)]
    assert rig.timer.failures(flow_id) == 4
    events = await rig.states(flow_id)
    assert all(actor == "timer" for _, actor in events[-8:])

    # the provider is back: refreshed, error cleared, counter reset
    report = await rig.timer.sweep()
    assert report.refreshed == [flow_id]
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED
    assert flow.error_code is None
    assert rig.timer.failures(flow_id) == 0
    new = rig.tokens.read("fake")
    assert new is not None
    assert new.access != tokens.access


@pytest.mark.anyio
async def test_retry_after_is_honoured(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    await rig.timer.start_up()
    rig.fake.fail_next(httpx.Response(429, headers={"Retry-After": "1800"}))
    _travel_to(rig, START + LIFETIME - 600)
    now = rig.clock.now()
    await rig.timer.sweep()
    nxt = await rig.next_check(flow_id)
    assert nxt is not None
    assert nxt >= now + 1800
    # after expiry the broker raises (no valid token to fall back on): still honoured
    rig.fake.fail_next(httpx.Response(429, headers={"Retry-After": "700"}))
    _travel_to(rig, nxt - 1)
    assert (await rig.timer.sweep()).checked == 0
    _travel_to(rig, nxt)  # past the token's expiry
    now = rig.clock.now()
    report = await rig.timer.sweep()
    assert report.retrying == [flow_id]
    nxt = await rig.next_check(flow_id)
    assert nxt is not None
    assert nxt >= now + 700
    assert (await rig.engine.get_flow(flow_id)).state is FlowState.STORED
    assert rig.refreshes() == 2


# -------------------------------------------------------------------- unknown expiry


@pytest.mark.anyio
async def test_unknown_expiry_is_checked_on_a_schedule(tmp_path: Path) -> None:
    fake = FakeProvider(expires_in=None)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _make_rig(tmp_path, fake, client, ManualClock(START))
        try:
            flow_id, tokens = await _connect(rig)
            assert tokens.expires is None
            _advance(rig, 60)
            await rig.timer.sweep()
            assert rig.refreshes() == 0  # not refreshed right after connecting
            nxt = await rig.next_check(flow_id)
            assert nxt is not None
            assert START + 3240 <= nxt <= START + 3600
            _travel_to(rig, nxt)
            report = await rig.timer.sweep()
            assert report.refreshed == [flow_id]
            assert rig.refreshes() == 1
            again = await rig.next_check(flow_id)
            assert again is not None
            assert nxt + 3240 <= again <= nxt + 3600
            # the grant died: the scheduled check finds out
            fake.valid_refresh.clear()
            _travel_to(rig, again)
            report = await rig.timer.sweep()
            assert report.expired_connections == [flow_id]
            assert await _notifications(rig) == [("expired", flow_id)]
        finally:
            await rig.engine.close()


# ------------------------------------------------------------------ pending flows


async def _api_pending(engine: FlowEngine, state: str) -> int:
    app = create_app(engine, settings=ApiSettings(mode="plain-test", api_token="t"))
    client = app.test_client()
    response = await client.get(f"/oauth/pending/{state}", headers={"Authorization": "Bearer t"})
    return response.status_code


@pytest.mark.anyio
async def test_abandoned_flow_expires_after_its_ttl_and_pending_says_410(rig: Rig) -> None:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    assert await _api_pending(rig.engine, start.state) == 202  # waiting
    _advance(rig, 9 * 60)
    assert (await rig.timer.sweep()).expired_pending == []
    _advance(rig, 2 * 60)  # 11 minutes after the link went out
    report = await rig.timer.sweep()
    assert report.expired_pending == [start.flow.id]
    states = await rig.states(start.flow.id)
    assert states[-1] == (FlowState.EXPIRED, "timer")
    assert await _api_pending(rig.engine, start.state) == 410


@pytest.mark.anyio
async def test_code_received_expires_after_the_shorter_ttl(rig: Rig) -> None:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    await rig.engine.record_callback(parse_callback({"state": [start.state], "code": ["c"]}))
    _advance(rig, 4 * 60)
    assert (await rig.timer.sweep()).expired_pending == []
    _advance(rig, 61)
    assert (await rig.timer.sweep()).expired_pending == [start.flow.id]
    record = await rig.engine.inspect(start.flow.id)
    assert record.events[-1].trigger is FlowTrigger.EXPIRE
    assert record.events[-1].actor == "timer"
    assert await _api_pending(rig.engine, start.state) == 410


# ---------------------------------------------------------------------- freezegun


@pytest.fixture(name="frozen_rig")
async def _frozen_rig(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[tuple[Rig, object]]:
    with freeze_time(dt.datetime.fromtimestamp(START, dt.UTC), real_asyncio=True) as frozen:
        async with httpx.AsyncClient(transport=fake.transport()) as client:
            rig = await _make_rig(tmp_path, fake, client, SystemClock())
            try:
                yield rig, frozen
            finally:
                await rig.engine.close()


@pytest.mark.anyio
async def test_freezegun_travel_to_near_expiry(frozen_rig: tuple[Rig, object]) -> None:
    rig, frozen = frozen_rig
    flow_id, first = await _connect(rig)
    assert first.obtained_at == to_ms(START)
    frozen.tick(dt.timedelta(minutes=30))  # type: ignore[attr-defined]
    await rig.timer.sweep()
    assert rig.refreshes() == 0
    frozen.move_to(dt.datetime.fromtimestamp(START + LIFETIME - 60, dt.UTC))  # type: ignore[attr-defined]
    report = await rig.timer.sweep()
    assert report.refreshed == [flow_id]
    assert _timer_events(await rig.states(flow_id)) == [FlowState.REFRESHING, FlowState.STORED]
    second = rig.tokens.read("fake")
    assert second is not None
    assert second.refresh != first.refresh
    assert second.obtained_at == to_ms(START + LIFETIME - 60)


@pytest.mark.anyio
async def test_freezegun_abandoned_eleven_minutes(frozen_rig: tuple[Rig, object]) -> None:
    rig, frozen = frozen_rig
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    frozen.tick(dt.timedelta(minutes=11))  # type: ignore[attr-defined]
    report = await rig.timer.sweep()
    assert report.expired_pending == [start.flow.id]
    assert (await rig.states(start.flow.id))[-1] == (FlowState.EXPIRED, "timer")
    assert await _api_pending(rig.engine, start.state) == 410


# ---------------------------------------------------------------- crash and loop


@pytest.mark.anyio
async def test_start_up_reconciles_a_flow_left_refreshing(rig: Rig) -> None:
    flow_id, tokens = await _connect(rig)
    await rig.engine.begin_refresh(flow_id, actor="cli")  # then the CLI crashed
    _advance(rig, 5)
    await rig.timer.start_up()
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED
    assert (await rig.states(flow_id))[-1] == (FlowState.STORED, "timer")
    assert rig.tokens.read("fake") == tokens


@pytest.mark.anyio
async def test_stale_refreshing_is_reconciled_by_a_sweep(rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    await rig.engine.ledger.set_next_check(flow_id, to_ms(rig.clock.now()))
    await rig.engine.begin_refresh(flow_id, actor="cli")  # then the CLI died
    # the sweep takes the provider's lock at once: nobody holds it, so nobody is refreshing
    await rig.timer.sweep()
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED
    assert flow.error_code == "interrupted"
    assert rig.refreshes() == 0


@pytest.mark.anyio
async def test_one_broken_entry_does_not_stop_the_others(tmp_path: Path, rig: Rig) -> None:
    flow_id, _ = await _connect(rig)
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    # a vault slot that cannot be read (here: a directory where the file should be)
    slot = rig.broker.vault.provider("fake").slot_path(0)
    slot.unlink()
    slot.mkdir()
    await rig.engine.ledger.set_next_check(flow_id, to_ms(rig.clock.now()))
    _advance(rig, 11 * 60)
    report = await rig.timer.sweep()
    assert report.retrying == [flow_id]
    assert report.expired_pending == [start.flow.id]
    nxt = await rig.next_check(flow_id)
    assert nxt is not None
    assert nxt > rig.clock.now()


@pytest.mark.anyio
async def test_run_survives_failing_sweeps_and_keeps_going(rig: Rig) -> None:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
    _advance(rig, 11 * 60)
    await rig.engine.ledger.close()  # every ledger call fails from here on
    sleeps: list[float] = []

    async def fast_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            rig.engine.ledger = await Ledger.open(rig.ledger_path)  # the disk is back
        if len(sleeps) == 4:
            tg.cancel_scope.cancel()
        await anyio.lowlevel.checkpoint()

    timer = RefreshTimer(rig.broker, policy=TimerPolicy(interval=7), sleep=fast_sleep)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(timer.run)
    assert sleeps == [7, 7, 7, 7]
    flow = await rig.engine.get_flow(start.flow.id)
    assert flow.state is FlowState.EXPIRED
    assert (await rig.states(flow.id))[-1] == (FlowState.EXPIRED, "timer")


def test_the_timer_asks_the_broker_only() -> None:
    """No ledger, no token file, no vault: the timer's only collaborator is the facade."""
    import ast

    import flowengine.timer

    source = Path(flowengine.timer.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert imported <= {
        "__future__",
        "collections.abc",
        "dataclasses",
        "typing",
        "broker",
        "clock",
        "errors",
        "schedule",
        "states",
    }, imported
    reached = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
    }
    assert not reached & {"ledger", "tokens", "vault", "engine"}, reached
