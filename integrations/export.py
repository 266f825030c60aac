"""Records out: JSON and CSV exports, and the listing of ``agentd <integration> …``.

An integration turns each record into a flat dict (its ``*_to_dict``); these write them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from . import Services

__all__ = ["rows_to_csv", "rows_to_json", "write_listing"]

T = TypeVar("T")


def rows_to_json(rows: Iterable[Mapping[str, Any]], *, indent: int | None = None) -> str:
    """A JSON array of the rows. [pure]"""
    return json.dumps(list(rows), ensure_ascii=False, indent=indent)


def rows_to_csv(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """CSV with a header row of ``fields``, one row per line (empty cell for None). [pure]"""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in fields})
    return buffer.getvalue()


def write_listing(
    args: argparse.Namespace,
    services: Services,
    items: Sequence[T],
    *,
    to_json: Callable[[Sequence[T]], str],
    to_csv: Callable[[Sequence[T]], str],
    line: Callable[[T], str],
    noun: str,
) -> None:
    """``items`` as ``--json``, ``--csv`` or a table: one ``line`` each, then the count
    ("12 readings") on the error stream, so a pipe gets the table alone."""
    if args.json:
        services.out.write(to_json(items) + "\n")
    elif args.csv:
        services.out.write(to_csv(items))
    else:
        for item in items:
            services.out.write(line(item) + "\n")
        services.err.write(f"{len(items)} {noun}\n")
