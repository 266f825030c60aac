"""Connect anything figures (issue 13), against npm oidc-provider and the test suite's
protected resource (tests/e2e/oidc/anything.mjs, tests/e2e/resource.py), over HTTPS with a
private CA on loopback.

Prints, as medians (and p90) of fresh runs:

1. discovery of a protected resource: its 401 challenge, its metadata, the authorization
   server's metadata (RFC 8414 inserted path): requests and wall time;
2. discovery of a resource that names no metadata (well-known document, then the OpenID
   Connect appended path after two misses);
3. adopt = discovery + dynamic client registration + the entry persisted (a fresh state
   directory each time); and adopt again with the registration stored (reused);
4. ``begin`` of a discovered provider: metadata validated again (a fetch) vs within the
   minute it is not fetched again;
5. the device flow: the owner approves after ~3 s (interval 1 s): polls the provider saw,
   their gaps; and with one forced ``slow_down``: the gap after it.

Run: .venv/bin/python benchmarks/bench_anything.py [--runs N]
"""

from __future__ import annotations

import argparse
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowengine.broker import Broker  # noqa: E402
from flowengine.catalog import load_catalog  # noqa: E402
from flowengine.credentials import CredentialStore  # noqa: E402
from flowengine.discovery import discover  # noqa: E402
from flowengine.engine import FlowEngine  # noqa: E402
from flowengine.tokens import TokenStore  # noqa: E402
from tests.e2e.conftest import AnythingServer, _node_server  # noqa: E402
from tests.e2e.helpers import answer_device  # noqa: E402
from tests.e2e.resource import ProtectedResource, running_resource  # noqa: E402

REDIRECT = "https://client.example.org/callback"


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"median {statistics.median(values) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms"


async def open_broker(root: Path, http: httpx.AsyncClient) -> Broker:
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    engine = await FlowEngine.open(root / "ledger.sqlite3")
    return Broker(
        engine,
        catalog=load_catalog(root / "none.toml", discovered=root / "discovered.json"),
        credentials=CredentialStore(root / "credentials.json"),
        tokens=TokenStore(root / "auth.json"),
        http=http,
    )


async def run(server: AnythingServer, rs: ProtectedResource, work: Path, runs: int) -> None:
    assert server.ca_file is not None
    verify = ssl.create_default_context(cafile=str(server.ca_file))
    async with httpx.AsyncClient(verify=verify, timeout=30) as http:
        for label, path in (
            ("challenge + RFC 8414 inserted", "/mcp"),
            ("well-known + OIDC appended", "/quiet"),
        ):
            times, requests = [], 0
            for _ in range(runs):
                found = await discover(rs.url(path), client=http)
                times.append(found.elapsed)
                requests = found.requests
            n = 1 if path == "/mcp" else 2
            print(f"{n}. discovery ({label}): {requests} requests, {ms(times)}")

        fresh, again = [], []
        registrations_before = len(server.log("registration"))
        for i in range(runs):
            broker = await open_broker(work / f"adopt-{i}", http)
            try:
                started = time.perf_counter()
                await broker.adopt(rs.url("/mcp"), redirect_uri=REDIRECT, actor="test")
                fresh.append(time.perf_counter() - started)
                started = time.perf_counter()
                reused = await broker.adopt(rs.url("/mcp"), redirect_uri=REDIRECT, actor="test")
                again.append(time.perf_counter() - started)
                assert not reused.registered
            finally:
                await broker.engine.close()
        registrations = len(server.log("registration")) - registrations_before
        print(f"3. adopt, fresh state dir (discovery + registration + entry): {ms(fresh)}")
        print(f"   adopt again, registration reused:                         {ms(again)}")
        print(f"   registrations the provider saw: {registrations} for {2 * runs} adopts")

        broker = await open_broker(work / "begin", http)
        try:
            pid = await broker.provider_for(rs.url("/mcp"), redirect_uri=REDIRECT, actor="test")
            fetched, cached = [], []
            for _ in range(runs):
                broker._validated.clear()
                started = time.perf_counter()
                start = await broker.begin(pid, redirect_uri=REDIRECT, actor="test")
                fetched.append(time.perf_counter() - started)
                await broker.engine.cancel(start.flow.id, actor="test")
                started = time.perf_counter()
                start = await broker.begin(pid, redirect_uri=REDIRECT, actor="test")
                cached.append(time.perf_counter() - started)
                await broker.engine.cancel(start.flow.id, actor="test")
            print(f"4. begin, metadata validated again: {ms(fetched)}")
            print(f"   begin, validated < 60 s ago:      {ms(cached)}")

            for forced in (0, 1):
                mark = len(server.log())
                if forced:
                    server.control("slow-down", count=1)
                start = await broker.begin_device(pid, actor="test")
                approved_at: list[float] = []

                async def owner(start: Any = start, approved_at: list[float] = approved_at) -> None:
                    await anyio.sleep(3.0)
                    assert start.verification_uri_complete is not None
                    await answer_device(
                        start.verification_uri_complete, approve=True, verify=verify
                    )
                    approved_at.append(time.perf_counter())

                began = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(owner)
                    outcome = await broker.complete_device(start.flow.id, actor="test")
                ended = time.perf_counter()
                polls = [e for e in server.log()[mark:] if e.get("event") == "device_poll"]
                gaps = [p["gap_ms"] for p in polls if p["gap_ms"] is not None]
                what = "with one forced slow_down" if forced else "interval 1 s"
                print(
                    f"5. device flow ({what}): {outcome.status}, {len(polls)} polls at the"
                    f" provider ({outcome.slow_downs} slow_down), gaps {gaps} ms,"
                    f" tokens {1000 * (ended - approved_at[0]):.0f} ms after approval,"
                    f" {ended - began:.1f} s in all"
                )
        finally:
            await broker.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if (
        not shutil.which("node")
        or not (ROOT / "tests/e2e/oidc/node_modules/oidc-provider").is_dir()
    ):
        print("skipped: node or tests/e2e/oidc/node_modules missing (npm install there)")
        return
    with tempfile.TemporaryDirectory(prefix="bench-anything-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        (work / "server").mkdir()
        with _node_server(work / "server", "anything.mjs", tls=ca) as (info, s, ca_file):
            server = AnythingServer(origin=info["origin"], grant_log=s.grant_log, ca_file=ca_file)
            assert ca_file is not None
            with running_resource(server.origin, ca, ca_file) as rs:
                anyio.run(run, server, rs, work, args.runs)


if __name__ == "__main__":
    main()
