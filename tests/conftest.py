"""Shared fixtures: asyncio as the only anyio backend, isolated XDG directories.

Real peers. Some suites need a real program next to Python: Chromium (browser tests),
Graphviz ``dot`` (SVG diagrams), Node with ``tests/e2e/oidc``'s modules (the oidc-provider
authorization server). When one is missing its tests skip with a reason built by
:func:`real_peer_missing`, and the end of the pytest run says loudly which suites were
skipped and how to get them (``make test`` installs the npm modules itself when npm is there;
``.ci/run`` installs everything; under CI, tests/test_ci_environment.py fails instead).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

_PEER = re.compile(r"real peer missing: ([\w.-]+) \((.*)\)")


def real_peer_missing(peer: str, how: str) -> str:
    """The skip reason for a test that needs ``peer``; ``how`` says how to install it."""
    return f"real peer missing: {peer} ({how})"


@pytest.fixture(name="anyio_backend")
def _anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(name="isolated_env", autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every XDG path (and auth.json) into tmp_path so no test touches the real home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    for name in ("AGENT_AUTH_FILE", "AGENTD_CONFIG", "AGENTD_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """Name every real-peer suite that was skipped, with the reason and the fix."""
    peers: dict[str, tuple[str, int]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        match = _PEER.search(_skip_reason(report))
        if match:
            peer, how = match.groups()
            peers[peer] = (how, peers.get(peer, ("", 0))[1] + 1)
    if not peers:
        return
    terminalreporter.section("REAL-PEER SUITES SKIPPED", sep="!", red=True, bold=True)
    for peer, (how, count) in sorted(peers.items()):
        terminalreporter.write_line(
            f"{count} test(s) skipped: {peer} is missing: {how}", red=True, bold=True
        )
    terminalreporter.write_line(
        "these tests did not run: the result above does not cover them", red=True, bold=True
    )
