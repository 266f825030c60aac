"""Racing writers on one ledger file: tasks, connections and real processes.

Every race must end with exactly one recorded transition; every loser gets
InvalidTransition or ConcurrentUpdateError (CodeAlreadyUsedError for callbacks) and
writes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from flowengine.engine import FlowEngine
from flowengine.errors import (
    BrokerError,
)
from flowengine.ledger import Ledger
from flowengine.models import StartedFlow
from flowengine.protocol import hash_state
from flowengine.states import FlowState, FlowTrigger

from .helpers_flows import code_callback, replay, snapshot

RACER = Path(__file__).with_name("helpers_race.py")
REDIRECT = "https://broker.example.ts.net/oauth/callback"
N_FLOWS = 25


@pytest.fixture(name="db")
def _db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture(name="two_engines")
async def _two_engines(db: Path) -> AsyncIterator[tuple[FlowEngine, FlowEngine]]:
    """Two engines, each with its own aiosqlite connection (thread) on the same file."""
    async with await FlowEngine.open(db) as first, await FlowEngine.open(db) as second:
        yield first, second


async def awaiting(engine: FlowEngine, n: int) -> list[StartedFlow]:
    flows = []
    for _ in range(n):
        started = await engine.start("dexcom", redirect_uri=REDIRECT, actor="bot")
        await engine.issue_url(started.flow.id, actor="bot")
        flows.append(started)
    return flows


async def stored(engine: FlowEngine, n: int) -> list[StartedFlow]:
    flows = await awaiting(engine, n)
    for i, started in enumerate(flows):
        await engine.record_callback(code_callback(started.state, f"c{i}"))
        await engine.take_code(started.state)
        await engine.record_exchange(started.flow.id, actor="bot")
        # a bare STORE: record_stored would supersede the other dexcom connections
        await engine.ledger.transition(
            started.flow.id, FlowTrigger.STORE, actor="bot", at=engine.now_ms()
        )
    return flows


async def outcome(call: Callable[[], Awaitable[Any]]) -> str:
    try:
        await call()
    except BrokerError as err:
        return type(err).__name__
    return "ok"


async def race(*calls: Callable[[], Awaitable[Any]]) -> list[str]:
    """Run the calls at the same time; each one's outcome, in order."""
    results = [""] * len(calls)

    async def run(i: int) -> None:
        results[i] = await outcome(calls[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return results


# ------------------------------------------------------------- two connections, one file


@pytest.mark.anyio
@pytest.mark.parametrize("with_version", [False, True], ids=["plain", "expected_version"])
async def test_two_connections_race_on_every_flow(
    two_engines: tuple[FlowEngine, FlowEngine], db: Path, with_version: bool
) -> None:
    first, second = two_engines
    flows = await stored(first, N_FLOWS)
    before = {f.flow.id: len((await first.inspect(f.flow.id)).events) for f in flows}
    version = 5 if with_version else None
    calls = []
    for started in flows:
        for ledger, actor in ((first.ledger, "api"), (second.ledger, "bot")):

            async def fire(ledger: Ledger = ledger, actor: str = actor, fid: str = started.flow.id):
                return await ledger.transition(
                    fid,
                    FlowTrigger.BEGIN_REFRESH,
                    actor=actor,
                    at=first.now_ms(),
                    expected_version=version,
                )

            calls.append(fire)
    results = await race(*calls)
    losers = {"ConcurrentUpdateError"} if with_version else {"InvalidTransition"}
    for i, started in enumerate(flows):
        pair = results[2 * i : 2 * i + 2]
        assert sorted(pair) == sorted(["ok", *losers]), pair
        record = await second.inspect(started.flow.id)
        assert replay(record.flow, record.events) is FlowState.REFRESHING
        assert len(record.events) == before[started.flow.id] + 1
        winner = ("api", "bot")[pair.index("ok")]
        assert record.events[-1].actor == winner


@pytest.mark.anyio
async def test_two_connections_race_on_one_callback(
    two_engines: tuple[FlowEngine, FlowEngine], db: Path
) -> None:
    first, second = two_engines
    flows = await awaiting(first, N_FLOWS)
    calls = []
    for started in flows:
        for engine, tag in ((first, "A"), (second, "B")):

            async def record(engine: FlowEngine = engine, tag: str = tag, s: str = started.state):
                return await engine.record_callback(code_callback(s, f"code-{tag}"))

            calls.append(record)
    results = await race(*calls)
    pending = {row[0]: row[2] for row in snapshot(db)["oauth_pending"]}
    for i, started in enumerate(flows):
        pair = results[2 * i : 2 * i + 2]
        assert sorted(pair) == ["CodeAlreadyUsedError", "ok"], pair
        winner = "AB"[pair.index("ok")]
        assert pending[hash_state(started.state)] == f"code-{winner}"
        inspected = await first.inspect(started.flow.id)
        assert [e.trigger for e in inspected.events].count(FlowTrigger.RECEIVE_CODE) == 1
        replay(inspected.flow, inspected.events)


@pytest.mark.anyio
async def test_two_connections_race_to_take_one_code(
    two_engines: tuple[FlowEngine, FlowEngine],
) -> None:
    first, second = two_engines
    flows = await awaiting(first, N_FLOWS)
    for i, started in enumerate(flows):
        await first.record_callback(code_callback(started.state, f"code-{i}"))
    got: list[list[str]] = [[] for _ in flows]
    calls = []
    for i, started in enumerate(flows):
        for engine in (first, second):

            async def take(engine: FlowEngine = engine, i: int = i, s: str = started.state):
                got[i].append((await engine.take_code(s)).code)

            calls.append(take)
    results = await race(*calls)
    for i in range(len(flows)):
        assert sorted(results[2 * i : 2 * i + 2]) == ["CodeAlreadyUsedError", "ok"]
        assert got[i] == [f"code-{i}"]


# --------------------------------------------------------------- one process, two tasks


@pytest.mark.anyio
async def test_duplicate_callbacks_in_one_process_record_one_code(db: Path) -> None:
    async with await FlowEngine.open(db) as engine:
        flows = await awaiting(engine, N_FLOWS)
        calls = []
        for started in flows:
            for tag in ("A", "B"):

                async def record(tag: str = tag, s: str = started.state):
                    return await engine.record_callback(code_callback(s, f"code-{tag}"))

                calls.append(record)
        results = await race(*calls)
        pending = {row[0]: row[2] for row in snapshot(db)["oauth_pending"]}
        for i, started in enumerate(flows):
            pair = results[2 * i : 2 * i + 2]
            assert sorted(pair) == ["CodeAlreadyUsedError", "ok"], pair
            assert pending[hash_state(started.state)] == "code-" + "AB"[pair.index("ok")]
            inspected = await engine.inspect(started.flow.id)
            assert replay(inspected.flow, inspected.events) is FlowState.CODE_RECEIVED
            assert len(inspected.events) == 3


@pytest.mark.anyio
async def test_racing_tasks_on_one_engine_begin_refresh_once(db: Path) -> None:
    async with await FlowEngine.open(db) as engine:
        flows = await stored(engine, 5)
        calls = [
            (lambda fid=f.flow.id: engine.begin_refresh(fid, actor="timer", expected_version=5))
            for f in flows
            for _ in range(4)
        ]
        results = await race(*calls)
        for i in range(len(flows)):
            quartet = results[4 * i : 4 * i + 4]
            assert sorted(quartet) == ["ConcurrentUpdateError"] * 3 + ["ok"]
        for started in flows:
            assert (await engine.get_flow(started.flow.id)).version == 6


# ------------------------------------------------------------------- two real processes


def run_racers(db: Path, tmp_path: Path, mode: str, items: list[str]) -> list[dict[str, str]]:
    """Start two racer processes, release them together, return each one's outcomes."""
    go = tmp_path / f"go-{mode}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(RACER), str(db), str(go), mode, json.dumps(items), tag],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("P1", "P2")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    return [json.loads(out.strip().splitlines()[-1]) for out, _err in outputs]


def test_two_processes_race_begin_refresh(db: Path, tmp_path: Path) -> None:
    async def setup() -> list[str]:
        async with await FlowEngine.open(db) as engine:
            return [f.flow.id for f in await stored(engine, N_FLOWS)]

    ids = anyio.run(setup)
    one, two = run_racers(db, tmp_path, "refresh", ids)

    async def check() -> None:
        async with await FlowEngine.open(db) as engine:
            for fid in ids:
                assert sorted([one[fid], two[fid]]) == ["InvalidTransition", "ok"]
                record = await engine.inspect(fid)
                assert replay(record.flow, record.events) is FlowState.REFRESHING
                refreshes = [e for e in record.events if e.trigger is FlowTrigger.BEGIN_REFRESH]
                assert len(refreshes) == 1
                assert record.flow.version == 6

    anyio.run(check)


def test_two_processes_race_on_callbacks(db: Path, tmp_path: Path) -> None:
    async def setup() -> list[str]:
        async with await FlowEngine.open(db) as engine:
            return [f.state for f in await awaiting(engine, N_FLOWS)]

    states = anyio.run(setup)
    one, two = run_racers(db, tmp_path, "callback", states)
    pending = {row[0]: row[2] for row in snapshot(db)["oauth_pending"]}
    assert len(pending) == N_FLOWS
    for state in states:
        pair = [one[state], two[state]]
        assert sorted(pair) == ["CodeAlreadyUsedError", "ok"], pair
        winner = ("P1", "P2")[pair.index("ok")]
        assert pending[hash_state(state)] == f"code-{winner}-{state[:8]}"
    events = snapshot(db)["flow_events"]
    assert sum(1 for e in events if e[5] == FlowTrigger.RECEIVE_CODE.value) == N_FLOWS

    # and then both processes race to take the codes: each is handed out once
    one, two = run_racers(db, tmp_path, "take", states)
    for state in states:
        pair = sorted([one[state], two[state]])
        assert pair == ["CodeAlreadyUsedError", f"ok:{pending[hash_state(state)]}"], pair
    assert all(row[2] is None for row in snapshot(db)["oauth_pending"])
