"""`agentd demo` (the README's first command) as a person runs it: a subprocess, real stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

AGENTD = Path(sys.executable).with_name("agentd")


@pytest.fixture(name="demo", scope="module")
def _demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], float]:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT", "XDG_"))}
    env.update({"HOME": str(home), "TMPDIR": str(home)})
    started = time.monotonic()
    proc = subprocess.run(
        [str(AGENTD), "demo", "--keep"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a generous bound; its duration is reported by benchmarks/bench_api.py
        check=False,
    )
    return proc, time.monotonic() - started


def test_demo_runs_every_step_and_exits_0(
    demo: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    proc, _ = demo
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "SIMULATED" in out
    # the authorization URL with PKCE
    assert re.search(r"authorization URL: https://localhost:\d+/v2/oauth2/login\?", out)
    assert "code_challenge_method=S256" in out
    # the browser reached the callback page
    assert "callback answered 200" in out
    assert "you can close this tab" in out
    assert "referrer-policy: no-referrer" in out
    # the ledger: the whole path, then the refresh round trip
    for edge in (
        "initiated      issue_url",
        "awaiting_code  receive_code",
        "code_received  exchange",
        "exchanged      store",
        "stored      begin_refresh  refreshing",
        "refreshing  refreshed      stored",
    ):
        assert edge in out, edge
    # the per-flow diagram files exist
    diagram = re.search(r"Mermaid: (\S+\.md)", out)
    assert diagram
    assert Path(diagram.group(1)).read_text().startswith("```mermaid")
    if shutil.which("dot"):
        svg = re.search(r"SVG:     (\S+\.svg)", out)
        assert svg
        assert Path(svg.group(1)).read_text().lstrip().startswith(("<?xml", "<svg"))
    else:  # the demo says so and goes on (the summary lists graphviz as a missing peer)
        assert "SVG:     skipped (Graphviz `dot` is not installed)" in out
    # rotation: the old refresh token is refused by the provider
    assert "replaying the OLD refresh token: HTTP 400 invalid_grant" in out
    # every integration, found by discovery: Dexcom's glucose readings ...
    assert "$ agentd dexcom latest" in out
    assert re.search(r"\d+ mg/dL \S+ (\d+s|\d+m( \d+s)?) ago", out)
    # ... and Withings, connected in its own dialect, then its weight and blood pressure
    assert re.search(r"authorization URL: https://localhost:\d+/oauth2_user/authorize2\?", out)
    assert "scope=user.metrics&" in out
    assert "action=requesttoken with every token request" in out
    assert "Withings (simulated) connected — you can close this tab" in out
    assert re.search(r"weight +\d+\.\d kg", out)
    assert re.search(r"blood pressure +\d+/\d+ mmHg, pulse \d+", out)
    # a short-lived grant: the date, then one warning three days before and one on the last day
    assert re.search(r"agentd status: RECONNECT BY \d{4}-\d\d-\d\d \d\d:\d\dZ", out)
    assert "Three days left — tap to reconnect now." in out
    assert "Last day: " in out
    assert re.search(r"^ +1 +\S+ \S+ +reconnect_soon +[0-9a-f]+$", out, re.MULTILINE)
    assert re.search(r"^ +2 +\S+ \S+ +reconnect_today +[0-9a-f]+$", out, re.MULTILINE)
    assert "(repeated!)" not in out


def test_demo_never_prints_a_whole_token(
    demo: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    proc, _ = demo
    kept = re.search(r"kept (\S+)", proc.stdout)
    assert kept, proc.stdout
    root = Path(kept.group(1))
    auth = json.loads((root / "auth.json").read_text())
    entry = auth["dexcom"]
    assert entry["access"]
    assert entry["refresh"]
    assert isinstance(entry["expires"], int)
    assert (root / "auth.json").stat().st_mode & 0o777 == 0o600
    for secret in (entry["access"], entry["refresh"], "demo-secret-not-a-real-one"):
        assert secret not in proc.stdout
        assert secret not in proc.stderr
