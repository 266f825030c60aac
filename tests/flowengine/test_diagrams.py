"""The committed diagrams are what the code generates; a flow's diagram shows its own path."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowengine import diagrams
from flowengine.clock import ManualClock
from flowengine.engine import FlowEngine
from flowengine.models import FlowRecord
from flowengine.states import TRANSITIONS, FlowState, FlowTrigger
from tests.conftest import real_peer_missing

from .helpers_flows import code_callback, error_callback

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "diagrams"
HAS_DOT = shutil.which("dot") is not None
NO_DOT = real_peer_missing("graphviz", "apt-get install graphviz; it provides `dot`")
GREEN = "#2e7d32"

Edge = tuple[FlowState, FlowTrigger, FlowState]


# ------------------------------------------------------------------ committed files


@pytest.mark.parametrize("name", sorted(diagrams.expected_files()))
def test_committed_diagram_is_up_to_date(name: str) -> None:
    committed = (COMMITTED / name).read_text(encoding="utf-8")
    assert committed == diagrams.expected_files()[name], (
        f"diagrams/{name} is stale: run `make diagrams` and commit the result"
    )


@pytest.mark.skipif(not HAS_DOT, reason=NO_DOT)
def test_committed_svg_is_up_to_date() -> None:
    svg = diagrams.render_svg(diagrams.expected_files()["flow-machine.dot"])
    assert svg == (COMMITTED / "flow-machine.svg").read_text(encoding="utf-8"), (
        "diagrams/flow-machine.svg is stale: run `make diagrams` and commit the result"
    )


@pytest.mark.skipif(not HAS_DOT, reason=NO_DOT)
def test_write_all_reproduces_the_committed_directory(tmp_path: Path) -> None:
    written = diagrams.write_all(tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(p.name for p in COMMITTED.iterdir())
    for path in written:
        assert path.read_bytes() == (COMMITTED / path.name).read_bytes(), path.name


def test_the_machine_diagrams_draw_every_row_of_the_table() -> None:
    mermaid = diagrams.machine_mermaid()
    dot = diagrams.machine_dot()
    for row in TRANSITIONS:
        label = row.trigger.value + (f" [{row.condition.value}]" if row.condition else "")
        for source in row.sources:
            assert f"    {source.value} --> {row.dest.value}: {label}\n" in mermaid
            assert f'    {source.value} -> {row.dest.value} [label="{label}"];\n' in dot
    edges = sum(len(row.sources) for row in TRANSITIONS)
    assert len(re.findall(r"^    \w+ --> \w+: ", mermaid, re.M)) == edges
    assert "class " not in mermaid  # nothing highlighted without a flow
    assert GREEN not in dot
    table = diagrams.expected_files()["flow-machine.md"]
    assert table.count("\n| `") == len(TRANSITIONS)


def test_missing_dot_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(diagrams.DotUnavailableError, match="apt-get install graphviz"):
        diagrams.render_svg("digraph {}")


# ------------------------------------------------------------------- one flow's path


def mermaid_marked(text: str) -> set[tuple[str, str, str]]:
    """(source, trigger, dest) of every edge carrying the taken-mark."""
    found = set()
    for src, dst, label in re.findall(r"^    (\w+) --> (\w+): (.+) ✔$", text, re.M):
        found.add((src, label.split(" [")[0], dst))
    return found


def dot_green(text: str) -> dict[tuple[str, str, str], list[int]]:
    """(source, trigger, dest) -> step numbers of every edge drawn in the path colour."""
    found = {}
    pattern = r'^    (\w+) -> (\w+) \[label="([\d, ]+)\. ([\w ]+?)(?: \[\w+\])?", color="#2e7d32"'
    for src, dst, steps, trigger in re.findall(pattern, text, re.M):
        found[(src, trigger, dst)] = [int(n) for n in steps.split(", ")]
    return found


def as_names(path: list[Edge]) -> set[tuple[str, str, str]]:
    return {(a.value, t.value, b.value) for a, t, b in path}


@pytest.fixture(name="refreshed_record")
async def _refreshed_record(tmp_path: Path) -> AsyncIterator[FlowRecord]:
    """A flow that was connected, refreshed twice (one transient failure) and revoked."""
    async with await FlowEngine.open(tmp_path / "l.sqlite3", clock=ManualClock()) as engine:
        started = await engine.start("dexcom", redirect_uri="https://h/cb", actor="bot")
        fid = started.flow.id
        await engine.issue_url(fid, actor="bot")
        await engine.record_callback(code_callback(started.state))
        await engine.take_code(started.state)
        await engine.record_exchange(fid, actor="bot")
        await engine.record_stored(fid, actor="bot", token_expires_at=None)
        await engine.begin_refresh(fid, actor="timer")
        await engine.record_refresh_failed(
            fid, actor="timer", permanent=False, error_code="temporarily_unavailable"
        )
        await engine.begin_refresh(fid, actor="timer")
        await engine.record_refreshed(fid, actor="timer", token_expires_at=None)
        await engine.revoke(fid, actor="cli")
        yield await engine.inspect(fid)


@pytest.mark.anyio
async def test_flow_diagram_highlights_exactly_the_edges_taken(
    refreshed_record: FlowRecord,
) -> None:
    path = diagrams.flow_path(refreshed_record)
    assert [t for _a, t, _b in path] == [
        FlowTrigger.ISSUE_URL,
        FlowTrigger.RECEIVE_CODE,
        FlowTrigger.EXCHANGE,
        FlowTrigger.STORE,
        FlowTrigger.BEGIN_REFRESH,
        FlowTrigger.REFRESH_FAILED,
        FlowTrigger.BEGIN_REFRESH,
        FlowTrigger.REFRESHED,
        FlowTrigger.REVOKE,
    ]
    mermaid = diagrams.flow_diagram(refreshed_record, fmt="mermaid")
    assert mermaid_marked(mermaid) == as_names(path)
    assert f"    class {FlowState.REVOKED.value} current" in mermaid
    visited = {a for a, _t, _b in path} | {b for _a, _t, b in path}
    styled = set(re.findall(r"^    class (\w+) visited$", mermaid, re.M))
    assert styled == {s.value for s in visited - {FlowState.REVOKED}}
    assert f"title: flow {refreshed_record.flow.id} (dexcom): revoked" in mermaid

    dot = diagrams.flow_diagram(refreshed_record, fmt="dot")
    green = dot_green(dot)
    assert set(green) == as_names(path)
    # the refresh loop's edge shows both steps that took it
    assert green[("stored", "begin_refresh", "refreshing")] == [5, 7]
    assert sorted(n for steps in green.values() for n in steps) == list(range(1, len(path) + 1))
    green_lines = [line for line in dot.splitlines() if " -> " in line and GREEN in line]
    assert len(green_lines) == len(as_names(path))


@pytest.mark.anyio
async def test_a_failed_flow_highlights_only_its_short_path(tmp_path: Path) -> None:
    async with await FlowEngine.open(tmp_path / "l.sqlite3", clock=ManualClock()) as engine:
        started = await engine.start("oura", redirect_uri="https://h/cb", actor="bot")
        await engine.record_callback(error_callback(started.state))
        text = await engine.flow_diagram(started.flow.id)
        dot = await engine.flow_diagram(started.flow.id, fmt="dot")
    assert mermaid_marked(text) == {
        ("initiated", "issue_url", "awaiting_code"),
        ("awaiting_code", "deny", "failed"),
    }
    assert dot_green(dot) == {
        ("initiated", "issue_url", "awaiting_code"): [1],
        ("awaiting_code", "deny", "failed"): [2],
    }


@pytest.mark.anyio
@pytest.mark.skipif(not HAS_DOT, reason=NO_DOT)
async def test_flow_diagram_as_svg(refreshed_record: FlowRecord) -> None:
    svg = diagrams.flow_diagram(refreshed_record, fmt="svg")
    assert svg.lstrip().startswith("<?xml")
    assert "</svg>" in svg
    assert GREEN in svg
    assert refreshed_record.flow.id in svg


@pytest.mark.anyio
async def test_unknown_format_is_refused(refreshed_record: FlowRecord) -> None:
    with pytest.raises(ValueError, match="unknown diagram format"):
        diagrams.flow_diagram(refreshed_record, fmt="png")
