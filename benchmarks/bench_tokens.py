"""Token latency and refresh single-flight figures.

Prints:
1. ``Broker.get_token`` latency with a cached, still-valid token (in-process median, p99):
   two vault slot files read, auth.json not parsed;
2. cold-process wall time of a tiny script that reads the provider's vault record and prints
   the token (and ``agentd token <provider>`` when the CLI is installed), next to a bare
   ``python -c pass`` for reference;
3. the refresh storm: 50 concurrent ``get_token`` calls in this process plus 3 other
   processes, all at expiry, against a fake token endpoint that logs each request to a
   shared file: the number of token-endpoint requests (must be 1).

Run: .venv/bin/python benchmarks/bench_tokens.py
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowengine.broker import Broker  # noqa: E402
from flowengine.catalog import Catalog  # noqa: E402
from flowengine.clock import ManualClock  # noqa: E402
from flowengine.credentials import CredentialStore  # noqa: E402
from flowengine.engine import FlowEngine  # noqa: E402
from flowengine.protocol import parse_callback  # noqa: E402
from flowengine.tokens import TokenStore  # noqa: E402
from flowengine.vault import Vault  # noqa: E402
from tests.fakes import FakeProvider  # noqa: E402

REDIRECT = "https://broker.example.ts.net/oauth/callback"


async def _broker(
    root: Path, fake: FakeProvider, http: httpx.AsyncClient, clock: ManualClock
) -> Broker:
    engine = await FlowEngine.open(root / "ledger.sqlite3", clock=clock)
    creds = CredentialStore(root / "credentials.json")
    if creds.get("fake") is None:
        creds.put("fake", fake.credentials())
    return Broker(
        engine,
        catalog=Catalog().with_override(fake.spec()),
        credentials=creds,
        tokens=TokenStore(root / "auth.json"),
        http=http,
    )


async def _connect(broker: Broker, fake: FakeProvider) -> None:
    start = await broker.begin("fake", redirect_uri=REDIRECT, actor="cli")
    verifier = await broker.engine.code_verifier(start.flow.id)
    code = fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
    await broker.engine.record_callback(parse_callback({"state": [start.state], "code": [code]}))
    await broker.complete_state(start.state, actor="cli")


# ------------------------------------------------------------------- 1. cached


async def bench_cached(root: Path, n: int = 5000) -> dict[str, float]:
    fake = FakeProvider()
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        broker = await _broker(root, fake, http, ManualClock(time.time()))
        await _connect(broker, fake)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await broker.get_token("fake")
            samples.append(time.perf_counter() - t0)
        await broker.engine.close()
    samples.sort()
    return {
        "median_us": statistics.median(samples) * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "requests": float(len(fake.requests) - 1),
    }


# -------------------------------------------------------------------- 2. cold


def _wall(cmd: list[str], env: dict[str, str], runs: int) -> tuple[float, str]:
    times = []
    out = ""
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        out = done.stdout.strip()
    return statistics.median(times) * 1000, out


def bench_cold(root: Path, runs: int = 15) -> dict[str, Any]:
    record = Vault(root / "vault").read("fake")
    assert record is not None
    token = record.tokens
    assert token is not None
    env = {**os.environ, "AGENTD_STATE_DIR": str(root), "PYTHONPATH": str(ROOT)}
    env["AGENT_AUTH_FILE"] = str(root / "auth.json")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    script = (
        "import sys, time\n"
        "from flowengine.vault import Vault\n"
        "t = Vault(sys.argv[1]).read('fake').tokens\n"
        "assert t is not None and t.is_valid(int(time.time() * 1000), leeway_ms=60_000)\n"
        "print(t.access)\n"
    )
    auth = root / "vault"
    result: dict[str, Any] = {}
    result["python_pass_ms"], _ = _wall([sys.executable, "-c", "pass"], env, runs)
    result["fast_path_script_ms"], out = _wall([sys.executable, "-c", script, str(auth)], env, runs)
    result["fast_path_prints_token"] = out == token.access
    agentd = Path(sys.executable).with_name("agentd")
    if agentd.exists():
        env_cli = {**env, "XDG_CONFIG_HOME": str(root / "config")}
        try:
            result["agentd_token_ms"], out = _wall([str(agentd), "token", "fake"], env_cli, runs)
            result["agentd_token_prints_token"] = out == token.access
        except subprocess.CalledProcessError as err:
            result["agentd_token_error"] = f"exit {err.returncode}"
    return result


# ------------------------------------------------------------------- 3. storm


def _storm_child(root: str, barrier: Any, expiry_offset: float) -> None:
    async def main() -> None:
        fake = FakeProvider(delay=0.2)
        fake.valid_refresh.update(json.loads((Path(root) / "refresh.json").read_text()))
        transport = fake.logged_transport(Path(root) / "requests.log")
        async with httpx.AsyncClient(transport=transport) as http:
            broker = await _broker(Path(root), fake, http, ManualClock(time.time() + expiry_offset))
            barrier.wait()
            await broker.get_token("fake")
            await broker.engine.close()

    anyio.run(main)


def bench_storm(root: Path, tasks: int = 50, processes: int = 3) -> dict[str, Any]:
    fake = FakeProvider()

    async def setup() -> None:
        async with httpx.AsyncClient(transport=fake.transport()) as http:
            broker = await _broker(root, fake, http, ManualClock(time.time()))
            await _connect(broker, fake)
            await broker.engine.close()

    anyio.run(setup)
    (root / "refresh.json").write_text(json.dumps(sorted(fake.valid_refresh)))
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes + 1)
    children = [
        ctx.Process(target=_storm_child, args=(str(root), barrier, 7200.0))
        for _ in range(processes)
    ]
    for child in children:
        child.start()

    async def storm() -> float:
        fake_here = FakeProvider(delay=0.2)
        fake_here.valid_refresh.update(fake.valid_refresh)
        transport = fake_here.logged_transport(root / "requests.log")
        async with httpx.AsyncClient(transport=transport) as http:
            broker = await _broker(root, fake_here, http, ManualClock(time.time() + 7200))
            await anyio.to_thread.run_sync(barrier.wait)
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(broker.get_token, "fake")
            elapsed = time.perf_counter() - t0
            await broker.engine.close()
        return elapsed

    elapsed = anyio.run(storm)
    for child in children:
        child.join(60)
    lines = (root / "requests.log").read_text().splitlines()
    return {
        "callers": f"{tasks} tasks + {processes} processes",
        "token_requests": len(lines),
        "children_ok": all(c.exitcode == 0 for c in children),
        "in_process_wall_ms": elapsed * 1000,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cached"
        root.mkdir()
        cached = anyio.run(bench_cached, root)
        print(
            f"get_token (cached, in-process): median {cached['median_us']:.1f} us,"
            f" p99 {cached['p99_us']:.1f} us, token requests {int(cached['requests'])}"
        )
        cold = bench_cold(root)
        print(f"cold process, bare `python -c pass`: {cold['python_pass_ms']:.1f} ms (median)")
        print(
            f"cold process, vault read script: {cold['fast_path_script_ms']:.1f} ms"
            f" (median; prints the token: {cold['fast_path_prints_token']})"
        )
        if "agentd_token_ms" in cold:
            print(
                f"cold process, `agentd token fake`: {cold['agentd_token_ms']:.1f} ms"
                f" (median; prints the token: {cold['agentd_token_prints_token']})"
            )
        elif "agentd_token_error" in cold:
            print(f"`agentd token fake` failed: {cold['agentd_token_error']}")
        storm_root = Path(tmp) / "storm"
        storm_root.mkdir()
        storm = bench_storm(storm_root)
        print(
            f"refresh storm ({storm['callers']} at expiry): {storm['token_requests']}"
            f" token-endpoint request(s); children ok: {storm['children_ok']};"
            f" in-process wall {storm['in_process_wall_ms']:.0f} ms"
        )


if __name__ == "__main__":
    main()
