"""State diagrams for audits, generated from states.TRANSITIONS.

``python -m flowengine.diagrams diagrams`` (``make diagrams``) writes:

- ``flow-machine.md``: Mermaid ``stateDiagram-v2`` in a fenced block (renders on code hosts)
- ``flow-machine.mmd``: the same Mermaid source alone
- ``flow-machine.dot``: Graphviz source
- ``flow-machine.svg``: rendered by Graphviz ``dot`` (Debian package ``graphviz``)

A test regenerates them and fails when the committed files differ. ``flow_diagram`` draws
the same machine with one flow's path (from its ledger events) highlighted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from .errors import DotUnavailableError
from .models import FlowRecord
from .states import TRANSITIONS, FlowState, FlowTrigger

__all__ = [
    "DotUnavailableError",
    "flow_diagram",
    "machine_dot",
    "machine_mermaid",
    "render_svg",
    "write_all",
]

Edge = tuple[FlowState, FlowTrigger, FlowState]

_FINAL = (FlowState.FAILED, FlowState.CANCELLED, FlowState.REVOKED, FlowState.SUPERSEDED)


def _edges() -> list[tuple[FlowState, FlowTrigger, FlowState, str]]:
    """Every (source, trigger, dest, label) in table order."""
    rows = []
    for row in TRANSITIONS:
        label = row.trigger.value + (f" [{row.condition.value}]" if row.condition else "")
        for source in row.sources:
            rows.append((source, row.trigger, row.dest, label))
    return rows


def machine_mermaid(
    path: Iterable[Edge] = (), current: FlowState | None = None, title: str | None = None
) -> str:
    """Mermaid stateDiagram-v2 of the machine; states on ``path`` and ``current`` styled."""
    taken = list(path)
    visited = {e[0] for e in taken} | {e[2] for e in taken}
    taken_edges = {(e[0], e[1], e[2]) for e in taken}
    lines = []
    if title:
        lines += ["---", f"title: {title}", "---"]
    lines += ["stateDiagram-v2", "    direction LR"]
    lines.append(f"    [*] --> {FlowState.INITIATED.value}: start")
    for source, trigger, dest, label in _edges():
        mark = " ✔" if (source, trigger, dest) in taken_edges else ""
        lines.append(f"    {source.value} --> {dest.value}: {label}{mark}")
    for state in _FINAL:
        lines.append(f"    {state.value} --> [*]")
    if taken or current is not None:
        lines.append("    classDef visited fill:#d7f0d9,stroke:#2e7d32,stroke-width:2px")
        lines.append(
            "    classDef current fill:#2e7d32,color:#ffffff,stroke:#1b5e20,stroke-width:3px"
        )
        for state in FlowState:
            if state is current:
                lines.append(f"    class {state.value} current")
            elif state in visited:
                lines.append(f"    class {state.value} visited")
    return "\n".join(lines) + "\n"


def machine_dot(
    path: Iterable[Edge] = (), current: FlowState | None = None, title: str | None = None
) -> str:
    """Graphviz source of the machine; ``path`` edges drawn bold green."""
    taken = list(path)
    visited = {e[0] for e in taken} | {e[2] for e in taken}
    # step numbers per edge: an edge taken again (a refresh loop) lists every step
    order: dict[Edge, list[int]] = {}
    for i, e in enumerate(taken):
        order.setdefault((e[0], e[1], e[2]), []).append(i + 1)
    out = [
        "digraph flow {",
        '    graph [rankdir=LR, fontname="DejaVu Sans", fontsize=12, nodesep=0.4, ranksep=0.6'
        + (f', label="{title}", labelloc=t' if title else "")
        + "];",
        '    node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="DejaVu Sans",'
        " fontsize=11];",
        '    edge [fontname="DejaVu Sans", fontsize=9, color="#555555"];',
        '    start [shape=circle, label="", width=0.2, fillcolor="#000000"];',
    ]
    for state in FlowState:
        attrs = []
        if state is current:
            attrs += ['fillcolor="#2e7d32"', 'fontcolor="#ffffff"', "penwidth=2"]
        elif state in visited:
            attrs += ['fillcolor="#d7f0d9"', 'color="#2e7d32"', "penwidth=2"]
        if state in _FINAL:
            attrs.append("peripheries=2")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        out.append(f"    {state.value}{suffix};")
    out.append("    start -> initiated;")
    for source, trigger, dest, label in _edges():
        key = (source, trigger, dest)
        if key in order:
            out.append(
                f"    {source.value} -> {dest.value}"
                f' [label="{", ".join(map(str, order[key]))}. {label}",'
                ' color="#2e7d32", fontcolor="#2e7d32", penwidth=2.5];'
            )
        else:
            out.append(f'    {source.value} -> {dest.value} [label="{label}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def render_svg(dot_source: str) -> str:
    """Run Graphviz ``dot -Tsvg``; raises DotUnavailableError when it is missing."""
    exe = shutil.which("dot")
    if exe is None:
        raise DotUnavailableError()
    proc = subprocess.run(
        [exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dot failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


def flow_path(record: FlowRecord) -> list[Edge]:
    """The edges one flow took, from its ledger events."""
    return [
        (e.from_state, e.trigger, e.to_state)
        for e in record.events
        if e.from_state is not None and e.trigger is not None
    ]


def flow_diagram(record: FlowRecord, *, fmt: str = "mermaid") -> str:
    """The machine with ``record``'s path highlighted: ``mermaid``, ``dot`` or ``svg``."""
    title = f"flow {record.flow.id} ({record.flow.provider}): {record.flow.state.value}"
    path = flow_path(record)
    if fmt == "mermaid":
        return machine_mermaid(path, record.flow.state, title)
    if fmt == "dot":
        return machine_dot(path, record.flow.state, title)
    if fmt == "svg":
        return render_svg(machine_dot(path, record.flow.state, title))
    raise ValueError(f"unknown diagram format {fmt!r}; use mermaid, dot or svg")


def expected_files() -> dict[str, str]:
    """File name -> content for the committed machine diagrams (without the SVG)."""
    mermaid = machine_mermaid()
    doc = (
        "# Authorization flow state machine\n\n"
        "Generated from `flowengine/states.py` by `make diagrams`; do not edit by hand.\n"
        "A test fails when this file differs from what the code generates.\n\n"
        "```mermaid\n" + mermaid + "```\n\n"
        "| trigger | from | to | why | effects |\n| --- | --- | --- | --- | --- |\n"
        + "".join(
            f"| `{r.trigger.value}`"
            + (f" [{r.condition.value}]" if r.condition else "")
            + f" | {', '.join(s.value for s in r.sources)} | {r.dest.value} | {r.why}"
            + f" | {r.effects.describe()} |\n"
            for r in TRANSITIONS
        )
    )
    return {
        "flow-machine.md": doc,
        "flow-machine.mmd": mermaid,
        "flow-machine.dot": machine_dot(),
    }


def write_all(directory: str | Path) -> list[Path]:
    """Regenerate every committed diagram into ``directory``."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    files = expected_files()
    files["flow-machine.svg"] = render_svg(files["flow-machine.dot"])
    for name, content in files.items():
        path = target / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - exercised by make diagrams
    for written_path in write_all(sys.argv[1] if len(sys.argv) > 1 else "diagrams"):
        print(f"wrote {written_path}")
