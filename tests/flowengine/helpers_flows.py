"""Shared test helpers for the flow engine: the expected table, paths, replay and DB scans.

``EXPECTED`` is written out by hand from issue 2's transition table, independently of
``flowengine.states.TRANSITIONS``, so a change to the table that nobody meant fails a test.
"""

from __future__ import annotations

import sqlite3
import stat
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flowengine.models import Flow, FlowEvent
from flowengine.protocol import CallbackParams
from flowengine.states import (
    TRANSITIONS,
    Condition,
    Effects,
    ErrorEffect,
    FlowState,
    FlowTrigger,
    Secrets,
    Value,
)

S = FlowState
T = FlowTrigger
C = Condition

#: every allowed (state, trigger, condition) -> destination; anything else is forbidden
EXPECTED: dict[tuple[FlowState, FlowTrigger, Condition | None], FlowState] = {}


def _allow(
    sources: Iterable[FlowState],
    trigger: FlowTrigger,
    dest: FlowState,
    conditions: Iterable[Condition | None] = (None, C.TRANSIENT, C.PERMANENT),
) -> None:
    for source in sources:
        for condition in conditions:
            key = (source, trigger, condition)
            assert key not in EXPECTED, f"duplicate expectation {key}"
            EXPECTED[key] = dest


# an unconditioned row ignores whatever condition is passed along
_allow([S.INITIATED], T.ISSUE_URL, S.AWAITING_CODE)
# the device authorization grant (RFC 8628, issue 13): no callback, the token endpoint polled
_allow([S.INITIATED], T.ISSUE_DEVICE_CODE, S.AWAITING_DEVICE)
_allow([S.AWAITING_DEVICE], T.SLOW_DOWN, S.AWAITING_DEVICE)
_allow([S.AWAITING_CODE], T.RECEIVE_CODE, S.CODE_RECEIVED)
_allow([S.AWAITING_CODE, S.AWAITING_DEVICE], T.DENY, S.FAILED)
_allow([S.CODE_RECEIVED, S.AWAITING_DEVICE], T.EXCHANGE, S.EXCHANGED)
_allow([S.CODE_RECEIVED, S.AWAITING_DEVICE], T.EXCHANGE_FAILED, S.FAILED)
_allow([S.EXCHANGED], T.STORE, S.STORED)
_allow([S.EXCHANGED], T.STORE_FAILED, S.FAILED)
_allow([S.STORED], T.BEGIN_REFRESH, S.REFRESHING)
_allow([S.REFRESHING], T.REFRESHED, S.STORED)
# refresh_failed needs its condition: without one it is not allowed at all
_allow([S.REFRESHING], T.REFRESH_FAILED, S.STORED, [C.TRANSIENT])
_allow([S.REFRESHING], T.REFRESH_FAILED, S.EXPIRED, [C.PERMANENT])
_allow(
    [S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE, S.CODE_RECEIVED, S.STORED],
    T.EXPIRE,
    S.EXPIRED,
)
_allow([S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE], T.CANCEL, S.CANCELLED)
_allow([S.STORED, S.EXPIRED], T.REVOKE, S.REVOKED)
_allow([S.STORED, S.EXPIRED], T.SUPERSEDE, S.SUPERSEDED)

CONDITIONS: tuple[Condition | None, ...] = (None, C.TRANSIENT, C.PERMANENT)

V = Value
E = ErrorEffect
#: an authorization that ends before any token: deadline gone, secrets gone, error kept
_ENDED = Effects(deadline=V.CLEAR, error=E.SET, error_key="error", secrets=Secrets.DROP)

#: what every (trigger, condition) does besides moving the state, written out by hand
#: (issue 19) independently of TRANSITIONS
EXPECTED_EFFECTS: dict[tuple[FlowTrigger, Condition | None], Effects] = {
    (T.ISSUE_URL, None): Effects(deadline=V.GIVEN_OR_LINK_TTL),
    (T.ISSUE_DEVICE_CODE, None): Effects(deadline=V.VALID_FOR, secrets=Secrets.STORE_DEVICE),
    (T.SLOW_DOWN, None): Effects(wakes=False),
    (T.RECEIVE_CODE, None): Effects(deadline=V.CODE_TTL, secrets=Secrets.STORE_CODE),
    (T.DENY, None): _ENDED,
    (T.EXCHANGE, None): Effects(deadline=V.CLEAR, secrets=Secrets.DROP),
    (T.EXCHANGE_FAILED, None): _ENDED,
    (T.STORE, None): Effects(token_expires_at=V.GIVEN, next_check_at=V.GIVEN_OR_NOW),
    (T.STORE_FAILED, None): _ENDED,
    (T.BEGIN_REFRESH, None): Effects(wakes=False),
    (T.REFRESHED, None): Effects(
        token_expires_at=V.GIVEN, next_check_at=V.GIVEN_OR_NOW, error=E.CLEAR, wakes=False
    ),
    (T.REFRESH_FAILED, C.TRANSIENT): Effects(
        next_check_at=V.GIVEN_OR_RETRY, error=E.SET, error_key="error", wakes=False
    ),
    (T.REFRESH_FAILED, C.PERMANENT): Effects(next_check_at=V.CLEAR, error=E.SET, error_key="error"),
    (T.EXPIRE, None): Effects(
        deadline=V.CLEAR,
        next_check_at=V.CLEAR,
        error=E.NOTE,
        error_key="reason",
        secrets=Secrets.DROP,
    ),
    (T.CANCEL, None): Effects(
        deadline=V.CLEAR, error=E.NOTE, error_key="reason", secrets=Secrets.DROP
    ),
    (T.REVOKE, None): Effects(next_check_at=V.CLEAR),
    (T.SUPERSEDE, None): Effects(next_check_at=V.CLEAR),
}

