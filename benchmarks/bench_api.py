"""Latency figures of the callback path (moved out of the tests, which only bound waits).

Prints median / p90 / max over ROUNDS rounds of:
1. ``FlowEngine.wait_pending`` woken by a callback recorded in the same process (the
   in-process signal), and by one recorded by another engine on the same ledger file (seen
   by that engine's ``watch_external``, one look every ``poll_interval``, 0.25 s by default);
2. the long-poll ``GET /oauth/pending/<state>?wait=30`` over real HTTP (Hypercorn on
   127.0.0.1, plain-test mode): from sending the callback to the poller's answer; issue 2's
   target is 50 ms;
3. the bot: from opening the authorization link (the fake provider's redirect, the callback,
   which exchanges the code) to the "✅ connected" edit of the Telegram message (the
   conversation on an in-memory chat, the real API over HTTP, a fake token endpoint); the
   target is one second;
4. the wall time of ``agentd demo`` (the whole flow on the real stack in a subprocess);
   target 10 s. Skipped with ``--no-demo``.

Run: .venv/bin/python benchmarks/bench_api.py [ROUNDS] [--no-demo]
The machine is shared: compare medians, run twice when a figure looks off.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.app import create_app  # noqa: E402
from api.serve import serve  # noqa: E402
from api.settings import ApiSettings  # noqa: E402
from flowengine.catalog import load_catalog  # noqa: E402
from flowengine.engine import FlowEngine  # noqa: E402
from flowengine.protocol import CallbackParams  # noqa: E402
from flowengine.states import FlowState  # noqa: E402

REDIRECT = "https://host.tailnet.ts.net:8400/oauth/callback"
TOKEN = "bench-api-token-0123456789"


def summary(label: str, seconds: list[float], target_ms: float | None = None) -> None:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    line = (
        f"  {label:<44} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms"
        f"   max {ms[-1]:7.1f} ms   (n={len(ms)})"
    )
    if target_ms is not None:
        line += f"   target {target_ms:g} ms"
    print(line)


async def _started(engine: FlowEngine) -> tuple[str, str]:
    """A flow awaiting its code: (flow id, state)."""
    started = await engine.start("dexcom", redirect_uri=REDIRECT, actor="test")
    await engine.issue_url(started.flow.id, actor="test")
    return started.flow.id, started.state


async def _parked(engine: FlowEngine, flow_id: str) -> None:
    """Until a waiter for the flow sleeps (the engine's private map of per-flow waiters; an
    engine without it gets 50 ms, ample on an idle machine)."""
    waiters = getattr(engine, "_changes", None)
    if waiters is None:
        await anyio.sleep(0.05)
        return
    while flow_id not in waiters:
        await anyio.sleep(0.001)


async def _wake(
    waiter_engine: FlowEngine,
    recorder: FlowEngine,
    wait: Callable[[str], Awaitable[object]],
    rounds: int,
) -> list[float]:
    lags: list[float] = []
    for i in range(rounds):
        flow_id, state = await _started(recorder)
        woke: list[float] = []

        async def waiter(state: str = state, woke: list[float] = woke) -> None:
            await wait(state)
            woke.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await _parked(waiter_engine, flow_id)
            sent = time.perf_counter()
            await recorder.record_callback(CallbackParams(state=state, code=f"code-{i}"))
        lags.append(woke[0] - sent)
    return lags


async def bench_wait_pending(root: Path, rounds: int) -> None:
    print("wait_pending: callback recorded -> waiter returns")
    db = root / "wait.sqlite3"
    async with await FlowEngine.open(db, poll_interval=60.0) as engine:
        lags = await _wake(engine, engine, lambda s: engine.wait_pending(s, timeout=120), rounds)
        summary("same process (signal)", lags)
    async with (
        await FlowEngine.open(db) as api,
        await FlowEngine.open(db) as poller,
    ):
        # the daemon runs the external-commit watcher; without it nothing sees the other engine
        async with anyio.create_task_group() as watcher:
            watcher.start_soon(poller.watch_external)
            lags = await _wake(poller, api, lambda s: poller.wait_pending(s, timeout=120), rounds)
            watcher.cancel_scope.cancel()
        # one data_version look every poll interval: on average half an interval
        summary(f"another engine (looks every {poller.poll_interval:g} s)", lags)


async def bench_long_poll(root: Path, rounds: int) -> None:
    print("GET /oauth/pending/<state>?wait=30 over HTTP: callback sent -> poller answered")
    engine = await FlowEngine.open(root / "long-poll.sqlite3", poll_interval=60.0)
    settings = ApiSettings(mode="plain-test", port=0, api_token=TOKEN)
    app = create_app(engine, settings=settings, catalog=load_catalog(None))
    stop = anyio.Event()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    lags: list[float] = []
    try:
        async with anyio.create_task_group() as server:
            plan = await server.start(partial(serve, app, settings, shutdown_trigger=stop.wait))
            async with (
                httpx.AsyncClient(base_url=plan.base_url) as poller,
                httpx.AsyncClient(base_url=plan.base_url) as browser,
            ):
                for _ in range(rounds):
                    flow_id, state = await _started(engine)
                    answered: list[float] = []

                    async def poll(state: str = state, out: list[float] = answered) -> None:
                        response = await poller.get(
                            f"/oauth/pending/{state}", params={"wait": "30"}, headers=auth
                        )
                        out.append(time.perf_counter())
                        assert response.status_code == 200, response.text

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(poll)
                        await _parked(engine, flow_id)
                        sent = time.perf_counter()
                        callback = await browser.get(
                            "/oauth/callback", params={"code": "c0de", "state": state}
                        )
                        assert callback.status_code == 200
                    lags.append(answered[0] - sent)
            stop.set()
    finally:
        await engine.close()
    summary("plain HTTP on 127.0.0.1", lags, target_ms=50)


async def bench_bot(root: Path, rounds: int) -> None:
    from flowengine.catalog import Catalog
    from flowengine.credentials import CredentialStore
    from tests.bot.conftest import open_rig
    from tests.fakes import FakeProvider

    print("bot: link opened (provider, callback, exchange) -> message edited to '✅ connected'")
    fake = FakeProvider()
    catalog = Catalog().with_override(fake.spec())
    tmp = root / "bot"
    tmp.mkdir()
    credentials = CredentialStore(tmp / "state" / "credentials.json")
    credentials.put("fake", fake.credentials())
    lags: list[float] = []
    # the rig runs the daemon (API on 127.0.0.1, engine, broker, bot) in this process
    async with open_rig(tmp, fake, catalog, credentials) as rig:
        async with rig.running():
            for _ in range(rounds):
                await rig.say("connect fake")  # connecting again supersedes the connection
                link = await rig.authorize_message()  # the new one: old links lost buttons
                # the callback exchanges the code before it answers, so the edit may land
                # before the browser hears back: measured from opening the link
                opened = time.perf_counter()
                await rig.browser(link)
                await rig.chat.wait_for(lambda link=link: link.edits)
                lags.append(time.perf_counter() - opened)
                assert link.current.startswith("✅"), link.current
            # the edit comes as soon as the tokens are stored; the callback's exchange then
            # supersedes the older connection: let it finish before the daemon stops
            assert rig.engine is not None
            with anyio.fail_after(10):
                while (
                    len(await rig.engine.ledger.flows(provider="fake", states=(FlowState.STORED,)))
                    > 1
                ):
                    await anyio.sleep(0.01)
    summary("in-memory chat, API over HTTP, fake provider", lags, target_ms=1000)


def bench_demo(runs: int = 3) -> None:
    agentd = Path(sys.executable).with_name("agentd")
    print("agentd demo: whole flow on the real stack (subprocess wall time)")
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT", "XDG_"))}
        env.update({"HOME": home, "TMPDIR": home})
        for _ in range(runs):
            started = time.perf_counter()
            proc = subprocess.run(
                [str(agentd), "demo"], env=env, capture_output=True, text=True, check=False
            )
            times.append(time.perf_counter() - started)
            if proc.returncode != 0:
                raise SystemExit(f"agentd demo failed ({proc.returncode}):\n{proc.stderr}")
    summary("agentd demo", times, target_ms=10_000)


async def main_async(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        await bench_wait_pending(root, rounds)
        await bench_long_poll(root, rounds)
        await bench_bot(root, max(5, rounds // 3))


def main() -> None:
    import logging

    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)  # no "Running on ..." lines
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rounds = int(args[0]) if args else 30
    anyio.run(main_async, rounds, backend="asyncio")
    if "--no-demo" not in sys.argv:
        bench_demo()


if __name__ == "__main__":
    main()
