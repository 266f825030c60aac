"""When a grant dies on its own, and when to warn the owner before it does. [pure]

Some providers end a grant whatever the agent does: Spotify six months after the owner
authorized (refreshing does not extend it), Withings and GitHub when a refresh token goes
unused for a year or six months. The catalog states the rule (``refresh_lifetime``); this
module turns it into a date, and the date into warnings:

* ``absolute``: the grant ends ``months``/``days`` after the authorization (the code
  exchange), whatever happens in between;
* ``idle``: it ends that long after the last successful refresh (each refresh starts the
  clock again), so it only matters when refreshing keeps failing;
* ``none`` (documented never to expire), an unknown rule, or a rule with a condition
  (Google's "Testing" apps): no date.

Two warnings per deadline: :data:`SOON` when three days are left, :data:`TODAY` in the last
24 hours. A warning whose window passed unseen (the timer was down) is not sent late; past
the deadline nothing is sent (the grant is gone and the refresh failure says so).

Times are epoch seconds (floats) except ledger and event times, which are epoch ms.
Calendar months are counted in UTC: 31 Aug + 6 months = 28 (or 29) Feb, same time of day.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .catalog import RefreshLifetime
from .models import FlowEvent
from .states import FlowTrigger

__all__ = [
    "DAY",
    "SOON",
    "TODAY",
    "WARNINGS",
    "GrantWarning",
    "add_months",
    "grant_deadline",
    "grant_times",
    "next_warning_at",
    "warning_due",
]

DAY = 86_400.0
#: warning kinds (ledger notification kinds) and how long before the deadline they open
SOON = "reconnect_soon"
TODAY = "reconnect_today"
WARNINGS: tuple[tuple[str, float], ...] = ((SOON, 3 * DAY), (TODAY, 1 * DAY))


@dataclass(frozen=True, slots=True)
class GrantWarning:
    """A warning to send now: its kind and the start of its window (epoch seconds)."""

    kind: str
    opens: float
    deadline: float


def add_months(when: float, months: int) -> float:
    """``when`` plus calendar ``months`` in UTC, the day clamped to the month's end."""
    t = datetime.fromtimestamp(when, UTC)
    index = t.year * 12 + (t.month - 1) + months
    year, month = divmod(index, 12)
    day = min(t.day, calendar.monthrange(year, month + 1)[1])
    return t.replace(year=year, month=month + 1, day=day).timestamp()


def grant_deadline(
    lifetime: RefreshLifetime | None,
    *,
    authorized_at: float | None,
    last_refresh: float | None = None,
) -> float | None:
    """When the grant dies (epoch seconds), or None when that is not known."""
    if lifetime is None or lifetime.condition is not None or lifetime.rule == "none":
        return None
    if lifetime.rule == "absolute":
        start = authorized_at
    else:  # idle: the clock restarts with every successful refresh
        known = [t for t in (authorized_at, last_refresh) if t is not None]
        start = max(known) if known else None
    if start is None:
        return None
    return add_months(start, lifetime.months) + lifetime.days * DAY


def warning_due(deadline: float | None, now: float) -> GrantWarning | None:
    """The warning whose window ``now`` is in, or None (no deadline, too early, too late)."""
    if deadline is None or now >= deadline:
        return None
    due = None
    for kind, ahead in WARNINGS:  # later windows win: never send "3 days" on the last day
        if now >= deadline - ahead:
            due = GrantWarning(kind, deadline - ahead, deadline)
    return due


def next_warning_at(deadline: float | None, now: float) -> float | None:
    """When the next warning window opens after ``now`` (for the timer's schedule)."""
    if deadline is None:
        return None
    upcoming = [deadline - ahead for _, ahead in WARNINGS if deadline - ahead > now]
    return min(upcoming) if upcoming else None


def grant_times(events: Sequence[FlowEvent]) -> tuple[int | None, int | None]:
    """(authorized, last refresh) of a connection flow, epoch ms, from its ledger events.

    The authorization is the code exchange (the grant exists from then on); the last
    refresh is the latest ``refreshed`` transition.
    """
    authorized = next((e.at for e in events if e.trigger is FlowTrigger.EXCHANGE), None)
    refreshed = [e.at for e in events if e.trigger is FlowTrigger.REFRESHED]
    return authorized, (max(refreshed) if refreshed else None)
