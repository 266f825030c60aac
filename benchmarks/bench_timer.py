"""Refresh-timer sweep cost with 10k stored connections.

A real ledger (the product's schema, 10k ``stored`` flows inserted in bulk), a vault record
per connection and an auth.json with 10k entries (one provider per connection, as auth.json
is keyed by provider). Prints median ``RefreshTimer.sweep`` times for:

1. steady state: nothing due (two indexed queries and one stat of auth.json);
2. 100 connections due whose tokens are fresh enough (refreshed elsewhere): no HTTP, each
   rescheduled from its own vault record (two small files, whatever N is);
3. 20 connections due that need a real refresh, through the real Broker against an
   in-process fake token endpoint (httpx.MockTransport), 8 at once; each refresh is
   durable in the vault on its own, auth.json is rewritten once per sweep.

For all 10k due at once see bench_vault.py.

Run: .venv/bin/python benchmarks/bench_timer.py [connections]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowengine.broker import Broker  # noqa: E402
from flowengine.catalog import Catalog  # noqa: E402
from flowengine.clock import ManualClock, to_ms  # noqa: E402
from flowengine.credentials import CredentialStore  # noqa: E402
from flowengine.engine import FlowEngine  # noqa: E402
from flowengine.timer import RefreshTimer  # noqa: E402
from flowengine.tokens import TokenStore, atomic_write_json  # noqa: E402
from flowengine.vault import Vault, vault_root  # noqa: E402
from tests.fakes import FakeProvider  # noqa: E402
from tests.flowengine.helpers_vault import flow_id, provider_id, seed  # noqa: E402

START = 1_800_000_000.0
DUE = 100
LIFETIME = 3600


def _ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.2f} ms (n={len(samples)})"


async def _make_due(broker: Broker, ids: range, at: float) -> None:
    for i in ids:
        await broker.schedule(flow_id(i), at)


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake = FakeProvider(expires_in=LIFETIME)
        t0 = time.perf_counter()
        seed(
            root / "state",
            root / "auth.json",
            n,
            refresh_tokens=[fake.issue_refresh() for _ in range(n)],
            now_ms=to_ms(START),
            lifetime_s=LIFETIME,
            next_check_ms=to_ms(START + 2000),
        )
        secret = {"client_id": fake.client_id, "client_secret": fake.client_secret}
        atomic_write_json(root / "credentials.json", {provider_id(i): secret for i in range(n)})
        size = (root / "auth.json").stat().st_size
        print(
            f"seeded {n} stored connections in {time.perf_counter() - t0:.1f} s;"
            f" auth.json {size / 1e6:.1f} MB"
        )
        anyio.run(sweeps, root, fake, n)


async def sweeps(root: Path, fake: FakeProvider, n: int) -> None:
    clock = ManualClock(START)
    engine = await FlowEngine.open(root / "state" / "ledger.sqlite3", clock=clock)
    catalog = Catalog({provider_id(i): fake.spec(provider_id(i)) for i in range(n)})
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        broker = Broker(
            engine,
            catalog=catalog,
            credentials=CredentialStore(root / "credentials.json"),
            tokens=TokenStore(root / "auth.json"),
            vault=Vault(vault_root(root / "state")),
            http=http,
        )
        timer = RefreshTimer(broker)

        # 1. steady state
        clock.set(START + 60)
        steady = []
        for _ in range(50):
            report = await timer.sweep()
            assert report.checked == 0
            steady.append(report.seconds)
        print(f"1. steady state, nothing due:           {_ms(steady)}")

        # 2. 100 due, tokens fresh enough: no HTTP
        fresh = []
        for k in range(10):
            await _make_due(broker, range(k * DUE, (k + 1) * DUE), clock.now())
            report = await timer.sweep()
            assert report.checked == DUE
            assert not report.refreshed
            fresh.append(report.seconds)
        assert fake.grants("refresh_token") == 0
        print(f"2. {DUE} due, fresh tokens (no HTTP):     {_ms(fresh)}")

        # 3. connections that need a real refresh
        for i in range(n):  # every connection is due this late: take them all off the clock
            await broker.schedule(flow_id(i), None)
        clock.set(START + LIFETIME - 120)  # inside the floor of every token
        real = []
        batch = 20
        base = 5000 % n
        for k in range(3):
            ids = range(base + k * batch, base + (k + 1) * batch)
            await _make_due(broker, ids, clock.now())
            before = fake.grants("refresh_token")
            report = await timer.sweep()
            assert len(report.refreshed) == batch, report.checked
            assert fake.grants("refresh_token") - before == batch
            assert report.published == batch
            real.append(report.seconds)
        print(
            f"3. {batch} due, real refreshes (fake HTTP):  {_ms(real)}"
            f" = {statistics.median(real) / batch * 1000:.1f} ms per refresh"
            f" (vault writes fsynced per refresh, auth.json with {n} entries"
            " rewritten once per sweep)"
        )

    await engine.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
