"""Shared fixtures: asyncio as the only anyio backend, isolated XDG directories.

Real peers. Some suites need a real program next to Python: Chromium (browser tests),
Graphviz ``dot`` (SVG diagrams), Node with ``tests/e2e/oidc``'s modules (the oidc-provider
authorization server). When one is missing its tests skip with a reason built by
:func:`real_peer_missing`, and the end of the pytest run says loudly which suites were
skipped and how to get them (``make test`` installs the npm modules itself when npm is there;
``.ci/run`` installs everything; under CI, tests/test_ci_environment.py fails instead).

Network. No test reaches beyond this machine: tests/netguard.py blocks every connection to a
non-loopback address and every name lookup but ``localhost``, in this process and in the
Python subprocesses tests start (through a ``.pth`` file written into the virtualenv, active
only when ``$NETGUARD_FILE`` is set); a test during which anything was blocked fails.
"""

from __future__ import annotations

import os
import re
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netguard

_PEER = re.compile(r"real peer missing: ([\w.-]+) \((.*)\)")


def real_peer_missing(peer: str, how: str) -> str:
    """The skip reason for a test that needs ``peer``; ``how`` says how to install it."""
    return f"real peer missing: {peer} ({how})"


#: the .pth file that runs tests/netguard.py in Python subprocesses of the tests
_PTH_NAME = "agentd_oauth_tests_netguard.pth"


def _install_subprocess_guard() -> str | None:
    """Write the .pth hook into this interpreter's site-packages (once; a no-op when it is
    there already); None when it cannot be written."""
    target = Path(sysconfig.get_paths()["purelib"]) / _PTH_NAME
    try:
        if not target.is_file() or target.read_text(encoding="utf-8") != netguard.PTH_LINE:
            target.write_text(netguard.PTH_LINE, encoding="utf-8")
    except OSError as err:
        return f"cannot write {target} ({type(err).__name__}): subprocesses are not guarded"
    return None


def pytest_configure(config: pytest.Config) -> None:
    netguard.install()
    config.stash[_GUARD_PROBLEM] = _install_subprocess_guard()
    fd, log = tempfile.mkstemp(prefix="netguard-", suffix=".log")
    os.close(fd)
    os.environ["NETGUARD_FILE"] = str(Path(netguard.__file__).resolve())
    os.environ["NETGUARD_LOG"] = log


def pytest_unconfigure(config: pytest.Config) -> None:
    log = os.environ.pop("NETGUARD_LOG", None)
    os.environ.pop("NETGUARD_FILE", None)
    if log:
        Path(log).unlink(missing_ok=True)


_GUARD_PROBLEM = pytest.StashKey[str | None]()


def _subprocess_attempts() -> list[str]:
    log = os.environ.get("NETGUARD_LOG")
    try:
        return Path(log).read_text(encoding="utf-8").splitlines() if log else []
    except FileNotFoundError:
        return []


@pytest.fixture(name="no_network", autouse=True)
def _no_network() -> Iterator[None]:
    """Fail the test when it (or a subprocess of it) tried to reach the network."""
    seen, seen_sub = len(netguard.attempts), len(_subprocess_attempts())
    yield
    blocked = netguard.attempts[seen:] + _subprocess_attempts()[seen_sub:]
    if blocked:
        pytest.fail(
            f"the test tried to reach the network (loopback only): {'; '.join(blocked)}",
            pytrace=False,
        )


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
    problem = config.stash.get(_GUARD_PROBLEM, None)
    if problem:
        terminalreporter.write_line(f"netguard: {problem}", red=True, bold=True)
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
