"""Records out: JSON and CSV exports, and the listing of ``agentd <integration> …``.

An integration says how one record becomes a flat dict and which columns a CSV has (a
:class:`Rows`); the listing writes records as ``--json``, ``--csv`` or a table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from . import Services

__all__ = ["Rows", "add_listing_options", "write_listing"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rows(Generic[T]):
    """How records of one kind are exported: each as a flat dict, and the CSV's columns
    (keys of that dict). [pure]"""

    to_dict: Callable[[T], dict[str, Any]]
    fields: tuple[str, ...]

    def to_json(self, items: Iterable[T], *, indent: int | None = None) -> str:
        """A JSON array of the records' dicts."""
        return json.dumps([self.to_dict(i) for i in items], ensure_ascii=False, indent=indent)

    def to_csv(self, items: Iterable[T]) -> str:
        """CSV with a header row, one record per line (an empty cell for None)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, lineterminator="\n")
        writer.writeheader()
        for item in items:
            row = self.to_dict(item)
            writer.writerow({k: "" if row[k] is None else row[k] for k in self.fields})
        return buffer.getvalue()


def add_listing_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` or ``--csv`` (one of them) for a subcommand that ends in :func:`write_listing`."""
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")


def write_listing(
    args: argparse.Namespace,
    services: Services,
    items: Sequence[T],
    rows: Rows[T],
    *,
    line: Callable[[T], str],
    noun: str,
) -> None:
    """``items`` as ``--json``, ``--csv`` or a table: one ``line`` each, then the count
    ("12 readings") on the error stream, so a pipe gets the table alone."""
    if args.json:
        services.out.write(rows.to_json(items, indent=2) + "\n")
    elif args.csv:
        services.out.write(rows.to_csv(items))
    else:
        for item in items:
            services.out.write(line(item) + "\n")
        services.err.write(f"{len(items)} {noun}\n")
