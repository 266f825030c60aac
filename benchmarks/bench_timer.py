"""Refresh-timer sweep cost with 10k stored connections.

A real ledger (the product's schema, 10k ``stored`` flows inserted in bulk) and an auth.json
with 10k entries (one provider per connection, as auth.json is keyed by provider). Prints
median ``RefreshTimer.sweep`` times for:

1. steady state: nothing due (two indexed queries, auth.json not read);
2. 100 connections due whose tokens are fresh enough (refreshed elsewhere): no HTTP, each
   rescheduled from one read of auth.json per sweep;
3. 100 connections due that need a real refresh, through the real Broker against an
   in-process fake token endpoint (httpx.MockTransport); every refresh rewrites the
   10k-entry auth.json atomically (fsync), which dominates;

plus, for comparison, what reading auth.json once per due connection would cost
(the timer reads it once per sweep).

Run: .venv/bin/python benchmarks/bench_timer.py [connections]
"""

from __future__ import annotations

import hashlib
import sqlite3
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
from flowengine.refresh import RefreshTimer  # noqa: E402
from flowengine.tokens import TokenStore, atomic_write_json  # noqa: E402
from tests.fakes import FakeProvider  # noqa: E402

START = 1_800_000_000.0
DUE = 100
LIFETIME = 3600


def _pid(i: int) -> str:
    return f"p{i:05d}"


def _seed(root: Path, fake: FakeProvider, n: int) -> None:
    """n stored flows in the ledger, n auth.json entries, n client credentials."""
    now = to_ms(START)
    far = to_ms(START + 2000)  # next check well after "now"
    rows = []
    events = []
    for i in range(n):
        fid = f"f{i:015d}"
        rows.append(
            (
                fid,
                _pid(i),
                "stored",
                1,
                now,
                now,
                "https://broker.example.ts.net/oauth/callback",
                "read",
                "bench",
                hashlib.sha256(fid.encode()).hexdigest(),
                1,
                now + LIFETIME * 1000,
                far,
            )
        )
        events.append((fid, now, "stored", "bench"))
    db = sqlite3.connect(root / "ledger.sqlite3")
    with db:
        db.executemany(
            "INSERT INTO flows (id, provider, state, version, created_at, updated_at,"
            " redirect_uri, scopes, actor, state_hash, uses_pkce, token_expires_at,"
            " next_check_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.executemany("INSERT INTO flow_events VALUES (?, 1, ?, NULL, ?, NULL, ?, '{}')", events)
    db.close()
    auth = {}
    creds = {}
    for i in range(n):
        auth[_pid(i)] = {
            "type": "oauth",
            "access": f"a-{i}",
            "refresh": fake.issue_refresh(),
            "expires": now + LIFETIME * 1000,
            "token_type": "Bearer",
            "scope": "read",
            "obtained_at": now,
            "flow_id": f"f{i:015d}",
        }
        creds[_pid(i)] = {"client_id": fake.client_id, "client_secret": fake.client_secret}
    atomic_write_json(root / "auth.json", auth)
    atomic_write_json(root / "credentials.json", creds)


def _ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.2f} ms (n={len(samples)})"


async def _make_due(engine: FlowEngine, ids: range, at: float) -> None:
    for i in ids:
        await engine.ledger.set_next_check(f"f{i:015d}", to_ms(at))


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clock = ManualClock(START)
        fake = FakeProvider(expires_in=LIFETIME)
        engine = await FlowEngine.open(root / "ledger.sqlite3", clock=clock)  # schema
        t0 = time.perf_counter()
        _seed(root, fake, n)
        size = (root / "auth.json").stat().st_size
        print(
            f"seeded {n} stored connections in {time.perf_counter() - t0:.1f} s;"
            f" auth.json {size / 1e6:.1f} MB"
        )
        catalog = Catalog({_pid(i): fake.spec(_pid(i)) for i in range(n)})
        tokens = TokenStore(root / "auth.json")
        async with httpx.AsyncClient(transport=fake.transport()) as http:
            broker = Broker(
                engine,
                catalog=catalog,
                credentials=CredentialStore(root / "credentials.json"),
                tokens=tokens,
                http=http,
            )
            timer = RefreshTimer(engine, broker)

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
                await _make_due(engine, range(k * DUE, (k + 1) * DUE), clock.now())
                report = await timer.sweep()
                assert report.checked == DUE
                assert not report.refreshed
                fresh.append(report.seconds)
            assert fake.grants("refresh_token") == 0
            print(f"2. {DUE} due, fresh tokens (no HTTP):     {_ms(fresh)}")

            # the old way: auth.json parsed once per due connection
            t0 = time.perf_counter()
            for i in range(DUE):
                tokens.read(_pid(i))
            per_conn = time.perf_counter() - t0
            print(
                f"   (reading auth.json per connection would add {per_conn * 1000:.0f} ms"
                f" per sweep of {DUE}; the timer reads it once)"
            )

            # 3. connections that need a real refresh (each rewrites the 10k-entry auth.json)
            for i in range(n):  # every connection is due this late: take them all off the clock
                await engine.ledger.set_next_check(f"f{i:015d}", None)
            clock.set(START + LIFETIME - 120)  # inside the floor of every token
            real = []
            batch = 20
            base = 5000 % n
            for k in range(3):
                ids = range(base + k * batch, base + (k + 1) * batch)
                await _make_due(engine, ids, clock.now())
                before = fake.grants("refresh_token")
                report = await timer.sweep()
                assert len(report.refreshed) == batch, report.checked
                assert fake.grants("refresh_token") - before == batch
                real.append(report.seconds)
            print(
                f"3. {batch} due, real refreshes (fake HTTP):  {_ms(real)}"
                f" = {statistics.median(real) / batch * 1000:.1f} ms per refresh"
                f" (auth.json with {n} entries rewritten and fsynced each time)"
            )

        await engine.close()


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
