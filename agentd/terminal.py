"""What ``agentd connect`` shows on a terminal: the link, a QR code that fits, a live status.

Pure parts (tested as functions): :func:`qr_rows` draws a QR code with half-block
characters (two modules per character cell: a 61-module code takes 33 rows, not 65);
:func:`plan_screen` decides whether it fits next to the link in the terminal, or is left
out with a one-line note (``--qr`` prints it anyway, ``--no-qr`` never); :func:`status_line`
is one frame of the spinner line with the link's remaining validity and "Ctrl-C cancels".

:class:`WaitingLine` is the only part with effects: a task that redraws the status line on
standard error several times a second while the command waits for the browser (on a
terminal; elsewhere it says once what it waits for). No terminal library is needed for
this; nothing here is imported by ``agentd token``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from flowengine.timefmt import format_duration

__all__ = [
    "FRAMES",
    "ScreenPlan",
    "WaitingLine",
    "plan_screen",
    "qr_rows",
    "show_link",
    "status_line",
    "terminal_size",
]

#: spinner frames (braille dots), one per redraw
FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
#: seconds between redraws of the status line
TICK = 0.1
#: modules of light margin around the code (the standard asks 4; phones read 2 well)
QUIET_ZONE = 2
#: black on white, whatever the terminal's colours: a scanner needs dark modules on light
_QR_COLOURS = ("\x1b[30;107m", "\x1b[0m")


def qr_rows(url: str, *, border: int = QUIET_ZONE) -> list[str]:
    """The QR code of ``url`` as text rows, dark modules drawn, two module rows per row."""
    import segno

    matrix = [list(row) for row in segno.make(url, error="l").matrix_iter(border=border)]
    if len(matrix) % 2:
        matrix.append([0] * len(matrix[0]))
    glyphs = {(0, 0): " ", (1, 0): "▀", (0, 1): "▄", (1, 1): "█"}
    return [
        "".join(glyphs[bool(top), bool(bottom)] for top, bottom in zip(upper, lower, strict=True))
        for upper, lower in zip(matrix[0::2], matrix[1::2], strict=True)
    ]


def _wrapped(text: str, columns: int) -> int:
    """Rows ``text`` takes on a terminal ``columns`` wide (it wraps, it is not broken)."""
    return max(1, math.ceil(len(text) / max(1, columns)))


@dataclass(frozen=True, slots=True)
class ScreenPlan:
    """What to print: the header, the link, and the QR code or why it is left out."""

    header: str
    link: str
    qr: list[str] | None
    note: str | None

    def lines(self) -> list[str]:
        out = [self.header, "", self.link, ""]
        if self.qr is not None:
            out += [*self.qr, ""]
        elif self.note:
            out += [self.note, ""]
        return out


def plan_screen(
    name: str,
    url: str,
    size: tuple[int, int] | None,
    *,
    force_qr: bool = False,
    no_qr: bool = False,
) -> ScreenPlan:
    """The link, and the QR code when it fits with it (and the status line) in ``size``
    (columns, rows; None: not a terminal). The link is printed whole on one line, never
    indented, so a terminal can open it and copying it takes no stray spaces."""
    header = f"Open this link to authorize {name}:"
    if no_qr:
        return ScreenPlan(header, url, None, None)
    qr = qr_rows(url)
    if force_qr:
        return ScreenPlan(header, url, qr, None)
    if size is None:
        note = "(QR code left out: the output is no terminal; --qr shows it anyway)"
        return ScreenPlan(header, url, None, note)
    columns, rows = size
    # header, blank, the link (wrapped), blank, the code, blank, the status line
    needed = 1 + 1 + _wrapped(url, columns) + 1 + len(qr) + 1 + 1
    width = len(qr[0]) if qr else 0
    if width <= columns and needed <= rows:
        return ScreenPlan(header, url, qr, None)
    if width <= columns:
        why = f"needs {needed} rows, the terminal has {rows}"
    else:
        why = f"needs {width} columns, the terminal has {columns}"
    note = f"(QR code left out: {why}; --qr shows it anyway)"  # one line at 80 columns
    return ScreenPlan(header, url, None, note)


def terminal_size(stream: TextIO) -> tuple[int, int] | None:
    """(columns, rows) of the terminal ``stream`` writes to, or None when it is none."""
    try:
        if not stream.isatty():
            return None
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return size.columns, size.lines


def show_link(
    name: str,
    url: str,
    *,
    force_qr: bool = False,
    no_qr: bool = False,
    out: TextIO | None = None,
) -> ScreenPlan:
    """Print the link (and the QR code when it fits ``out``'s terminal); the plan used."""
    out = out or sys.stdout
    size = terminal_size(out)
    plan = plan_screen(name, url, size, force_qr=force_qr, no_qr=no_qr)
    out.write(f"{plan.header}\n\n{plan.link}\n\n")
    if plan.qr is not None:
        start, end = _QR_COLOURS if size is not None else ("", "")
        out.write("".join(f"{start}{row}{end}\n" for row in plan.qr) + "\n")
    elif plan.note:
        out.write(plan.note + "\n\n")
    out.flush()  # the link must show now, also when stdout is a pipe (tee, a log)
    return plan


@dataclass(frozen=True, slots=True)
class Wait:
    """What ``connect`` waits for, and what expires meanwhile."""

    #: ``waiting for the browser``
    doing: str
    #: ``link``: what the deadline is of
    thing: str


#: a link opened in a browser that comes back to the daemon
BROWSER = Wait("waiting for the browser", "link")
#: a code entered on any device (RFC 8628), the provider polled
DEVICE = Wait("waiting for the code to be entered", "code")


def status_line(
    frame: int, remaining: float | None, columns: int = 80, wait: Wait = BROWSER
) -> str:
    """One frame: ``⠹ waiting for the browser · link valid for 9m 58s · Ctrl-C cancels``."""
    spinner = FRAMES[frame % len(FRAMES)]
    if remaining is None:
        validity = ""
    elif remaining > 0:
        validity = f" · {wait.thing} valid for {format_duration(remaining)}"
    else:
        validity = f" · the {wait.thing} has expired"
    text = f"{spinner} {wait.doing}{validity} · Ctrl-C cancels"
    return text[: max(1, columns - 1)]  # never the last column: no wrap, no scroll


class WaitingLine:
    """The status line while ``connect`` waits: redrawn every :data:`TICK` seconds on a
    terminal, said once otherwise; cleared when the wait ends."""

    def __init__(
        self,
        out: TextIO,
        *,
        deadline_ms: int | None,
        now_ms: Callable[[], int],
        wait: Wait = BROWSER,
    ) -> None:
        self._out = out
        self._wait = wait
        self._deadline = deadline_ms
        self._now = now_ms
        self._size = terminal_size(out)
        self._frame = 0

    def remaining(self) -> float | None:
        return None if self._deadline is None else (self._deadline - self._now()) / 1000

    def draw(self) -> None:
        columns = self._size[0] if self._size else 80
        line = status_line(self._frame, self.remaining(), columns, self._wait)
        self._frame += 1
        self._out.write(f"\r{line}\x1b[K")
        self._out.flush()

    def clear(self) -> None:
        if self._size is not None:
            self._out.write("\r\x1b[K")
            self._out.flush()

    async def run(self) -> None:
        import anyio

        if self._size is None:
            left = self.remaining()
            thing = self._wait.thing
            valid = f"; the {thing} is valid for {format_duration(left)}" if left else ""
            self._out.write(f"{self._wait.doing}{valid} (Ctrl-C cancels)\n")
            self._out.flush()
            return
        while True:
            self.draw()
            await anyio.sleep(TICK)


@asynccontextmanager
async def waiting(
    out: TextIO,
    *,
    deadline_ms: int | None,
    now_ms: Callable[[], int],
    wait: Wait = BROWSER,
) -> AsyncIterator[Any]:
    """Show :class:`WaitingLine` for the duration of the ``async with`` block."""
    import anyio

    line = WaitingLine(out, deadline_ms=deadline_ms, now_ms=now_ms, wait=wait)
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(line.run)
        try:
            yield line
        except Exception as err:  # noqa: BLE001 - re-raised below, as itself
            error = err  # (inside the task group it would come out as an ExceptionGroup)
        finally:
            tg.cancel_scope.cancel()
            line.clear()
    if error is not None:
        raise error
