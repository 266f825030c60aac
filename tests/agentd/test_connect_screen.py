"""``agentd connect`` on a real terminal: tmux panes of a given size, read with capture-pane.

A real ``agentd serve`` and the simulated Dexcom run; ``agentd connect dexcom`` runs in a
tmux pane (80x24, the size of a default terminal, and taller ones). The screen must show
the whole link, a QR code only where it fits (or a note), and a status line that moves,
says how long the link stays valid and that Ctrl-C cancels; Ctrl-C cancels the flow.
The pure layout and drawing functions are tested at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import segno

from agentd.terminal import DEVICE, FRAMES, plan_screen, qr_rows, status_line
from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    DaemonProcess,
    agentd_command,
    dexcom_sim,
)
from tests.conftest import real_peer_missing

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(
    TMUX is None, reason=real_peer_missing("tmux", "apt-get install tmux")
)
LINK = re.compile(r"https://localhost:\d+/v2/oauth2/login\?\S+")
BLOCKS = set("█▀▄ ")


def is_qr_row(row: str) -> bool:
    return bool(row.strip()) and set(row) <= BLOCKS


@pytest.fixture(name="inst", scope="module")
def _inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentdInstance]:
    instance = AgentdInstance(tmp_path_factory.mktemp("connect-screen"))
    instance.write_config()
    sim = dexcom_sim(instance)
    sim.start()
    instance.write_catalog(sim.base_url)
    stored = instance.run(
        "credentials", "dexcom", "--client-id", SIM_CLIENT_ID, "--secret-stdin",
        input=SIM_CLIENT_SECRET + "\n",
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    daemon = DaemonProcess(instance, name="screen-daemon")
    try:
        daemon.wait_healthy()
        yield instance
    finally:
        daemon.stop()
        sim.stop()


class Pane:
    """One tmux server (own socket) with one pane running a command, ``columns`` x ``rows``."""

    def __init__(self, inst: AgentdInstance, args: list[str], columns: int, rows: int) -> None:
        assert TMUX is not None
        self.socket = f"agentd-{uuid.uuid4().hex[:12]}"
        self.env = inst.env(TERM="xterm-256color")
        # a shell that survives Ctrl-C (a trap, not an ignore: the command gets the default)
        # prints the command's exit status and keeps the pane open to be read
        script = 'trap : INT; "$@"; echo "EXIT=$?"; exec sleep 600'
        self._tmux(
            "new-session", "-d", "-s", "t", "-x", str(columns), "-y", str(rows),
            "sh", "-c", script, "sh", *agentd_command(), *args,
        )  # fmt: skip

    def _tmux(self, *args: str) -> str:
        assert TMUX is not None
        done = subprocess.run(
            [TMUX, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=True,
        )
        return done.stdout

    def screen(self, *, joined: bool = False) -> list[str]:
        """The visible screen, one string per row (``joined``: wrapped rows as one line)."""
        out = self._tmux("capture-pane", "-p", "-t", "t", *(["-J"] if joined else []))
        return out.rstrip("\n").split("\n")

    def wait_for(self, text: str, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.screen(joined=True)
            if any(text in row for row in rows):
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} never showed:\n" + "\n".join(rows))
            time.sleep(0.1)

    def exit_status(self, timeout: float = 60) -> int:
        """Wait until the command has ended; its exit status."""
        rows = self.wait_for("EXIT=", timeout)
        (status,) = [int(row[5:]) for row in rows if re.fullmatch(r"EXIT=\d+", row)]
        return status

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def size(self) -> tuple[int, int]:
        out = self._tmux("display-message", "-p", "-t", "t", "#{pane_width} #{pane_height}")
        columns, rows = out.split()
        return int(columns), int(rows)

    def close(self) -> None:
        subprocess.run(
            [TMUX or "tmux", "-L", self.socket, "kill-server"],
            capture_output=True,
            env=self.env,
            timeout=30,
            check=False,
        )


@pytest.fixture(name="pane_factory")
def _pane_factory(inst: AgentdInstance) -> Iterator[object]:
    panes: list[Pane] = []

    def make(args: list[str], columns: int = 80, rows: int = 24) -> Pane:
        pane = Pane(inst, args, columns, rows)
        panes.append(pane)
        return pane

    yield make
    for pane in panes:
        pane.close()


def the_link(rows: list[str]) -> str:
    (link,) = [m.group(0) for row in rows for m in [LINK.search(row)] if m]
    return link


def status_row(rows: list[str]) -> str:
    (row,) = [r for r in rows if "waiting for the browser" in r]
    return row


def flow_state(inst: AgentdInstance, state_hash_source: str) -> str:
    """The state of the newest flow (the one this connect started)."""
    flows = json.loads(inst.run("flows", "--json", "--limit", "1").stdout)["flows"]
    return str(flows[0]["state"])


@needs_tmux
def test_80x24_shows_the_whole_link_and_leaves_the_qr_out_with_a_note(
    inst: AgentdInstance, pane_factory: object
) -> None:
    pane = pane_factory(["connect", "dexcom"])  # type: ignore[operator]
    assert pane.size() == (80, 24)
    rows = pane.wait_for("Ctrl-C cancels")
    link = the_link(rows)
    query = parse_qs(urlsplit(link).query)
    assert query["client_id"] == [SIM_CLIENT_ID]
    assert query["redirect_uri"] == [inst.redirect_uri]
    assert len(query["state"][0]) >= 43
    # the link is whole and starts its own row: a terminal can open it, nothing to trim
    assert any(row == link for row in rows)
    assert rows[0] == "Open this link to authorize Dexcom:"  # nothing scrolled away
    # the code cannot fit with the link in 24 rows: left out, said in one line
    (note,) = [row for row in rows if row.startswith("(QR code left out:")]
    assert re.fullmatch(
        r"\(QR code left out: needs \d\d rows, the terminal has 24; --qr shows it anyway\)", note
    ), note
    assert len(note) < 80  # one line
    assert not any(is_qr_row(row) for row in rows)
    # the status line: a spinner frame, the link's validity, how to cancel
    first = status_row(rows)
    assert first[0] in FRAMES
    assert re.search(r"· link valid for (10m|9m \d+s) · Ctrl-C cancels$", first), first
    time.sleep(1.5)  # generous: at 10 frames a second it moved many times
    second = status_row(pane.screen(joined=True))
    assert second != first
    visible = pane.screen()
    assert len(visible) <= 24
    assert visible[-1].startswith(second[:1])  # the status line is the last row written

    pane.keys("C-c")
    assert pane.exit_status() == 130
    rows = pane.screen(joined=True)
    assert "interrupted" in rows
    assert not any("waiting for the browser" in row for row in rows)  # the line was cleared
    assert not any("Traceback" in row for row in rows)
    assert flow_state(inst, link) == "cancelled"


@needs_tmux
def test_a_taller_terminal_gets_the_qr_code_with_the_link(
    inst: AgentdInstance, pane_factory: object
) -> None:
    pane = pane_factory(["connect", "dexcom"], 80, 50)  # type: ignore[operator]
    rows = pane.wait_for("Ctrl-C cancels")
    link = the_link(rows)
    code = qr_rows(link)
    shown = [row for row in pane.screen() if is_qr_row(row)]
    # every row of the code is on screen, as drawn, together with the header and link
    assert [row.rstrip() for row in shown] == [row.rstrip() for row in code if row.strip()]
    assert rows[0] == "Open this link to authorize Dexcom:"
    assert any(row == link for row in rows)
    assert not any(row.startswith("(QR code left out") for row in rows)
    pane.keys("C-c")
    assert pane.exit_status() == 130


@needs_tmux
def test_qr_forces_the_code_and_no_qr_leaves_it_out_silently(
    inst: AgentdInstance, pane_factory: object
) -> None:
    forced = pane_factory(["connect", "dexcom", "--qr"])  # type: ignore[operator]
    rows = forced.wait_for("Ctrl-C cancels")
    assert sum(is_qr_row(row) for row in rows) > 10  # printed, even though it scrolled
    forced.keys("C-c")
    assert forced.exit_status() == 130
    plain = pane_factory(["connect", "dexcom", "--no-qr"])  # type: ignore[operator]
    rows = plain.wait_for("Ctrl-C cancels")
    assert not any("QR" in row for row in rows)
    plain.keys("C-c")
    assert plain.exit_status() == 130


# ------------------------------------------------------------------- pure parts

URL = (
    "https://api.dexcom.com/v2/oauth2/login?response_type=code&client_id=" + "c" * 32
    + "&redirect_uri=https%3A%2F%2Fhost.tailnet-1234.ts.net%3A8400%2Foauth%2Fcallback"
    "&scope=offline_access&state=" + "s" * 43 + "&code_challenge=" + "v" * 43
    + "&code_challenge_method=S256"
)  # fmt: skip


def test_half_blocks_draw_exactly_the_qr_matrix() -> None:
    rows = qr_rows(URL)
    matrix = [list(r) for r in segno.make(URL, error="l").matrix_iter(border=2)]
    assert len(rows) == (len(matrix) + 1) // 2  # two module rows per text row
    top = {"█": 1, "▀": 1, "▄": 0, " ": 0}
    bottom = {"█": 1, "▀": 0, "▄": 1, " ": 0}
    redrawn = []
    for row in rows:
        redrawn.append([top[c] for c in row])
        redrawn.append([bottom[c] for c in row])
    assert redrawn[: len(matrix)] == [[int(bool(m)) for m in r] for r in matrix]


@pytest.mark.parametrize(
    ("size", "fits"),
    [((80, 24), False), ((80, 45), True), ((80, 44), False), ((60, 60), False), (None, False)],
)
def test_the_code_is_shown_only_where_it_fits(size: tuple[int, int] | None, fits: bool) -> None:
    plan = plan_screen("Dexcom", URL, size)
    code = qr_rows(URL)
    assert len(code) == 35  # a 65-module code with its margin, two module rows per row
    assert len(code[0]) == 69
    assert (plan.qr is not None) is fits
    assert (plan.note is None) is fits
    if size is not None and fits:
        assert len(plan.lines()) + 1 <= size[1]  # and the status line below it


def test_forced_and_refused() -> None:
    assert plan_screen("Dexcom", URL, (80, 24), force_qr=True).qr == qr_rows(URL)
    plan = plan_screen("Dexcom", URL, (80, 24), no_qr=True)
    assert plan.qr is None
    assert plan.note is None
    assert plan.lines()[:3] == ["Open this link to authorize Dexcom:", "", URL]


@pytest.mark.parametrize(
    ("frame", "remaining", "text"),
    [
        (0, 598.2, "⠋ waiting for the browser · link valid for 9m 58s · Ctrl-C cancels"),
        (1, 3600, "⠙ waiting for the browser · link valid for 1h · Ctrl-C cancels"),
        (11, -1, "⠙ waiting for the browser · the link has expired · Ctrl-C cancels"),
        (2, None, "⠹ waiting for the browser · Ctrl-C cancels"),
    ],
)
def test_status_line(frame: int, remaining: float | None, text: str) -> None:
    assert status_line(frame, remaining) == text
    assert len(status_line(frame, remaining, columns=20)) == 19  # never wraps


@pytest.mark.parametrize(
    ("remaining", "text"),
    [
        (598.2, "⠋ waiting for the code to be entered · code valid for 9m 58s · Ctrl-C cancels"),
        (-1, "⠋ waiting for the code to be entered · the code has expired · Ctrl-C cancels"),
    ],
)
def test_status_line_of_the_device_grant(remaining: float, text: str) -> None:
    assert status_line(0, remaining, wait=DEVICE) == text


def test_agentd_token_loads_no_terminal_code(inst: AgentdInstance) -> None:
    """``agentd token`` (both paths) imports neither this module nor a terminal library."""
    code = (
        "import sys\n"
        "from agentd.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "heavy = {'agentd.terminal', 'segno', 'rich', 'curses', 'agentd.configview'}\n"
        "print(sorted(heavy & set(sys.modules)), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    for args in (["token", "dexcom"], ["token", "oura"]):  # a token, then not connected
        result = subprocess.run(
            [str(Path(agentd_command()[0]).with_name("python")), "-c", code, *args],
            capture_output=True,
            text=True,
            env=inst.env(),
            cwd=inst.root,
            timeout=120,
        )
        assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
