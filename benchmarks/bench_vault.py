"""Token vault figures (issue 11).

Prints:

1. the kill-point table: ``agentd token`` killed with SIGKILL at each step of a refresh
   (and of a connect) against the rotating simulated provider, and against npm
   oidc-provider when tests/e2e/oidc/node_modules is installed; per point: lost (0/1);
2. one durable refresh at N = 10, 1k, 10k stored connections: ``Broker.renew`` (vault
   intent, answer capture, new pair, ledger, all fsynced), auth.json published later, as
   the timer does; against an instant in-process provider, its own time subtracted;
   median/p90 of 200 refreshes; plus the cost of one auth.json publish and of a cached
   ``get_token`` at that N;
3. all N connections due at once (N = 10k): timer sweeps (batch 500, 8 concurrent) until
   every one is refreshed, against the instant provider: wall time;
4. cold ``agentd token`` at 10k connections (fast path) next to ``python -c pass``;
5. the storm: 200 coroutines + 4 processes asking at expiry: token-endpoint requests.

Run: .venv/bin/python benchmarks/bench_vault.py [--quick]   (--quick: N up to 1k)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowengine.broker import Broker, Outcome  # noqa: E402
from flowengine.catalog import Catalog  # noqa: E402
from flowengine.clock import ManualClock, to_ms  # noqa: E402
from flowengine.credentials import CredentialStore  # noqa: E402
from flowengine.engine import FlowEngine  # noqa: E402
from flowengine.schedule import TimerPolicy  # noqa: E402
from flowengine.timer import RefreshTimer  # noqa: E402
from flowengine.tokens import TokenStore, atomic_write_json  # noqa: E402
from flowengine.vault import Vault, vault_root  # noqa: E402
from tests.fakes import FakeProvider  # noqa: E402
from tests.flowengine.crash_rig import (  # noqa: E402
    EXCHANGE_POINT,
    REFRESH_POINTS,
    CrashRig,
    Verdict,
    as_table,
)
from tests.flowengine.helpers_vault import flow_id, provider_id, seed  # noqa: E402

SAMPLE = 200


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(ordered) * 1000:6.2f} ms  p90 {p90 * 1000:6.2f} ms"


# ------------------------------------------------------------------ 1. kill points


def _refresh_kills(rig_at: Callable[[str], CrashRig]) -> list[Verdict]:
    """One connected rig per refresh kill point (``rig_at(point)``), killed there, judged."""
    verdicts = []
    for label, stop_at in REFRESH_POINTS:
        rig = rig_at(stop_at)
        try:
            rig.connected()
            rig.make_due()
            rig.kill_at(stop_at)
            verdicts.append(rig.judge(label))
        finally:
            rig.close()
    return verdicts


def kill_table_sim(workdir: Path) -> list[Verdict]:
    verdicts = _refresh_kills(lambda point: CrashRig(workdir / f"sim-{point}"))
    label, stop_at = EXCHANGE_POINT
    rig = CrashRig(workdir / "sim-exchange")
    try:
        rig.connected()
        rig.kill_connect_at(stop_at)
        verdicts.append(rig.judge(label))
    finally:
        rig.close()
    return verdicts


def kill_table_oidc(workdir: Path) -> list[Verdict] | str:
    oidc_dir = ROOT / "tests" / "e2e" / "oidc"
    node = shutil.which("node")
    if not node or not (oidc_dir / "node_modules" / "oidc-provider").is_dir():
        return "skipped: node or tests/e2e/oidc/node_modules missing (npm install there)"
    from tests.e2e.conftest import oidc_provider
    from tests.e2e.test_vault_oidc import PROVIDER, OidcCrashRig

    server_dir = workdir / "oidc-server"
    server_dir.mkdir(parents=True)
    with oidc_provider(server_dir) as server:
        return _refresh_kills(
            lambda point: OidcCrashRig(workdir / f"oidc-{point}", provider=PROVIDER, oidc=server)
        )


# ------------------------------------------------------- 2.-4. many connections


class Installation:
    """N seeded connections, a Broker on them and an instant provider that times itself."""

    def __init__(self, root: Path, n: int, start: float) -> None:
        self.root = root
        self.n = n
        self.fake = FakeProvider()
        self.provider_seconds = 0.0
        refresh = [self.fake.issue_refresh() for _ in range(n)]
        t0 = time.perf_counter()
        self.vault = seed(
            root / "state",
            root / "auth.json",
            n,
            refresh_tokens=refresh,
            now_ms=to_ms(start),
            next_check_ms=to_ms(start + 10**6),
        )
        self.seed_seconds = time.perf_counter() - t0
        secret = {"client_id": self.fake.client_id, "client_secret": self.fake.client_secret}
        creds = {provider_id(i): secret for i in range(n)}
        atomic_write_json(root / "state" / "credentials.json", creds)
        self.catalog = Catalog({provider_id(i): self.fake.spec(provider_id(i)) for i in range(n)})

    async def handler(self, request: httpx.Request) -> httpx.Response:
        t0 = time.perf_counter()
        try:
            return await self.fake.handle(request)
        finally:
            self.provider_seconds += time.perf_counter() - t0

    async def broker(self, http: httpx.AsyncClient, clock: ManualClock) -> Broker:
        engine = await FlowEngine.open(self.root / "state" / "ledger.sqlite3", clock=clock)
        return Broker(
            engine,
            catalog=self.catalog,
            credentials=CredentialStore(self.root / "state" / "credentials.json"),
            tokens=TokenStore(self.root / "auth.json"),
            vault=Vault(vault_root(self.root / "state")),
            http=http,
        )


async def durable_refresh(inst: Installation, start: float) -> dict[str, Any]:
    clock = ManualClock(start + 60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(inst.handler)) as http:
        broker = await inst.broker(http, clock)
        try:
            step = max(1, inst.n // SAMPLE)
            ids = [provider_id(i) for i in range(0, inst.n, step)][:SAMPLE]
            samples = []
            for provider in ids:
                before = inst.provider_seconds
                t0 = time.perf_counter()
                outcome = await broker.renew(provider, actor="cli", force=True, publish=False)
                elapsed = time.perf_counter() - t0
                assert outcome.outcome is Outcome.REFRESHED, outcome
                samples.append(elapsed - (inst.provider_seconds - before))
            t0 = time.perf_counter()
            published = await broker.publish()
            publish_s = time.perf_counter() - t0
            assert len(published) == len(ids)
            cached = []
            for provider in ids:
                t0 = time.perf_counter()
                await broker.get_token(provider)
                cached.append(time.perf_counter() - t0)
        finally:
            await broker.engine.close()
    return {"refresh": samples, "publish_s": publish_s, "cached": cached, "n_sample": len(ids)}


async def all_due(inst: Installation, start: float) -> dict[str, Any]:
    clock = ManualClock(start + 3000)  # 10 minutes left of every hour-long token: all due
    async with httpx.AsyncClient(transport=httpx.MockTransport(inst.handler)) as http:
        broker = await inst.broker(http, clock)
        try:
            for i in range(inst.n):
                await broker.schedule(flow_id(i), clock.now())
            timer = RefreshTimer(broker, policy=TimerPolicy(batch=500, concurrency=8))
            before = inst.fake.grants("refresh_token")
            t0 = time.perf_counter()
            sweeps = refreshed = 0
            while True:
                report = await timer.sweep()
                sweeps += 1
                refreshed += len(report.refreshed)
                if report.checked == 0:
                    break
            wall = time.perf_counter() - t0
            requests = inst.fake.grants("refresh_token") - before
        finally:
            await broker.engine.close()
    return {"wall_s": wall, "sweeps": sweeps, "refreshed": refreshed, "requests": requests}


def _walls(commands: list[list[str]], env: dict[str, str], runs: int) -> list[list[float]]:
    """Wall times of each command, run in turns (a shared machine's load hits all alike)."""
    times: list[list[float]] = [[] for _ in commands]
    for i in range(runs + 2):
        for command, samples in zip(commands, times, strict=True):
            t0 = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"{command} failed: {done.stderr}")
            if i >= 2:  # two warm-up rounds fill the page cache
                samples.append(elapsed)
    return times


