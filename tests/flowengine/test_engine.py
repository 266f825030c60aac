"""FlowEngine behaviour on a real ledger file: callbacks, codes, secrets, TTLs, recovery."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from freezegun import freeze_time

from flowengine import paths
from flowengine.clock import ManualClock, SystemClock, to_ms
from flowengine.engine import FlowEngine
from flowengine.errors import (
    CodeAlreadyUsedError,
    FlowExpiredError,
    FlowNotFound,
    InvalidTransition,
    StateMismatchError,
)
from flowengine.ledger import SCHEMA_VERSION
from flowengine.models import Flow, PendingStatus, StartedFlow
from flowengine.protocol import CallbackParams, hash_state, new_state
from flowengine.states import (
    Condition,
    ErrorEffect,
    FlowState,
    FlowTrigger,
    Secrets,
    Value,
    effects_of,
)

from .helpers_flows import (
    EDGES,
    EXPECTED_EFFECTS,
    code_callback,
    dump_text,
    edge_id,
    error_callback,
    file_mode,
    path_to,
    replay,
    snapshot,
    table_text,
)

pytestmark = pytest.mark.anyio

REDIRECT = "https://broker.example.ts.net/oauth/callback"
CODE = "authcode-Q7f3kLzP0w9x"
TTL = 600.0
CODE_TTL = 300.0


@pytest.fixture(name="db")
def _db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture(name="engine")
async def _engine(db: Path, clock: ManualClock) -> AsyncIterator[FlowEngine]:
    async with await FlowEngine.open(
        db, clock=clock, awaiting_ttl=TTL, code_ttl=CODE_TTL
    ) as engine:
        yield engine


async def start(engine: FlowEngine, provider: str = "dexcom", *, issue: bool = True) -> StartedFlow:
    started = await engine.start(provider, redirect_uri=REDIRECT, scopes=["egv"], actor="bot")
    if issue:
        await engine.issue_url(started.flow.id, actor="bot")
    return started


async def to_stored(engine: FlowEngine, provider: str = "dexcom") -> StartedFlow:
    started = await start(engine, provider)
    await engine.record_callback(code_callback(started.state, CODE))
    await engine.take_code(started.state)
    await engine.record_exchange(started.flow.id, actor="bot")
    await engine.record_stored(started.flow.id, actor="bot", token_expires_at=None)
    return started


async def check_history(engine: FlowEngine, flow_id: str) -> list[FlowState]:
    record = await engine.inspect(flow_id)
    replay(record.flow, record.events)
    return [e.to_state for e in record.events]


# -------------------------------------------------------------------------- starting


async def test_start_creates_a_flow_with_secrets_handed_to_the_caller_only(
    engine: FlowEngine, db: Path, clock: ManualClock
) -> None:
    started = await start(engine, issue=False)
    flow = started.flow
    assert flow.state is FlowState.INITIATED
    assert flow.deadline == to_ms(clock.now() + TTL)
    assert len(started.state) >= 43
    assert started.code_verifier is not None
    assert await engine.code_verifier(flow.id) == started.code_verifier
    assert started.state not in repr(started)
    assert started.code_verifier not in repr(started)
    clock.advance(5)
    issued = await engine.issue_url(flow.id, actor="bot")
    assert issued.state is FlowState.AWAITING_CODE
    assert issued.deadline == to_ms(clock.now() + TTL), "issuing the link restarts the TTL"
    text = table_text(db, "flows", "flow_events")
    assert started.state not in text
    assert started.code_verifier not in text


async def test_start_without_pkce(engine: FlowEngine) -> None:
    started = await engine.start("strava", redirect_uri=REDIRECT, use_pkce=False, actor="cli")
    assert started.code_verifier is None
    assert started.flow.uses_pkce is False
    assert await engine.code_verifier(started.flow.id) is None


async def test_unknown_actor_is_refused_and_nothing_is_written(
    engine: FlowEngine, db: Path
) -> None:
    started = await start(engine)
    before = snapshot(db)
    with pytest.raises(ValueError, match="unknown actor"):
        await engine.start("dexcom", redirect_uri=REDIRECT, actor="mallory")
    with pytest.raises(ValueError, match="unknown actor"):
        await engine.cancel(started.flow.id, actor="mallory")
    with pytest.raises(ValueError, match="unknown actor"):
        await engine.record_callback(code_callback(started.state), actor="mallory")
    assert snapshot(db) == before


# -------------------------------------------------------------------------- callback


async def test_callback_with_an_unknown_state_stores_nothing(engine: FlowEngine, db: Path) -> None:
    await start(engine)
    before = snapshot(db)
    with pytest.raises(StateMismatchError) as info:
        await engine.record_callback(code_callback(new_state(), CODE))
    assert CODE not in str(info.value)
    with pytest.raises(StateMismatchError):
        await engine.record_callback(error_callback(new_state()))
    assert snapshot(db) == before
    assert CODE not in dump_text(db)


async def test_callback_with_a_code(engine: FlowEngine, db: Path, clock: ManualClock) -> None:
    started = await start(engine)
    clock.advance(30)
    flow = await engine.record_callback(code_callback(started.state, CODE), actor="api")
    assert flow.state is FlowState.CODE_RECEIVED
    assert flow.deadline == to_ms(clock.now() + CODE_TTL)
    status = await engine.pending_status(started.state)
    assert (status.status, status.flow_state, status.received_at) == (
        "ready",
        FlowState.CODE_RECEIVED,
        to_ms(clock.now()),
    )
    assert snapshot(db)["oauth_pending"] == [
        (hash_state(started.state), flow.id, CODE, to_ms(clock.now()), None)
    ]
    assert await check_history(engine, flow.id) == [
        FlowState.INITIATED,
        FlowState.AWAITING_CODE,
        FlowState.CODE_RECEIVED,
    ]


async def test_callback_before_the_link_was_recorded_keeps_the_ledger_in_order(
    engine: FlowEngine,
) -> None:
    started = await start(engine, issue=False)
    flow = await engine.record_callback(code_callback(started.state, CODE))
    record = await engine.inspect(flow.id)
    assert [e.trigger for e in record.events] == [
        None,
        FlowTrigger.ISSUE_URL,
        FlowTrigger.RECEIVE_CODE,
    ]
    assert {e.actor for e in record.events[1:]} == {"api"}


async def test_access_denied_fails_the_flow_with_the_providers_error(
    engine: FlowEngine, db: Path
) -> None:
    started = await start(engine)
    flow = await engine.record_callback(
        error_callback(started.state, "access_denied", "The user denied access")
    )
    assert flow.state is FlowState.FAILED
    assert (flow.error_code, flow.error_description, flow.deadline) == (
        "access_denied",
        "The user denied access",
        None,
    )
    assert await engine.code_verifier(flow.id) is None
    status = await engine.pending_status(started.state)
    assert (status.status, status.reason, status.error_code, status.error_description) == (
        "gone",
        "failed",
        "access_denied",
        "The user denied access",
    )
    events = (await engine.inspect(flow.id)).events
    assert (events[-1].trigger, events[-1].detail) == (FlowTrigger.DENY, {"error": "access_denied"})
    assert snapshot(db)["oauth_pending"] == []
    with pytest.raises(FlowExpiredError):
        await engine.take_code(started.state)
    # the provider redirecting again changes nothing
    before = snapshot(db)
    with pytest.raises(FlowExpiredError) as info:
        await engine.record_callback(code_callback(started.state, CODE))
    assert info.value.state == "failed"
    assert snapshot(db) == before


async def test_a_second_callback_is_refused_and_the_first_code_kept(
    engine: FlowEngine, db: Path
) -> None:
    started = await start(engine)
    await engine.record_callback(code_callback(started.state, CODE))
    before = snapshot(db)
    for again in (code_callback(started.state, "another-code"), error_callback(started.state)):
        with pytest.raises(CodeAlreadyUsedError) as info:
            await engine.record_callback(again)
        assert "another-code" not in str(info.value)
    assert snapshot(db) == before
    assert (await engine.take_code(started.state)).code == CODE


# ---------------------------------------------------------------------- code hand-out


async def test_take_code_hands_the_code_out_exactly_once(engine: FlowEngine, db: Path) -> None:
    started = await start(engine)
    with pytest.raises(CodeAlreadyUsedError, match="no code has arrived"):
        await engine.take_code(started.state)
    assert (await engine.pending_status(started.state)).status == "waiting"
    await engine.record_callback(code_callback(started.state, CODE))
    taken = await engine.take_code(started.state)
    assert (taken.flow_id, taken.code) == (started.flow.id, CODE)
    assert CODE not in repr(taken)
    with pytest.raises(CodeAlreadyUsedError, match="already handed out"):
        await engine.take_code(started.state)
    assert (await engine.pending_status(started.state)).status == "consumed"
    assert CODE not in dump_text(db)


async def test_pending_status_of_an_unknown_state(engine: FlowEngine) -> None:
    with pytest.raises(FlowNotFound):
        await engine.pending_status(new_state())
    with pytest.raises(FlowNotFound):
        await engine.take_code(new_state())


# ---------------------------------------------------------------------- the verifier


async def test_verifier_is_dropped_at_the_exchange(engine: FlowEngine) -> None:
    started = await start(engine)
    await engine.record_callback(code_callback(started.state, CODE))
    await engine.take_code(started.state)
    assert await engine.code_verifier(started.flow.id) == started.code_verifier
    flow = await engine.record_exchange(started.flow.id, actor="bot", detail={"scope": "egv"})
    assert (flow.state, flow.deadline) == (FlowState.EXCHANGED, None)
    assert await engine.code_verifier(flow.id) is None


async def test_verifier_is_dropped_when_the_exchange_fails(engine: FlowEngine) -> None:
    started = await start(engine)
    await engine.record_callback(code_callback(started.state, CODE))
    await engine.take_code(started.state)
    flow = await engine.record_exchange_failed(
        started.flow.id, actor="bot", error_code="invalid_grant", description="code expired"
    )
    assert (flow.state, flow.error_code, flow.error_description) == (
        FlowState.FAILED,
        "invalid_grant",
        "code expired",
    )
    assert await engine.code_verifier(flow.id) is None


@pytest.mark.parametrize("ending", ["expire", "cancel"])
async def test_verifier_is_dropped_when_the_flow_ends(engine: FlowEngine, ending: str) -> None:
    started = await start(engine)
    if ending == "expire":
        flow = await engine.expire(started.flow.id, actor="timer", reason="ttl")
        assert (flow.state, flow.error_code) == (FlowState.EXPIRED, "ttl")
    else:
        flow = await engine.cancel(started.flow.id, actor="bot")
        assert flow.state is FlowState.CANCELLED
    assert flow.deadline is None
    assert await engine.code_verifier(flow.id) is None
    status = await engine.pending_status(started.state)
    assert (status.status, status.reason) == ("gone", flow.state.value)


async def test_store_failed(engine: FlowEngine) -> None:
    started = await start(engine)
    await engine.record_callback(code_callback(started.state, CODE))
    await engine.take_code(started.state)
    await engine.record_exchange(started.flow.id, actor="bot")
    flow = await engine.record_store_failed(started.flow.id, actor="bot", description="disk full")
    assert (flow.state, flow.error_code, flow.error_description) == (
        FlowState.FAILED,
        "store_failed",
        "disk full",
    )


# ------------------------------------------------------------------------ secrets scan


async def test_no_secret_reaches_the_flow_tables_and_none_survives_the_flow(
    engine: FlowEngine, db: Path
) -> None:
    started = await start(engine)
    verifier = started.code_verifier
    assert verifier is not None
    await engine.record_callback(code_callback(started.state, CODE))

    # before the hand-out the code lives in oauth_pending.code and nowhere else
    snap = snapshot(db)
    holders = {table for table, rows in snap.items() if any(CODE in repr(row) for row in rows)}
    assert holders == {"oauth_pending"}
    assert [row[2] for row in snap["oauth_pending"]] == [CODE]
    assert {t for t, rows in snap.items() if any(verifier in repr(r) for r in rows)} == {
        "flow_secrets"
    }

    await engine.take_code(started.state)
    await engine.record_exchange(started.flow.id, actor="bot", detail={"token_type": "Bearer"})
    await engine.record_stored(started.flow.id, actor="bot", token_expires_at=123)
    await engine.begin_refresh(started.flow.id, actor="timer")
    await engine.record_refreshed(started.flow.id, actor="timer", token_expires_at=456)

    text = dump_text(db)
    assert CODE not in text
    assert verifier not in text
    flow_text = table_text(db, "flows", "flow_events")
    for secret in (CODE, verifier, started.state):
        assert secret not in flow_text
    await engine.close()
    # nothing left in the file's free space either (secure_delete)
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    assert CODE.encode() not in raw
    assert verifier.encode() not in raw


async def test_event_detail_with_a_secret_key_is_refused(engine: FlowEngine, db: Path) -> None:
    started = await start(engine)
    await engine.record_callback(code_callback(started.state, CODE))
    await engine.take_code(started.state)
    before = snapshot(db)
    with pytest.raises(ValueError, match="secrets"):
        await engine.record_exchange(
            started.flow.id, actor="bot", detail={"access_token": "tok-123"}
        )
    with pytest.raises(ValueError, match="secrets"):
        await engine.record_exchange(
            started.flow.id, actor="bot", detail={"response": {"refresh_token": "tok-456"}}
        )
    assert snapshot(db) == before
    assert "tok-" not in dump_text(db)


# ----------------------------------------------------------------------- connections


async def test_record_stored_supersedes_the_older_connection(
    engine: FlowEngine, clock: ManualClock
) -> None:
    first = await to_stored(engine, "dexcom")
    clock.advance(10)
    other_provider = await to_stored(engine, "oura")
    clock.advance(10)
    expired = await to_stored(engine, "dexcom")
    # the second dexcom connection superseded the first one
    assert (await engine.get_flow(first.flow.id)).state is FlowState.SUPERSEDED
    await engine.expire(expired.flow.id, actor="timer", reason="invalid_grant")
    clock.advance(10)
    newest = await to_stored(engine, "dexcom")
    superseded = await engine.get_flow(expired.flow.id)
    assert superseded.state is FlowState.SUPERSEDED
    events = (await engine.inspect(superseded.id)).events
    assert (events[-1].trigger, events[-1].detail) == (
        FlowTrigger.SUPERSEDE,
        {"by": newest.flow.id},
    )
    assert (await engine.get_flow(other_provider.flow.id)).state is FlowState.STORED
    connection = await engine.connection("dexcom")
    assert connection is not None
    assert connection.id == newest.flow.id
    assert [f.id for f in await engine.connections()] == [newest.flow.id, other_provider.flow.id]
    assert await engine.connection("withings") is None
    for flow_id in (first.flow.id, expired.flow.id, newest.flow.id):
        await check_history(engine, flow_id)


async def test_refresh_cycle_and_failures(engine: FlowEngine, clock: ManualClock) -> None:
    started = await to_stored(engine)
    fid = started.flow.id
    flow = await engine.begin_refresh(fid, actor="timer", expected_version=5)
    assert flow.state is FlowState.REFRESHING
    with pytest.raises(InvalidTransition):
        await engine.begin_refresh(fid, actor="timer")
    flow = await engine.record_refresh_failed(
        fid, actor="timer", permanent=False, error_code="temporarily_unavailable"
    )
    assert (flow.state, flow.error_code) == (FlowState.STORED, "temporarily_unavailable")
    assert await engine.ledger.next_check_at(fid) == engine.now_ms() + 60_000
    await engine.begin_refresh(fid, actor="timer")
    flow = await engine.record_refreshed(fid, actor="timer", token_expires_at=999, next_check_at=5)
    assert (flow.state, flow.token_expires_at, flow.error_code) == (FlowState.STORED, 999, None)
    assert await engine.ledger.next_check_at(fid) == 5
    await engine.begin_refresh(fid, actor="timer")
    flow = await engine.record_refresh_failed(
        fid, actor="timer", permanent=True, error_code="invalid_grant", description="revoked"
    )
    assert (flow.state, flow.error_code, flow.error_description) == (
        FlowState.EXPIRED,
        "invalid_grant",
        "revoked",
    )
    assert await engine.ledger.next_check_at(fid) is None
    flow = await engine.revoke(fid, actor="cli", detail={"remote": False})
    assert flow.state is FlowState.REVOKED
    assert await check_history(engine, fid) == [
        FlowState.INITIATED,
        FlowState.AWAITING_CODE,
        FlowState.CODE_RECEIVED,
        FlowState.EXCHANGED,
        FlowState.STORED,
        FlowState.REFRESHING,
        FlowState.STORED,
        FlowState.REFRESHING,
        FlowState.STORED,
        FlowState.REFRESHING,
        FlowState.EXPIRED,
        FlowState.REVOKED,
    ]


# --------------------------------------------------------------------- TTL and expiry


async def test_sweep_expires_an_abandoned_flow_with_a_manual_clock(
    engine: FlowEngine, clock: ManualClock, db: Path
) -> None:
    abandoned = await start(engine)
    clock.advance(TTL - 1)
    fresh = await start(engine)
    assert await engine.sweep_expired() == []
    clock.advance(1)
    swept = await engine.sweep_expired()
    assert [f.id for f in swept] == [abandoned.flow.id]
    assert swept[0].state is FlowState.EXPIRED
    events = (await engine.inspect(abandoned.flow.id)).events
    assert (events[-1].trigger, events[-1].actor, events[-1].detail) == (
        FlowTrigger.EXPIRE,
        "timer",
        {"reason": "ttl"},
    )
    status = await engine.pending_status(abandoned.state)
    assert (status.status, status.reason) == ("gone", "expired")
    with pytest.raises(FlowExpiredError):
        await engine.take_code(abandoned.state)
    with pytest.raises(FlowExpiredError):
        await engine.record_callback(code_callback(abandoned.state, CODE))
    assert (await engine.get_flow(fresh.flow.id)).state is FlowState.AWAITING_CODE
    assert await engine.sweep_expired() == []
    assert CODE not in dump_text(db)


async def test_sweep_expires_a_flow_with_freezegun_and_the_system_clock(db: Path) -> None:
    with freeze_time("2026-03-01 12:00:00", real_asyncio=True) as frozen:
        async with await FlowEngine.open(db, clock=SystemClock(), awaiting_ttl=TTL) as engine:
            started = await start(engine)
            assert started.flow.created_at == to_ms(time.time())
            frozen.tick(TTL - 1)
            assert await engine.sweep_expired() == []
            await anyio.sleep(0.01)  # real_asyncio: sleeping works while time is frozen
            frozen.tick(2)
            swept = await engine.sweep_expired()
            assert [f.id for f in swept] == [started.flow.id]
            status = await engine.pending_status(started.state)
            assert (status.status, status.reason, status.flow_state) == (
                "gone",
                "expired",
                FlowState.EXPIRED,
            )
            with pytest.raises(FlowExpiredError) as info:
                await engine.take_code(started.state)
            assert info.value.state == "expired"
            assert swept[0].updated_at == to_ms(time.time())


async def test_an_overdue_flow_expires_on_the_next_look(
    engine: FlowEngine, clock: ManualClock, db: Path
) -> None:
    """No sweep needed: a late callback or poll expires the flow itself."""
    late_callback = await start(engine)
    late_poll = await start(engine)
    clock.advance(TTL + 1)
    with pytest.raises(FlowExpiredError):
        await engine.record_callback(code_callback(late_callback.state, CODE))
    assert (await engine.get_flow(late_callback.flow.id)).state is FlowState.EXPIRED
    assert snapshot(db)["oauth_pending"] == []
    status = await engine.pending_status(late_poll.state)
    assert (status.status, status.reason) == ("gone", "expired")


async def test_an_untaken_code_expires_and_is_wiped(
    engine: FlowEngine, clock: ManualClock, db: Path
) -> None:
    started = await start(engine)
    await engine.record_callback(code_callback(started.state, CODE))
    clock.advance(CODE_TTL)
    assert [f.id for f in await engine.sweep_expired()] == [started.flow.id]
    with pytest.raises(FlowExpiredError):
        await engine.take_code(started.state)
    assert CODE not in dump_text(db)


# ------------------------------------------------------------------------ wait_pending


async def test_wait_pending_wakes_on_a_callback_in_the_same_process(db: Path) -> None:
    # the ledger is re-read only every minute and the waiter waits up to two: an answer
    # within the 30 s bound can only come from the in-process signal (its latency is
    # measured by benchmarks/bench_api.py, not asserted here)
    async with await FlowEngine.open(db, poll_interval=60.0) as engine:
        started = await start(engine)
        statuses: list[PendingStatus] = []

        async def waiter() -> None:
            statuses.append(await engine.wait_pending(started.state, timeout=120))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                while started.flow.id not in engine._changes:
                    await anyio.sleep(0.01)  # the waiter is parked
                await engine.record_callback(code_callback(started.state, CODE))
        assert [s.status for s in statuses] == ["ready"]


async def test_wait_pending_sees_another_engine_through_watch_external(db: Path) -> None:
    # no signal crosses engines: the poller's watcher finds the commit (one look a 50 ms)
    async with (
        await FlowEngine.open(db) as api,
        await FlowEngine.open(db, poll_interval=0.05) as poller,
    ):
        started = await start(api)
        statuses: list[PendingStatus] = []

        async def waiter() -> None:
            statuses.append(await poller.wait_pending(started.state, timeout=120))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(poller.watch_external)
                async with anyio.create_task_group() as waiting:
                    waiting.start_soon(waiter)
                    while started.flow.id not in poller._changes:
                        await anyio.sleep(0.01)
                    await api.record_callback(code_callback(started.state, CODE))
                tg.cancel_scope.cancel()
        assert [s.status for s in statuses] == ["ready"]


async def test_wait_pending_times_out_waiting_and_wakes_on_cancel(db: Path) -> None:
    async with await FlowEngine.open(db, poll_interval=60.0) as engine:
        started = await start(engine)
        status = await engine.wait_pending(started.state, timeout=0.05)
        assert status.status == "waiting"
        assert (await engine.wait_pending(started.state, timeout=0)).status == "waiting"

        results = []

        async def waiter() -> None:
            results.append(await engine.wait_pending(started.state, timeout=120))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                while started.flow.id not in engine._changes:
                    await anyio.sleep(0.01)  # parked
                await engine.cancel(started.flow.id, actor="bot")
        assert (results[0].status, results[0].reason) == ("gone", "cancelled")


# --------------------------------------------------------------------------- wait_flow


def _ended(flow: Flow) -> bool:
    return flow.state not in (FlowState.INITIATED, FlowState.AWAITING_CODE)


async def test_wait_flow_wakes_every_waiter_on_the_transition_and_leaves_nothing(
    engine: FlowEngine,
) -> None:
    started = await start(engine)
    seen: list[FlowState] = []

    async def waiter(timeout: float) -> None:
        flow = await engine.wait_flow(started.flow.id, until=_ended, timeout=timeout)
        seen.append(flow.state)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter, 30)
            tg.start_soon(waiter, 0.01)  # gives up first: must not strand the others
            await anyio.sleep(0.1)
            assert len(engine._changes) == 1
            await engine.cancel(started.flow.id, actor="bot")
    assert sorted(s.value for s in seen) == ["awaiting_code", *["cancelled"] * 3]
    assert engine._changes == {}


async def test_wait_flow_returns_at_once_or_after_the_timeout(engine: FlowEngine) -> None:
    started = await start(engine)
    flow = await engine.wait_flow(started.flow.id, until=lambda f: True, timeout=30)
    assert flow.state is FlowState.AWAITING_CODE
    flow = await engine.wait_flow(started.flow.id, until=_ended, timeout=0.05)
    assert flow.state is FlowState.AWAITING_CODE
    assert engine._changes == {}
    with pytest.raises(FlowNotFound):
        await engine.wait_flow("nope", until=_ended, timeout=1)


async def test_watch_external_wakes_only_flows_another_process_moved(db: Path) -> None:
    async with (
        await FlowEngine.open(db) as other,
        await FlowEngine.open(db, poll_interval=0.02) as engine,
    ):
        moved, untouched = await start(other), await start(other)
        results: dict[str, FlowState] = {}

        async def waiter(flow_id: str, timeout: float) -> None:
            flow = await engine.wait_flow(flow_id, until=_ended, timeout=timeout)
            results[flow_id] = flow.state

        reads = 0
        real_get = engine.ledger.get

        async def counting_get(flow_id: str) -> Flow | None:
            nonlocal reads
            reads += 1
            return await real_get(flow_id)

        engine.ledger.get = counting_get  # type: ignore[method-assign]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.watch_external)
                async with anyio.create_task_group() as waiting:
                    waiting.start_soon(waiter, moved.flow.id, 30)
                    waiting.start_soon(waiter, untouched.flow.id, 2)
                    await anyio.sleep(0.3)  # many watcher looks, nothing changed
                    assert reads == 2  # each waiter read its flow once: nobody polls
                    await other.cancel(moved.flow.id, actor="cli")
                tg.cancel_scope.cancel()
        assert results == {
            moved.flow.id: FlowState.CANCELLED,
            untouched.flow.id: FlowState.AWAITING_CODE,
        }
        assert reads == 3  # only the moved flow was read again


# --------------------------------------------------------------------------- recovery


async def test_recover_expires_overdue_flows_and_reports_interrupted_ones(
    engine: FlowEngine, clock: ManualClock
) -> None:
    overdue = await start(engine)
    clock.advance(TTL + 1)
    waiting = await start(engine)
    received = await start(engine)
    await engine.record_callback(code_callback(received.state, CODE))
    exchanged = await start(engine)
    await engine.record_callback(code_callback(exchanged.state, "c2"))
    await engine.take_code(exchanged.state)
    await engine.record_exchange(exchanged.flow.id, actor="bot")
    refreshing = await to_stored(engine, "oura")
    await engine.begin_refresh(refreshing.flow.id, actor="timer")
    stored = await to_stored(engine, "withings")

    report = await engine.recover()
    assert [f.id for f in report.expired] == [overdue.flow.id]
    assert [f.id for f in report.refreshing] == [refreshing.flow.id]
    assert [f.id for f in report.exchanged] == [exchanged.flow.id]
    assert {f.id for f in report.waiting} == {waiting.flow.id, received.flow.id}
    mentioned = {
        f.id for part in (report.expired, report.refreshing, report.exchanged) for f in part
    }
    assert stored.flow.id not in mentioned | {f.id for f in report.waiting}
    # recovery is idempotent: the second run expires nothing new
    again = await engine.recover()
    assert again.expired == []
    assert [f.id for f in again.refreshing] == [refreshing.flow.id]


# ---------------------------------------------------------------- reading and the file


async def test_inspect_and_list_flows(engine: FlowEngine, clock: ManualClock) -> None:
    a = await start(engine, "dexcom")
    clock.advance(1)
    b = await to_stored(engine, "oura")
    record = await engine.inspect(b.flow.id)
    assert record.flow.state is FlowState.STORED
    assert [e["to"] for e in record.public()["events"]] == [
        "initiated",
        "awaiting_code",
        "code_received",
        "exchanged",
        "stored",
    ]
    assert [f.id for f in await engine.list_flows()] == [b.flow.id, a.flow.id]
    assert [f.id for f in await engine.list_flows(states=["stored"])] == [b.flow.id]
    assert [f.id for f in await engine.list_flows(provider="dexcom")] == [a.flow.id]
    with pytest.raises(ValueError, match="not a valid FlowState"):
        await engine.list_flows(states=["nonsense"])
    with pytest.raises(FlowNotFound):
        await engine.inspect("nope")


async def test_notifications_through_the_engine(engine: FlowEngine) -> None:
    nid = await engine.notify(kind="expired", provider="dexcom", reason="invalid_grant")
    assert [n.id for n in await engine.notifications()] == [nid]
    assert await engine.mark_delivered(nid) is True
    assert await engine.notifications() == []


async def test_default_ledger_path_is_private_and_reopens(clock: ManualClock) -> None:
    path = paths.ledger_path()
    async with await FlowEngine.open(path, clock=clock) as engine:
        started = await to_stored(engine)
        assert await engine.ledger.schema_version() == SCHEMA_VERSION
    assert file_mode(path) == 0o600
    async with await FlowEngine.open(path, clock=clock) as engine:
        assert (await engine.get_flow(started.flow.id)).state is FlowState.STORED
        assert await engine.ledger.schema_version() == SCHEMA_VERSION
        await engine.begin_refresh(started.flow.id, actor="timer")
        await check_history(engine, started.flow.id)
    assert [r[0] for r in snapshot(path)["schema_migrations"]] == list(range(1, SCHEMA_VERSION + 1))


async def test_callback_params_keep_secrets_out_of_repr() -> None:
    params = CallbackParams(state="s" * 43, code=CODE)
    assert CODE not in repr(params)
    assert "s" * 43 not in repr(params)


# ----------------------------------------------------------- the device grant (RFC 8628)


async def start_device(engine: FlowEngine, *, expires_in: int = 600) -> StartedFlow:
    started = await engine.start(
        "github", redirect_uri=REDIRECT, scopes=["repo"], actor="bot", grant="device"
    )
    await engine.issue_device_code(
        started.flow.id,
        actor="bot",
        device_code="dev-" + "x" * 40,
        user_code="ABCD-EFGH",
        verification_uri="https://github.com/login/device",
        interval=5,
        expires_in=expires_in,
    )
    return started


async def test_a_device_flow_has_no_redirect_and_no_verifier(
    engine: FlowEngine, clock: ManualClock
) -> None:
    started = await start_device(engine)
    flow = await engine.get_flow(started.flow.id)
    assert (flow.state, flow.grant, flow.redirect_uri, flow.uses_pkce) == (
        FlowState.AWAITING_DEVICE,
        "device",
        "",
        False,
    )
    assert started.code_verifier is None
    assert flow.deadline == to_ms(clock.now()) + 600_000
    assert await engine.device_interval(flow.id) == 5
    await engine.record_slow_down(flow.id, actor="bot", interval=10)
    assert await engine.device_interval(flow.id) == 10
    status = await engine.pending_status(started.state)
    assert (status.status, status.flow_state) == ("waiting", FlowState.AWAITING_DEVICE)
    report = await engine.recover()
    assert [f.id for f in report.waiting] == [flow.id]
    assert await check_history(engine, flow.id) == [
        FlowState.INITIATED,
        FlowState.AWAITING_DEVICE,
        FlowState.AWAITING_DEVICE,
    ]


async def test_the_timer_expires_a_device_code_nobody_entered(
    engine: FlowEngine, clock: ManualClock, db: Path
) -> None:
    started = await start_device(engine, expires_in=30)
    assert await engine.sweep_expired() == []
    clock.advance(31)
    (expired,) = await engine.sweep_expired()
    assert (expired.id, expired.state, expired.error_code) == (
        started.flow.id,
        FlowState.EXPIRED,
        "ttl",
    )
    assert await engine.device_secrets(started.flow.id) is None
    assert "dev-" + "x" * 40 not in dump_text(db)


async def test_denied_and_cancelled_device_flows(engine: FlowEngine) -> None:
    denied = await start_device(engine)
    flow = await engine.record_denied(
        denied.flow.id, actor="bot", error="access_denied", description="no"
    )
    assert (flow.state, flow.error_code, flow.error_description) == (
        FlowState.FAILED,
        "access_denied",
        "no",
    )
    assert await engine.device_secrets(flow.id) is None
    cancelled = await start_device(engine)
    flow = await engine.cancel(cancelled.flow.id, actor="cli")
    assert (flow.state, flow.error_code) == (FlowState.CANCELLED, None)
    assert await engine.device_secrets(flow.id) is None
    why = await engine.start("github", redirect_uri="", actor="bot", grant="device")
    flow = await engine.cancel(why.flow.id, actor="bot", reason="invalid_scope")
    assert (flow.state, flow.error_code) == (FlowState.CANCELLED, "invalid_scope")
    assert (await engine.inspect(flow.id)).events[-1].detail == {"reason": "invalid_scope"}


# --------------------------------------------------------------------- the effects


_SENTINELS = {
    "deadline": 111,
    "next_check_at": 222,
    "token_expires_at": 333,
    "error_code": "old_error",
    "error_description": "what an earlier move said",
}
_GIVEN = {
    "error": "some_error",
    "description": "what the provider said",
    "token_expires_at": 1_900_000_000_000,
    "next_check_at": 1_800_000_500_000,
    "deadline": 1_800_000_900_000,
}


def _required(trigger: FlowTrigger, condition: Condition | None, state: str) -> dict[str, Any]:
    """What a move cannot do without: a device code's validity and secrets, the code."""
    fx = effects_of(trigger, condition)
    out: dict[str, object] = {}
    if fx.deadline is Value.VALID_FOR:
        out["valid_for"] = 45_000
    if fx.secrets is Secrets.STORE_DEVICE:
        out["device_secrets"] = ("dev-" + "d" * 30, "WDJB-MJHT")
    if fx.secrets is Secrets.STORE_CODE:
        out["pending_code"] = (state, CODE)
    return out


