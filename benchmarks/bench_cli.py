"""``agentd`` command-line figures.

Prints:
1. cold-process wall time of ``agentd token <provider>`` on the fast path (a fresh token in
   the vault, auth.json in sync), median and p90 over RUNS runs, next to ``python -c pass`` and
   ``python -c "import httpx"`` for reference; target: median <= 150 ms;
2. the largest imports of that fast path (``python -X importtime``, cumulative);
3. the resident set size of a running ``agentd serve`` (TLS with a trustme certificate,
   no tailscaled, no bot) right after start-up and after REQUESTS API requests
   (VmRSS and the peak VmHWM from /proc/<pid>/status).

Run: .venv/bin/python benchmarks/bench_cli.py [RUNS] [REQUESTS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowengine.tokens import TokenSet  # noqa: E402
from tests.agentd.cli_helpers import AgentdInstance, DaemonProcess, agentd_command  # noqa: E402
from tests.flowengine.helpers_vault import seed_one  # noqa: E402

TARGET_MS = 150.0


def _wall(command: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        elapsed = (time.perf_counter() - start) * 1000
        if result.returncode != 0:
            raise SystemExit(f"{command} failed ({result.returncode}): {result.stderr}")
        if i >= 2:  # two warm-up runs fill the page cache
            times.append(elapsed)
    return times


def _summary(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return f"median {statistics.median(ordered):6.1f} ms   p90 {p90:6.1f} ms"


def _rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])  # kB
    return out


def bench_token(instance: AgentdInstance, runs: int) -> None:
    access = "bench-access-token"
    now = int(time.time() * 1000)
    seed_one(
        instance.state_dir,
        instance.auth_file,
        "dexcom",
        TokenSet(
            access=access,
            refresh="bench-refresh-token",
            expires=now + 7_200_000,
            obtained_at=now,
        ),
    )
    env = instance.env()
    check = subprocess.run(
        [*agentd_command(), "token", "dexcom"], env=env, capture_output=True, text=True, check=False
    )
    assert check.stdout == access + "\n", check.stderr
    py = sys.executable
    baseline = _wall([py, "-c", "pass"], env, runs)
    with_httpx = _wall([py, "-c", "import httpx"], env, runs)
    token = _wall([*agentd_command(), "token", "dexcom"], env, runs)
    print(f"agentd token, cold process, {runs} runs (fast path: fresh token in the vault)")
    print(f"  python -c pass          {_summary(baseline)}")
    print(f"  python -c 'import httpx' {_summary(with_httpx)}")
    print(f"  agentd token dexcom     {_summary(token)}")
    median = statistics.median(token)
    verdict = "OK" if median <= TARGET_MS else "SLOWER THAN TARGET"
    print(
        f"  over baseline: {median - statistics.median(baseline):.1f} ms;"
        f" target median <= {TARGET_MS:.0f} ms: {verdict}"
    )
    imports = subprocess.run(
        [py, "-X", "importtime", "-m", "agentd.cli", "token", "dexcom"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in imports.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line[12:].split("|")
            if not name[1:].startswith(" "):  # top-level imports only
                rows.append((int(cumulative), name.strip()))
    top = sorted(rows, reverse=True)[:6]
    print("  largest imports (cumulative, us): " + ", ".join(f"{n} {c}" for c, n in top))
    every = {line.rsplit("|", 1)[1].strip() for line in imports.stderr.splitlines() if "|" in line}
    heavy = {"httpx", "anyio", "aiosqlite", "quart", "hypercorn"} & every
    print(f"  async stack imported on the fast path: {sorted(heavy) or 'none'}")


def bench_serve(instance: AgentdInstance, requests: int) -> None:
    import httpx

    daemon = DaemonProcess(instance)
    try:
        started = time.perf_counter()
        daemon.wait_healthy()
        ready = time.perf_counter() - started
        time.sleep(0.5)
        at_start = _rss(daemon.pid)
        token = (instance.state_dir / "api-token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(verify=instance.ssl_context(), timeout=10) as client:
            t0 = time.perf_counter()
            for i in range(requests):
                if i % 2:
                    response = client.get(f"{instance.base_url}/healthz")
                else:
                    response = client.get(f"{instance.base_url}/oauth/flows", headers=headers)
                response.raise_for_status()
            per_request = (time.perf_counter() - t0) * 1000 / requests
        after = _rss(daemon.pid)
    finally:
        code = daemon.stop()
    print("agentd serve (TLS, timer, no bot)")
    print(f"  healthy after            {ready * 1000:6.0f} ms (process start to /healthz 200)")
    print(f"  VmRSS after start-up     {at_start['VmRSS'] / 1024:6.1f} MiB")
    print(
        f"  VmRSS after {requests} requests {after['VmRSS'] / 1024:6.1f} MiB"
        f" (peak VmHWM {after['VmHWM'] / 1024:.1f} MiB; {per_request:.1f} ms per request,"
        " one keep-alive connection)"
    )
    print(f"  exit status after SIGTERM: {code}")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        instance = AgentdInstance(Path(tmp))
        instance.write_config(interval=30)
        bench_token(instance, runs)
        bench_serve(instance, requests)


if __name__ == "__main__":
    main()
