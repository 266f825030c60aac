"""Grant lifetime forecasts: pure functions, table-driven."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flowengine.catalog import RefreshLifetime
from flowengine.forecast import (
    SOON,
    TODAY,
    add_months,
    grant_deadline,
    grant_times,
    next_warning_at,
    warning_due,
)
from flowengine.models import FlowEvent
from flowengine.states import FlowState, FlowTrigger


def ts(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


@pytest.mark.parametrize(
    ("start", "months", "end"),
    [
        (ts(2026, 1, 15, 9, 30), 6, ts(2026, 7, 15, 9, 30)),
        (ts(2026, 8, 31, 12), 6, ts(2027, 2, 28, 12)),  # clamped to February's end
        (ts(2027, 8, 31, 12), 6, ts(2028, 2, 29, 12)),  # leap year
        (ts(2026, 11, 30), 3, ts(2027, 2, 28)),
        (ts(2026, 12, 31, 23, 59), 1, ts(2027, 1, 31, 23, 59)),
        (ts(2026, 3, 1), 12, ts(2027, 3, 1)),
        (ts(2026, 3, 1), 0, ts(2026, 3, 1)),
    ],
)
def test_add_months(start: float, months: int, end: float) -> None:
    assert add_months(start, months) == end


AUTH = ts(2026, 1, 15, 9, 30)
LAST = ts(2026, 5, 1, 8, 0)


@pytest.mark.parametrize(
    ("lifetime", "authorized", "last_refresh", "deadline"),
    [
        # Spotify: six months after the owner authorized, refreshing does not extend it
        (RefreshLifetime("absolute", months=6), AUTH, LAST, ts(2026, 7, 15, 9, 30)),
        # Withings, GitHub: the clock restarts with every refresh
        (RefreshLifetime("idle", months=12), AUTH, LAST, ts(2027, 5, 1, 8, 0)),
        (RefreshLifetime("idle", months=6), AUTH, None, ts(2026, 7, 15, 9, 30)),
        (RefreshLifetime("idle", days=90), None, LAST, LAST + 90 * 86_400),
        (RefreshLifetime("absolute", days=7), AUTH, None, AUTH + 7 * 86_400),
        (RefreshLifetime("absolute", months=1, days=2), AUTH, None, ts(2026, 2, 17, 9, 30)),
        # no date: never expires, unknown, conditional (Google "Testing"), no start
        (RefreshLifetime("none"), AUTH, LAST, None),
        (None, AUTH, LAST, None),
        (RefreshLifetime("absolute", days=7, condition="app in Testing"), AUTH, None, None),
        (RefreshLifetime("absolute", months=6), None, LAST, None),
        (RefreshLifetime("idle", months=6), None, None, None),
    ],
)
def test_grant_deadline(
    lifetime: RefreshLifetime | None,
    authorized: float | None,
    last_refresh: float | None,
    deadline: float | None,
) -> None:
    assert grant_deadline(lifetime, authorized_at=authorized, last_refresh=last_refresh) == (
        deadline
    )


DEADLINE = ts(2026, 7, 15, 9, 30)
HOUR = 3600.0


@pytest.mark.parametrize(
    ("now", "kind", "next_window"),
    [
        (DEADLINE - 30 * 86_400, None, DEADLINE - 3 * 86_400),
        (DEADLINE - 3 * 86_400 - 1, None, DEADLINE - 3 * 86_400),
        (DEADLINE - 3 * 86_400, SOON, DEADLINE - 86_400),
        (DEADLINE - 2 * 86_400, SOON, DEADLINE - 86_400),
        (DEADLINE - 86_400 - 1, SOON, DEADLINE - 86_400),
        (DEADLINE - 86_400, TODAY, None),
        (DEADLINE - HOUR, TODAY, None),
        (DEADLINE - 1, TODAY, None),
        (DEADLINE, None, None),
        (DEADLINE + 86_400, None, None),
    ],
)
def test_warnings_three_days_before_and_on_the_last_day(
    now: float, kind: str | None, next_window: float | None
) -> None:
    due = warning_due(DEADLINE, now)
    assert (due.kind if due else None) == kind
    if due is not None:
        assert due.deadline == DEADLINE
        assert due.opens == DEADLINE - (3 if kind == SOON else 1) * 86_400
    assert next_warning_at(DEADLINE, now) == next_window


def test_no_deadline_no_warning() -> None:
    assert warning_due(None, AUTH) is None
    assert next_warning_at(None, AUTH) is None


def _event(seq: int, at: int, trigger: FlowTrigger | None, to: FlowState) -> FlowEvent:
    return FlowEvent("f", seq, at, None, to, trigger, "test")


def test_grant_times_from_the_ledger() -> None:
    events = [
        _event(1, 1_000, None, FlowState.INITIATED),
        _event(2, 1_100, FlowTrigger.ISSUE_URL, FlowState.AWAITING_CODE),
        _event(3, 5_000, FlowTrigger.RECEIVE_CODE, FlowState.CODE_RECEIVED),
        _event(4, 5_200, FlowTrigger.EXCHANGE, FlowState.EXCHANGED),
        _event(5, 5_300, FlowTrigger.STORE, FlowState.STORED),
        _event(6, 9_000, FlowTrigger.BEGIN_REFRESH, FlowState.REFRESHING),
        _event(7, 9_100, FlowTrigger.REFRESHED, FlowState.STORED),
        _event(8, 12_000, FlowTrigger.BEGIN_REFRESH, FlowState.REFRESHING),
        _event(9, 12_500, FlowTrigger.REFRESH_FAILED, FlowState.STORED),
    ]
    assert grant_times(events) == (5_200, 9_100)
    assert grant_times(events[:5]) == (5_200, None)
    assert grant_times(events[:2]) == (None, None)


def test_a_long_run_of_days_never_skips_or_repeats_a_window() -> None:
    """Hour by hour through the last five days: SOON for 48 h, then TODAY for 24 h."""
    seen: list[str | None] = []
    now = DEADLINE - 5 * 86_400
    while now < DEADLINE + 86_400:
        due = warning_due(DEADLINE, now)
        seen.append(due.kind if due else None)
        now += HOUR
    assert seen.count(SOON) == 48
    assert seen.count(TODAY) == 24
    first_soon, first_today = seen.index(SOON), seen.index(TODAY)
    assert first_soon == 48
    assert first_today == 96
    assert timedelta(hours=first_today - first_soon) == timedelta(days=2)
