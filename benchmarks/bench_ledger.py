"""Ledger and engine figures on a large ledger (``make bench``; not a timed test).

Builds a ledger file with 10,000 flows and about 1,000,000 events (bulk load through
sqlite3.executemany: 9,000 long-lived connections with 111 events each, 1,000 pending
flows, 500 of them past their deadline), then measures through the real FlowEngine:

- transitions per second (refresh cycles on existing flows, and whole new flows);
- inspection latency: FlowEngine.inspect of one flow, list_flows with filters;
- the sweep: the due query and sweep_expired;
- the wake-up of wait_pending on an in-process callback;
- machine.fire against a Machine per call and add_model per call (machine.py's design).

Usage: python benchmarks/bench_ledger.py [--flows 10000] [--events-per-flow 111] [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from transitions import Machine

from flowengine.clock import SystemClock, to_ms
from flowengine.engine import FlowEngine
from flowengine.ledger import Ledger
from flowengine.machine import FlowMachine, _condition_check, fire
from flowengine.protocol import CallbackParams
from flowengine.states import TRANSITIONS, Condition, FlowState, FlowTrigger

PROVIDERS = [f"provider{i:02d}" for i in range(30)]


# --------------------------------------------------------------------------- building


def build(path: Path, n_flows: int, events_per_flow: int) -> tuple[int, int]:
    """Bulk-load the ledger; returns (flows, events)."""
    n_pending = n_flows // 10
    n_conn = n_flows - n_pending
    now = to_ms(time.time())
    start = now - 90 * 86_400_000
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    flows: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    cycles = max(0, (events_per_flow - 5) // 2)
    for i in range(n_flows):
        fid = f"{i:016x}"
        provider = PROVIDERS[i % len(PROVIDERS)]
        created = start + i * 500
        steps = [("initiated", "issue_url", "awaiting_code", "bot")]
        if i < n_conn:
            steps += [
                ("awaiting_code", "receive_code", "code_received", "api"),
                ("code_received", "exchange", "exchanged", "bot"),
                ("exchanged", "store", "stored", "bot"),
            ]
            steps += [
                ("stored", "begin_refresh", "refreshing", "timer"),
                ("refreshing", "refreshed", "stored", "timer"),
            ] * cycles
            state, deadline, next_check = "stored", None, now + 3_600_000
        else:
            # half of the pending flows are overdue
            overdue = (i - n_conn) % 2 == 0
            state, next_check = "awaiting_code", None
            deadline = now - 60_000 if overdue else now + 600_000
        evs = [(fid, 1, created, None, "initiated", None, "bot", "{}")]
        for seq, (frm, trig, to, actor) in enumerate(steps, start=2):
            evs.append((fid, seq, created + seq * 1000, frm, to, trig, actor, "{}"))
        at = evs[-1][2]
        flows.append(
            (
                fid,
                provider,
                state,
                len(evs),
                created,
                at,
                "https://h/cb",
                "offline_access",
                "bot",
                None,
                hashlib.sha256(fid.encode()).hexdigest(),
                1,
                deadline,
                None,
                next_check,
            )
        )
        events.extend(evs)
    conn.executemany(
        "INSERT INTO flows (id, provider, state, version, created_at, updated_at, redirect_uri,"
        " scopes, actor, chat_id, state_hash, uses_pkce, deadline, token_expires_at,"
        " next_check_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        flows,
    )
    conn.executemany("INSERT INTO flow_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", events)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return len(flows), len(events)


# -------------------------------------------------------------------------- measuring


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def latencies(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


def show(label: str, values: list[float]) -> None:
    print(
        f"  {label:<44} median {statistics.median(values) * 1e3:7.3f} ms"
        f"   p95 {pct(values, 0.95) * 1e3:7.3f} ms   (n={len(values)})"
    )


async def bench_engine(path: Path, runs: int) -> None:
    rng = random.Random(1)
    async with await FlowEngine.open(path, clock=SystemClock()) as engine:
        stored = [f.id for f in await engine.list_flows(states=["stored"], limit=100_000)]
        print(f"  stored connections: {len(stored)}")

        print("transitions through FlowEngine (median of runs)")
        rates = []
        for _ in range(runs):
            batch = rng.sample(stored, 200)
            t0 = time.perf_counter()
            for fid in batch:
                await engine.begin_refresh(fid, actor="timer")
                await engine.record_refreshed(fid, actor="timer", token_expires_at=None)
            rates.append(2 * len(batch) / (time.perf_counter() - t0))
        print(
            f"  refresh cycles (begin_refresh + record_refreshed): "
            f"{statistics.median(rates):8.0f} transitions/s"
            f"  (runs: {', '.join(f'{r:.0f}' for r in rates)})"
        )

        flow_rates = []
        for run in range(runs):
            t0 = time.perf_counter()
            n = 50
            for _ in range(n):
                s = await engine.start(f"bench{run}", redirect_uri="https://h/cb", actor="bot")
                await engine.issue_url(s.flow.id, actor="bot")
                await engine.record_callback(CallbackParams(state=s.state, code="c"))
                await engine.take_code(s.state)
                await engine.record_exchange(s.flow.id, actor="bot")
                await engine.record_stored(s.flow.id, actor="bot", token_expires_at=None)
            flow_rates.append(n / (time.perf_counter() - t0))
        print(
            f"  whole flows (start .. record_stored, 5 transitions + supersede): "
            f"{statistics.median(flow_rates):6.0f} flows/s"
        )

        print("inspection with the big ledger")
        sample = rng.sample(stored, 300)
        it = iter(sample)
        show(
            "inspect(flow) with ~111 events", await latencies(lambda: engine.inspect(next(it)), 300)
        )
        show("list_flows() newest 50", await latencies(lambda: engine.list_flows(), 200))
        show(
            "list_flows(provider=...) newest 50",
            await latencies(lambda: engine.list_flows(provider=rng.choice(PROVIDERS)), 200),
        )
        show(
            "list_flows(states=[awaiting_code])",
            await latencies(lambda: engine.list_flows(states=["awaiting_code"]), 200),
        )
        show(
            "list_flows(provider=..., states=[stored])",
            await latencies(
                lambda: engine.list_flows(provider=rng.choice(PROVIDERS), states=["stored"]),
                200,
            ),
        )
        show("connections() (all providers)", await latencies(engine.connections, 20))

        print("sweep")
        now = engine.now_ms()
        show("ledger.due(now) query", await latencies(lambda: engine.ledger.due(now), 50))
        t0 = time.perf_counter()
        swept = await engine.sweep_expired()
        took = time.perf_counter() - t0
        print(
            f"  sweep_expired with {len(swept)} overdue flows: {took * 1e3:.1f} ms"
            f" ({took / max(1, len(swept)) * 1e3:.2f} ms per expired flow)"
        )
        show("sweep_expired() with nothing due", await latencies(engine.sweep_expired, 50))
        show(
            "ledger.due_checks(now) query",
            await latencies(lambda: engine.ledger.due_checks(now), 50),
        )

        print("wait_pending wake-up on an in-process callback (poll interval 60 s)")
        engine.poll_interval = 60.0
        wakes = []
        for _ in range(20):
            s = await engine.start("wake", redirect_uri="https://h/cb", actor="bot")
            woke: list[float] = []

            async def waiter(state: str = s.state, woke: list[float] = woke) -> None:
                await engine.wait_pending(state, timeout=5)
                woke.append(time.perf_counter())

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.01)
                sent = time.perf_counter()
                await engine.record_callback(CallbackParams(state=s.state, code="c"))
            wakes.append(woke[0] - sent)
        show("callback recorded -> waiter returns", wakes)


def bench_machine() -> None:
    print("machine.fire against the alternatives (per call)")
    spec: list[dict[str, Any]] = []
    for row in TRANSITIONS:
        entry: dict[str, Any] = {
            "trigger": row.trigger.value,
            "source": [s.value for s in row.sources],
            "dest": row.dest.value,
        }
        if row.condition is not None:
            entry["conditions"] = [_condition_check(row.condition)]
        spec.append(entry)
    states = [s.value for s in FlowState]
    moves = [
        (FlowState.STORED, FlowTrigger.BEGIN_REFRESH, None),
        (FlowState.REFRESHING, FlowTrigger.REFRESH_FAILED, Condition.TRANSIENT),
        (FlowState.AWAITING_CODE, FlowTrigger.RECEIVE_CODE, None),
    ]

    def shared(n: int) -> None:
        for i in range(n):
            s, t, c = moves[i % 3]
            fire(s, t, condition=c)

    def machine_per_call(n: int) -> None:
        for i in range(n):
            s, t, c = moves[i % 3]

            class Model:
                pass

            model = Model()
            m = Machine(
                model=model,
                states=states,
                transitions=spec,
                initial=s.value,
                auto_transitions=False,
                send_event=True,
            )
            m.events[t.value].trigger(model, condition=c)

    one = Machine(
        model=None,
        states=states,
        transitions=spec,
        initial="initiated",
        auto_transitions=False,
        send_event=True,
    )

    def add_model_per_call(n: int) -> None:
        for i in range(n):
            s, t, c = moves[i % 3]

            class Model:
                pass

            model = Model()
            one.add_model(model, initial=s.value)
            one.events[t.value].trigger(model, condition=c)
            one.remove_model(model)

    def per_call(fn: Callable[[int], None], n: int) -> float:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(n)
            runs.append((time.perf_counter() - t0) / n)
        return statistics.median(runs)

    FlowMachine()  # warm imports
    base = per_call(shared, 20_000)
    add = per_call(add_model_per_call, 2_000)
    whole = per_call(machine_per_call, 300)
    rows = [
        ("machine.fire (one machine, model re-pointed)", base),
        ("add_model + trigger + remove_model", add),
        ("new Machine per call", whole),
    ]
    for label, cost in rows:
        print(f"  {label:<46} {cost * 1e6:9.2f} us  ({cost / base:4.1f}x)")


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        path = Path(tmp) / "ledger.sqlite3"
        ledger = await Ledger.open(path)
        await ledger.close()
        t0 = time.perf_counter()
        n_flows, n_events = build(path, args.flows, args.events_per_flow)
        size = path.stat().st_size / 1e6
        print(
            f"built ledger: {n_flows} flows, {n_events} events, {size:.0f} MB"
            f" in {time.perf_counter() - t0:.1f} s (bulk executemany)"
        )
        await bench_engine(path, args.runs)
    bench_machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--events-per-flow", type=int, default=111)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    t0 = time.perf_counter()
    anyio.run(main_async, args)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