def _optional(trigger: FlowTrigger, condition: Condition | None) -> dict[str, Any]:
    """Every other value the row's effects take."""
    fx = effects_of(trigger, condition)
    out: dict[str, object] = {}
    if fx.error in (ErrorEffect.SET, ErrorEffect.NOTE):
        out.update(error=_GIVEN["error"], description=_GIVEN["description"])
    if fx.token_expires_at is Value.GIVEN:
        out["token_expires_at"] = _GIVEN["token_expires_at"]
    if fx.next_check_at in (Value.GIVEN, Value.GIVEN_OR_NOW, Value.GIVEN_OR_RETRY):
        out["next_check_at"] = _GIVEN["next_check_at"]
    if fx.deadline is Value.GIVEN_OR_LINK_TTL:
        out["deadline"] = _GIVEN["deadline"]
    return out


def _expected_column(rule: Value, old: object, given: object, now: int) -> object:
    """The reference model of one time column after a move (EXPECTED_EFFECTS' words)."""
    return {
        Value.KEEP: old,
        Value.CLEAR: None,
        Value.GIVEN: given,
        Value.GIVEN_OR_NOW: now if given is None else given,
        Value.GIVEN_OR_RETRY: now + 60_000 if given is None else given,
        Value.VALID_FOR: now + 45_000,
        Value.GIVEN_OR_LINK_TTL: now + to_ms(TTL) if given is None else given,
        Value.CODE_TTL: now + to_ms(CODE_TTL),
    }[rule]


