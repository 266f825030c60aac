"""agentd as a systemd service: the unit file, sd_notify against a real datagram socket and
a real ``agentd serve``, journald-friendly logs, ``$STATE_DIRECTORY``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd import systemd
from agentd.config import load_config
from tests.agentd.cli_helpers import AgentdInstance, DaemonProcess, free_port
from tests.conftest import real_peer_missing

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "agentd.service"
ANALYZE = shutil.which("systemd-analyze")


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_hardened_and_waits_for_tailscaled() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] == ["60"]
    assert s["ExecStart"] == ["/usr/local/bin/agentd serve"]
    assert "tailscaled.service" in s["After"][0].split()
    assert "tailscaled.service" in s["Wants"][0].split()
    assert s["User"] == ["agentd"]  # the dedicated user of agentd.sysusers
    assert s["StateDirectory"] == ["agentd"]
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[key] == [value], key
    sysusers = (UNIT.parent / "agentd.sysusers").read_text(encoding="utf-8")
    assert re.search(r"^u agentd - ", sysusers, re.MULTILINE)


def _installable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's agentd (verify checks it exists)."""
    script = Path(sys.executable).with_name("agentd")
    unit = tmp_path / "agentd.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/agentd", str(script)),
        encoding="utf-8",
    )
    return unit


@pytest.mark.skipif(ANALYZE is None, reason=real_peer_missing("systemd", "apt-get install systemd"))
def test_systemd_analyze_verifies_the_unit_without_a_warning(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = _installable_copy(tmp_path)
    verify = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    # unknown keys and bad values are only warnings: the output must be empty too
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout + verify.stderr == ""
    security = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for agentd\.service: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout  # "OK" on systemd's 0-10 scale


# --------------------------------------------------------------------- sd_notify


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket agentd sends to, read by a
    thread as systemd reads it (at once)."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET says it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.5)
        self.messages: list[str] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                self.messages.append(data.decode())
                self._changed.notify_all()

    def count(self, line: str) -> int:
        with self._changed:
            return sum(line in m.splitlines() for m in self.messages)

    def wait_for(self, line: str, *, times: int = 1, timeout: float = 60) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: self.count(line) >= times, timeout)
        if not ok:
            raise TimeoutError(f"{line!r} not {times} times; got {self.messages!r}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(name="inst")
def _inst(tmp_path: Path) -> AgentdInstance:
    instance = AgentdInstance(tmp_path / "svc", daemon_port=free_port())
    instance.write_config()
    return instance


@pytest.fixture(name="notify_socket", params=["path", "abstract"])
def _notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock = NotifySocket(path, path)
    else:
        name = f"agentd-test-{os.getpid()}-{time.monotonic_ns()}"
        sock = NotifySocket("@" + name, "\0" + name)
    yield sock
    sock.close()


def test_serve_reports_ready_watchdog_and_stopping(
    inst: AgentdInstance, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    state = tmp_path / "var-lib-agentd"
    state.mkdir(mode=0o700)
    env = {
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
        # no state_dir in the configuration: systemd's StateDirectory= decides
        "AGENTD_PATHS_STATE_DIR": "",
        "STATE_DIRECTORY": str(state),
    }
    daemon = DaemonProcess(inst, env=env, name="notify")
    try:
        notify_socket.wait_for("READY=1")
        daemon.wait_healthy()  # READY=1 came once it answered: it still does
        ready = next(m for m in notify_socket.messages if "READY=1" in m.splitlines())
        assert f"STATUS=serving {inst.redirect_uri}; running: api, timer" in ready
        # the event loop keeps pinging (every 0.2 s; a generous bound for a loaded machine)
        notify_socket.wait_for("WATCHDOG=1", times=notify_socket.count("WATCHDOG=1") + 3)
    finally:
        code = daemon.stop()
    notify_socket.wait_for("STOPPING=1")
    assert code == 0, daemon.log()
    order = [m.splitlines()[0] for m in notify_socket.messages if m]
    assert order.index("READY=1") < order.index("STOPPING=1")
    assert (state / "ledger.sqlite3").is_file()  # $STATE_DIRECTORY honoured
    assert not (inst.state_dir / "ledger.sqlite3").exists()


def test_under_journald_lines_have_no_timestamp_and_start_up_lines_come_once(
    inst: AgentdInstance,
) -> None:
    daemon = DaemonProcess(inst, journald=True, name="journal")
    try:
        daemon.wait_healthy()
    finally:
        assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    assert lines, "no log"
    for line in lines:
        assert re.match(r"^<[2-7]>[\w.]+: ", line), line  # priority prefix, no timestamp
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)
    startup = ["redirect URI: ", "listening on: ", "TLS mode: ", "owner check: ", "running: "]
    for text in startup:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert not any("Running on" in line or "API listening" in line for line in lines), lines
    (running,) = [line for line in lines if "running: " in line]
    assert running.startswith(
        "<6>agentd.daemon: running: api, timer (every 1 s); telegram bot off:"
    )
    assert "no telegram.bot_token in" in running


def test_outside_journald_the_log_keeps_its_timestamps(inst: AgentdInstance) -> None:
    daemon = DaemonProcess(inst, env={"JOURNAL_STREAM": "1:2"}, name="plain")  # not stderr's
    try:
        daemon.wait_healthy()
    finally:
        assert daemon.stop() == 0
    (running,) = [line for line in daemon.log().splitlines() if "running: " in line]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    agentd\.daemon: ", running)


# ------------------------------------------------------------------------ units


def test_notify_without_a_manager_sends_nothing() -> None:
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1"}) is False


def test_notify_to_an_abstract_socket() -> None:
    name = f"agentd-unit-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert systemd.notify("READY=1\nSTATUS=hi", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1\nSTATUS=hi"


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "42"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "43"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert systemd.watchdog_interval(env, pid=42) == interval


def test_state_directory_ranks_below_explicit_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "absent.toml"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/agentd:/var/lib/other")
    assert load_config(absent).state_dir == Path("/var/lib/agentd")
    configured = {"AGENTD_PATHS_STATE_DIR": str(tmp_path / "conf")}
    assert load_config(absent, env=configured).state_dir == tmp_path / "conf"
    monkeypatch.setenv("AGENTD_STATE_DIR", str(tmp_path / "mine"))
    assert load_config(absent).state_dir == tmp_path / "mine"
    monkeypatch.delenv("AGENTD_STATE_DIR")
    monkeypatch.setenv("STATE_DIRECTORY", "relative/ignored")
    assert load_config(absent).state_dir == Path(os.environ["XDG_STATE_HOME"]) / "agentd"