def cold_token(inst: Installation, runs: int = 30) -> dict[str, Any]:
    config = inst.root / "agentd.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{inst.root / "state"}"\nauth_file = "{inst.root / "auth.json"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "PYTHON"))}
    env.update(AGENTD_CONFIG=str(config), XDG_CONFIG_HOME=str(inst.root / "xdg"))
    agentd = Path(sys.executable).with_name("agentd")
    command = [str(agentd)] if agentd.exists() else [sys.executable, "-m", "agentd.cli"]
    provider = provider_id(inst.n // 2)
    check = subprocess.run(
        [*command, "token", provider], env=env, capture_output=True, text=True, check=False
    )
    record = inst.vault.read(provider)
    assert record is not None
    assert record.tokens is not None
    assert check.stdout.strip() == record.tokens.access, check.stderr
    imports = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agentd.cli", "token", provider],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stderr
    heavy = {"httpx", "anyio", "aiosqlite"} & {
        line.rsplit("|", 1)[1].strip() for line in imports.splitlines() if "|" in line
    }
    baseline, token = _walls(
        [[sys.executable, "-c", "pass"], [*command, "token", provider]], env, runs
    )
    return {"pass": baseline, "token": token, "heavy": sorted(heavy)}


# ---------------------------------------------------------------------- 5. storm


def _storm_broker_setup(root: Path) -> FakeProvider:
    fake = FakeProvider()

    async def connect() -> None:
        async with httpx.AsyncClient(transport=fake.transport()) as http:
            broker = await _storm_broker(root, fake, http, time.time())
            start = await broker.begin("fake", redirect_uri="https://h.ts.net/cb", actor="cli")
            verifier = await broker.engine.code_verifier(start.flow.id)
            code = fake.issue_code(redirect_uri="https://h.ts.net/cb", code_verifier=verifier)
            from flowengine.protocol import parse_callback

            await broker.engine.record_callback(
                parse_callback({"state": [start.state], "code": [code]})
            )
            await broker.complete_state(start.state, actor="cli")
            await broker.engine.close()

    anyio.run(connect)
    return fake


async def _storm_broker(
    root: Path, fake: FakeProvider, http: httpx.AsyncClient, now: float
) -> Broker:
    engine = await FlowEngine.open(root / "ledger.sqlite3", clock=ManualClock(now))
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


def _storm_caller(root: str, barrier: Any, tasks: int, out: str) -> None:
    async def main() -> list[str]:
        fake = FakeProvider(delay=0.2)
        fake.valid_refresh.update(json.loads((Path(root) / "refresh.json").read_text()))
        transport = fake.logged_transport(Path(root) / "requests.log")
        async with httpx.AsyncClient(transport=transport) as http:
            broker = await _storm_broker(Path(root), fake, http, time.time() + 7200)
            await anyio.to_thread.run_sync(barrier.wait)
            got: list[str] = []

            async def one() -> None:
                got.append(await broker.get_token("fake"))

            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(one)
            await broker.engine.close()
            return got

    Path(out).write_text(json.dumps(anyio.run(main)))


def storm(root: Path, tasks: int = 200, processes: int = 4) -> dict[str, Any]:
    fake = _storm_broker_setup(root)
    (root / "refresh.json").write_text(json.dumps(sorted(fake.valid_refresh)))
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes + 1)
    outs = [root / f"out-{i}.json" for i in range(processes + 1)]
    children = [
        ctx.Process(target=_storm_caller, args=(str(root), barrier, 1, str(outs[i])))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    t0 = time.perf_counter()
    _storm_caller(str(root), barrier, tasks, str(outs[-1]))
    wall = time.perf_counter() - t0
    for child in children:
        child.join(120)
    lines = (root / "requests.log").read_text().splitlines()
    tokens = {t for out in outs if out.exists() for t in json.loads(out.read_text())}
    answered = sum(len(json.loads(out.read_text())) for out in outs if out.exists())
    return {
        "requests": len(lines),
        "callers": tasks + processes,
        "answered": answered,
        "distinct_tokens": len(tokens),
        "children_ok": all(c.exitcode == 0 for c in children),
        "wall_ms": wall * 1000,
    }


# ------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="N up to 1k, no oidc table")
    args = parser.parse_args()
    sizes = (10, 1000) if args.quick else (10, 1000, 10_000)
    with tempfile.TemporaryDirectory(prefix="bench-vault-") as tmp:
        work = Path(tmp)

        print("1. kill points: `agentd token` SIGKILLed at each step (one fresh install each)")
        print("   against the simulated Dexcom (strict rotation, no reuse grace):")
        sim = kill_table_sim(work / "kill")
        print("   " + as_table(sim).replace("\n", "\n   "))
        lost = sum(v.lost for v in sim)
        print(f"   points {len(sim)}, lost {lost}")
        if not args.quick:
            print("   against npm oidc-provider (rotateRefreshToken, reuse revokes the grant):")
            oidc = kill_table_oidc(work / "kill-oidc")
            if isinstance(oidc, str):
                print("   " + oidc)
            else:
                print("   " + as_table(oidc).replace("\n", "\n   "))
                print(f"   points {len(oidc)}, lost {sum(v.lost for v in oidc)}")

        print("2. one durable refresh (vault intent + captured answer + new pair, fsynced;")
        print("   ledger refreshing/refreshed), instant provider's own time subtracted:")
        installs: dict[int, Installation] = {}
        cold_result: dict[str, Any] = {}
        for n in sizes:
            start = time.time()
            inst = Installation(work / f"n{n}", n, start)
            installs[n] = inst
            if n == max(sizes):  # before anything refreshes: every token fresh, in sync
                cold_result = cold_token(inst)
            result = anyio.run(durable_refresh, inst, start)
            print(f"   N={n:>6}: {_ms(result['refresh'])}   (seeded in {inst.seed_seconds:.1f} s)")
            print(
                f"            auth.json publish of {result['n_sample']} refreshed pairs:"
                f" {result['publish_s'] * 1000:.1f} ms (one rewrite);"
                f" cached get_token {_ms(result['cached'])}"
            )
        n = max(sizes)
        print(f"3. all {n} connections due at once, instant provider, batch 500, 8 at once:")
        due = anyio.run(all_due, installs[n], time.time())
        print(
            f"   {due['refreshed']} refreshed ({due['requests']} requests) in"
            f" {due['wall_s']:.1f} s over {due['sweeps']} sweeps"
            f" = {due['wall_s'] / max(1, due['refreshed']) * 1000:.2f} ms per connection"
        )
        base = statistics.median(cold_result["pass"])
        tok = statistics.median(cold_result["token"])
        print(f"4. cold `agentd token` with {n} stored connections (fast path):")
        print(f"   python -c pass   {_ms(cold_result['pass'])}")
        print(f"   agentd token     {_ms(cold_result['token'])}   ratio {tok / base:.2f}x")
        print(f"   async stack imported on the fast path: {cold_result['heavy'] or 'none'}")
        storm_root = work / "storm"
        storm_root.mkdir()
        result = storm(storm_root)
        print(
            f"5. storm: {result['callers'] - 4} coroutines + 4 processes at expiry:"
            f" {result['requests']} token-endpoint request(s); {result['answered']} callers"
            f" answered with {result['distinct_tokens']} distinct token(s); children ok:"
            f" {result['children_ok']}; wall {result['wall_ms']:.0f} ms"
        )


if __name__ == "__main__":
    main()