@pytest.mark.parametrize("given", [True, False], ids=["values-given", "defaults"])
@pytest.mark.parametrize("edge", EDGES, ids=edge_id)
async def test_the_engine_applies_each_edges_declared_effects(
    engine: FlowEngine,
    db: Path,
    clock: ManualClock,
    edge: tuple[FlowState, FlowTrigger, Condition | None, FlowState],
    given: bool,
) -> None:
    source, trigger, condition, dest = edge
    steps = path_to(source)
    device = any(t is FlowTrigger.ISSUE_DEVICE_CODE for t, _ in steps)
    started = await engine.start(
        "dexcom", redirect_uri=REDIRECT, actor="test", grant="device" if device else "code"
    )
    flow_id = started.flow.id
    for step, cond in steps:
        await engine.move(
            flow_id, step, actor="test", condition=cond, **_required(step, cond, started.state)
        )
    # every column holds something, so keeping and clearing can be told apart
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE flows SET deadline = ?, next_check_at = ?, token_expires_at = ?,"
            " error_code = ?, error_description = ? WHERE id = ?",
            (*_SENTINELS.values(), flow_id),
        )
    conn.close()
    had_verifier = await engine.code_verifier(flow_id) is not None
    clock.advance(7)
    now = to_ms(clock.now())
    values = {
        **_required(trigger, condition, started.state),
        **(_optional(trigger, condition) if given else {}),
    }
    fx = EXPECTED_EFFECTS[(trigger, condition)]

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(engine.wait_flow, flow_id, until=lambda f: False, timeout=30))
        with anyio.fail_after(10):
            while flow_id not in engine._changes:
                await anyio.sleep(0.001)
        waiters = engine._changes[flow_id]
        flow = await engine.move(flow_id, trigger, actor="test", condition=condition, **values)
        assert waiters.event.is_set() is fx.wakes
        tg.cancel_scope.cancel()

    assert flow.state is dest
    for column, rule in (
        ("deadline", fx.deadline),
        ("next_check_at", fx.next_check_at),
        ("token_expires_at", fx.token_expires_at),
    ):
        want = _expected_column(rule, _SENTINELS[column], values.get(column), now)
        if column == "next_check_at":
            assert await engine.next_check_at(flow_id) == want, column
        else:
            assert getattr(flow, column) == want, column
    old_error = (_SENTINELS["error_code"], _SENTINELS["error_description"])
    got_error = (flow.error_code, flow.error_description)
    new_error = (values.get("error"), values.get("description"))
    if fx.error is ErrorEffect.KEEP:
        assert got_error == old_error
    elif fx.error is ErrorEffect.CLEAR:
        assert got_error == (None, None)
    elif fx.error is ErrorEffect.SET:
        assert got_error == new_error
    else:  # NOTE: what is given, the rest kept
        assert got_error == (new_error if given else old_error)
    event = (await engine.inspect(flow_id)).events[-1]
    if fx.error_key is not None and given:
        assert event.detail[fx.error_key] == _GIVEN["error"]
    else:
        assert not set(event.detail) & {"error", "reason"}

    verifier = await engine.code_verifier(flow_id)
    device_secrets = await engine.device_secrets(flow_id)
    pending = snapshot(db)["oauth_pending"]
    if fx.secrets is Secrets.DROP:
        assert (verifier, device_secrets) == (None, None)
        assert all(row[2] is None for row in pending)
    elif fx.secrets is Secrets.STORE_DEVICE:
        assert device_secrets == values["device_secrets"]
    elif fx.secrets is Secrets.STORE_CODE:
        assert [row[2] for row in pending] == [CODE]
    else:
        assert (verifier is not None) is had_verifier


async def test_a_move_refuses_a_value_its_effects_do_not_take(engine: FlowEngine, db: Path) -> None:
    started = await start(engine)
    before = snapshot(db)
    with pytest.raises(ValueError, match="token_expires_at"):
        await engine.move(started.flow.id, FlowTrigger.CANCEL, actor="bot", token_expires_at=1)
    with pytest.raises(ValueError, match="error"):
        await engine.move(started.flow.id, FlowTrigger.BEGIN_REFRESH, actor="bot", error="x")
    assert snapshot(db) == before