#: every edge of the machine: (source, trigger, condition, dest)
EDGES: list[tuple[FlowState, FlowTrigger, Condition | None, FlowState]] = sorted(
    {
        (source, trigger, condition if trigger is T.REFRESH_FAILED else None, dest)
        for (source, trigger, condition), dest in EXPECTED.items()
    },
    key=repr,
)


def edge_id(edge: tuple[FlowState, FlowTrigger, Condition | None, FlowState]) -> str:
    source, trigger, condition, dest = edge
    return (
        f"{source.value}-{trigger.value}{f'-{condition.value}' if condition else ''}-{dest.value}"
    )


#: every combination the tests parametrize over (12 states x 16 triggers x 3 conditions)
ALL_COMBOS: list[tuple[FlowState, FlowTrigger, Condition | None]] = [
    (state, trigger, condition)
    for state in FlowState
    for trigger in FlowTrigger
    for condition in CONDITIONS
]


def combo_id(combo: tuple[FlowState, FlowTrigger, Condition | None]) -> str:
    state, trigger, condition = combo
    return f"{state.value}-{trigger.value}-{condition.value if condition else 'none'}"


def path_to(target: FlowState) -> list[tuple[FlowTrigger, Condition | None]]:
    """Shortest list of (trigger, condition) leading from ``initiated`` to ``target``."""
    queue: deque[tuple[FlowState, list[tuple[FlowTrigger, Condition | None]]]] = deque(
        [(S.INITIATED, [])]
    )
    seen = {S.INITIATED}
    while queue:
        state, steps = queue.popleft()
        if state is target:
            return steps
        for row in TRANSITIONS:
            if state in row.sources and row.dest not in seen:
                seen.add(row.dest)
                queue.append((row.dest, [*steps, (row.trigger, row.condition)]))
    raise AssertionError(f"{target} is unreachable from initiated")


def replay(flow: Flow, events: Sequence[FlowEvent]) -> FlowState:
    """Fold the events from_state -> to_state and check the ledger's invariants.

    Returns the replayed state, which the caller compares with its own model.
    """
    assert events, f"flow {flow.id} has no events"
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "seq not contiguous"
    assert flow.version == len(events), "version != number of events"
    first = events[0]
    assert (first.from_state, first.trigger, first.to_state) == (None, None, S.INITIATED)
    state = first.to_state
    for event in events[1:]:
        assert event.flow_id == flow.id
        assert event.from_state is state, f"event {event.seq} does not start where we are"
        assert event.trigger is not None
        allowed = {EXPECTED.get((state, event.trigger, c)) for c in CONDITIONS} - {None}
        assert event.to_state in allowed, f"event {event.seq} is not in the table"
        state = event.to_state
    assert [e.at for e in events] == sorted(e.at for e in events), "events out of time order"
    assert state is flow.state
    return state


def code_callback(state: str, code: str = "the-code") -> CallbackParams:
    return CallbackParams(state=state, code=code)


def error_callback(
    state: str, error: str = "access_denied", description: str | None = None
) -> CallbackParams:
    return CallbackParams(state=state, error=error, error_description=description)


TABLES = (
    "flows",
    "flow_events",
    "flow_secrets",
    "oauth_pending",
    "notifications",
    "schema_migrations",
)


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every ledger table, sorted, read through a separate connection."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in TABLES
        }
    finally:
        conn.close()


def dump_text(path: Path) -> str:
    """The whole database as SQL text (every table, every row), via a separate connection."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def table_text(path: Path, *tables: str) -> str:
    """The rows of ``tables`` as one string (for scanning for secrets)."""
    snap = snapshot(path)
    return "\n".join(repr(row) for table in tables for row in snap[table])


def file_mode(path: Path) -> int:
    """Permission bits of ``path`` (a sync helper, so async tests need not stat)."""
    return stat.S_IMODE(path.stat().st_mode)
