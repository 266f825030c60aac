"""What the command line shows: times, scopes, tables, JSON and a flow's ledger, shared by
the commands, ``connect`` and the demo. [leaf: imports flowengine's pure timefmt only]"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from flowengine.catalog import RefreshLifetime
from flowengine.timefmt import format_duration

__all__ = [
    "EVENT_HEADER",
    "JSON_VERSION",
    "ago",
    "event_rows",
    "print_json",
    "scope_text",
    "table",
    "table_lines",
    "when",
]

#: the version of every ``--json`` shape (docs/json/*.schema.json); bumped only when a
#: field is removed or changes meaning, never when one is added
JSON_VERSION = 1


def when(ms: int | None, now: float | None = None) -> str:
    """``2026-12-05 18:10:57Z (in 1h 59m)``: UTC, and how far from now."""
    if ms is None:
        return "unknown"
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC)
    delta = _delta(ms, now)
    return f"{stamp:%Y-%m-%d %H:%M:%S}Z ({_relative(delta, ahead=delta >= 0)})"


def ago(ms: int, now: float | None = None) -> str:
    """``3h 2m ago`` (or ``in 5m`` for a time still to come)."""
    delta = _delta(ms, now)
    return _relative(delta, ahead=delta > 0)


def _delta(ms: int, now: float | None) -> float:
    return ms / 1000 - (time.time() if now is None else now)


def _relative(delta: float, *, ahead: bool) -> str:
    return f"in {format_duration(delta)}" if ahead else f"{format_duration(delta)} ago"


def scope_text(scopes: Sequence[str], source: object) -> str:
    """Scopes as shown to the owner; marked when the provider did not say what it granted."""
    text = " ".join(scopes) or "-"
    if source == "requested":
        text += " (requested; the provider did not say what it granted)"
    return text


def table_lines(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Left-aligned columns two spaces apart, the header first; no trailing spaces."""
    cells = [[str(c) for c in row] for row in (header, *rows)]
    widths = [max(len(c) for c in col) for col in zip(*cells, strict=False)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells
    ]


def table(rows: Iterable[Sequence[object]], header: Sequence[str], out: TextIO) -> None:
    out.write("".join(f"{line}\n" for line in table_lines(header, rows)))


def print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"version": JSON_VERSION, **data}, indent=2) + "\n")


EVENT_HEADER = ("SEQ", "AT (UTC)", "FROM", "TRIGGER", "TO", "ACTOR", "DETAIL")


def event_rows(events: Iterable[Any], *, detail: bool = True) -> list[list[str]]:
    """A flow's ledger events as table rows (:data:`EVENT_HEADER`; without ``detail`` the
    last column is left out)."""
    rows = []
    for e in events:
        row = [
            str(e.seq),
            datetime.fromtimestamp(e.at / 1000, tz=UTC).strftime("%H:%M:%S.%f")[:-3],
            e.from_state.value if e.from_state else "",
            e.trigger.value if e.trigger else "create",
            e.to_state.value,
            e.actor,
        ]
        if detail:
            row.append(json.dumps(e.detail, sort_keys=True) if e.detail else "")
        rows.append(row)
    return rows


def lifetime_text(lifetime: RefreshLifetime) -> str:
    """``6 months after authorization (refreshing does not extend it)``: a catalog rule."""
    if lifetime.rule == "none":
        return "never expires"
    span = " ".join(
        f"{count} {unit if count != 1 else unit[:-1]}"
        for unit, count in (("months", lifetime.months), ("days", lifetime.days))
        if count
    )
    text = (
        f"{span} after authorization (refreshing does not extend it)"
        if lifetime.rule == "absolute"
        else f"{span} after the last refresh"
    )
    return f"{text}, if {lifetime.condition}" if lifetime.condition else text
