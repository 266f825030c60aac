"""Real-tailnet harness figures (tests/tailnet).

Prints:
1. ``make tailnet`` wall time with an up-to-date build (the cost ``make test`` pays on
   every run); a cold build is measured with ``--cold``, which builds into a throwaway
   GOCACHE (minutes on 2 cores; modules must already be in the module cache);
2. the time to bring up a tailnet of N nodes (testnet + N tailscaled + ``tailscale up`` on
   each + every node seeing every other), median and spread over RUNS runs, and to tear it
   down by PID;
3. a round trip through the tailnet: one node's HTTP proxy to a listener behind another
   node's 100.x address (userspace forwarding), median over 50 requests.

Run: .venv/bin/python benchmarks/bench_tailnet.py [RUNS] [NODES] [--cold]
"""

from __future__ import annotations

import http.server
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tailnet.harness import BIN_DIR, Tailnet, missing_binaries  # noqa: E402


def build(cold: bool) -> float:
    env = dict(os.environ)
    tmp = None
    if cold:
        tmp = tempfile.mkdtemp(prefix="gocache")
        env["GOCACHE"] = tmp
        for name in ("testnet", "tailscaled", "tailscale"):
            (BIN_DIR / name).unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["make", "-s", "tailnet"], cwd=ROOT, env=env, check=True)
    elapsed = time.perf_counter() - start
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return elapsed


def bring_up(nodes: int) -> tuple[float, float]:
    spec = {f"node{i}": (("tag:server",) if i == 0 else ()) for i in range(nodes)}
    start = time.perf_counter()
    tailnet = Tailnet(spec).start()
    up = time.perf_counter() - start
    start = time.perf_counter()
    tailnet.close()
    return up, time.perf_counter() - start


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def round_trip(count: int = 50) -> list[float]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Tailnet({"a": (), "b": ()}) as tailnet:
            url = f"http://{tailnet['a'].dns_name}:{port}/"
            times = []
            with tailnet["b"].client() as client:
                for _ in range(count + 3):
                    start = time.perf_counter()
                    client.get(url).raise_for_status()
                    times.append((time.perf_counter() - start) * 1000)
            return times[3:]
    finally:
        server.shutdown()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    runs = int(args[0]) if args else 5
    nodes = int(args[1]) if len(args) > 1 else 3
    cold = "--cold" in sys.argv
    if shutil.which("go") is None and missing_binaries():
        raise SystemExit("bench_tailnet: needs Go (or the binaries in build/tailnet)")
    if shutil.which("go") is not None:
        print(f"make tailnet, {'cold (empty GOCACHE)' if cold else 'up to date'}: "
              f"{build(cold):.2f} s")  # fmt: skip
    ups, downs = [], []
    for _ in range(runs):
        up, down = bring_up(nodes)
        ups.append(up)
        downs.append(down)
    print(
        f"{nodes}-node tailnet up (testnet + tailscaled x{nodes} + up + meshed): median"
        f" {statistics.median(ups):.2f} s (min {min(ups):.2f}, max {max(ups):.2f}, {runs} runs)"
    )
    print(f"teardown by PID: median {statistics.median(downs):.2f} s")
    times = round_trip()
    print(
        f"HTTP GET through a peer's tailscaled proxy to 100.x (userspace forwarding):"
        f" median {statistics.median(times):.2f} ms, p90"
        f" {statistics.quantiles(times, n=10)[-1]:.2f} ms ({len(times)} requests)"
    )


if __name__ == "__main__":
    main()
