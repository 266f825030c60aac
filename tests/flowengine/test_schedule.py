"""The scheduling maths, as tables: margins, due-ness, next checks, backoff, warnings."""

from __future__ import annotations

import pytest

from flowengine import schedule
from flowengine.schedule import TimerPolicy, TokenTimes

NOW = 1_800_000_000.0
MS = 1000
HOUR = 3600


def times(expires_in: float | None, age: float = 0.0, *, refresh: bool = True) -> TokenTimes:
    """A pair obtained ``age`` seconds ago that expires ``expires_in`` seconds from NOW."""
    obtained = int((NOW - age) * MS)
    expires = None if expires_in is None else int((NOW + expires_in) * MS)
    return TokenTimes(expires=expires, obtained_at=obtained, has_refresh=refresh)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (times(3600), 3600.0),
        (times(10), 10.0),
        (times(1800, age=1800), 3600.0),
        (times(None), None),  # unknown expiry
        (TokenTimes(expires=int(NOW * MS), obtained_at=None), None),  # unknown start
        (times(-5, age=0), None),  # expires before it was obtained: nonsense, unknown
    ],
)
def test_lifetime(t: TokenTimes, expected: float | None) -> None:
    assert schedule.lifetime(t) == expected


@pytest.mark.parametrize(
    ("t", "margin"),
    [
        (times(7200), 60.0),  # long-lived: capped at 60 s
        (times(240), 60.0),  # a quarter of 4 minutes is exactly the cap
        (times(120), 30.0),  # a quarter of the lifetime
        (times(10), 2.5),  # 10-second tokens: 2.5 s, not 60 s
        (times(None), 60.0),  # unknown lifetime: the cap
    ],
)
def test_use_margin_is_min_of_60_s_and_a_quarter_of_the_lifetime(
    t: TokenTimes, margin: float
) -> None:
    assert schedule.use_margin(t) == margin


@pytest.mark.parametrize(
    ("t", "now", "margin", "valid"),
    [
        (times(10), NOW, 2.5, True),
        (times(10), NOW + 7.4, 2.5, True),
        (times(10), NOW + 7.5, 2.5, False),  # exactly the margin left: refresh
        (times(10), NOW + 11, 0.0, False),  # dead
        (times(None), NOW + 10**9, 60.0, True),  # unknown expiry counts as valid
    ],
)
def test_valid_for(t: TokenTimes, now: float, margin: float, valid: bool) -> None:
    assert schedule.valid_for(t, now, margin) is valid


def test_a_fresh_ten_second_token_is_not_refreshed_again_on_use() -> None:
    """The refresh storm of short-lived tokens: the new token must look fresh."""
    fresh = times(10)
    assert schedule.valid_for(fresh, NOW + 0.5, schedule.use_margin(fresh))
    # with the old fixed 60 s leeway it would have been refreshed again at once
    assert not schedule.valid_for(fresh, NOW + 0.5, 60.0)


POLICY = TimerPolicy(refresh_fraction=0.25, refresh_floor=300, jitter=0.1)


@pytest.mark.parametrize(
    ("t", "lead"),
    [
        (times(HOUR), 900.0),  # 25 % of an hour
        (times(600), 300.0),  # the floor wins
        (times(240), 120.0),  # a 4-minute token: the floor is capped at half the lifetime
        (times(None), 300.0),  # unknown lifetime: the floor
    ],
)
def test_refresh_lead(t: TokenTimes, lead: float) -> None:
    assert schedule.refresh_lead(POLICY, t) == lead


@pytest.mark.parametrize(
    ("t", "now", "due"),
    [
        (times(HOUR), NOW, False),
        (times(HOUR), NOW + 2000, False),
        (times(HOUR), NOW + HOUR - 900, True),  # the lead reached
        (times(HOUR), NOW + HOUR - 1169, True),  # inside the jitter window (900 + 10 % of 2700)
        (times(HOUR), NOW + HOUR - 1171, False),
        (times(HOUR, refresh=False), NOW + HOUR - 1, False),  # no refresh token: only when dead
        (times(HOUR, refresh=False), NOW + HOUR, True),
        (times(None), NOW + 3239, False),  # unknown expiry: by age
        (times(None), NOW + 3240, True),  # 3600 * (1 - jitter)
        (TokenTimes(expires=None, obtained_at=None), NOW, True),
    ],
)
def test_is_due(t: TokenTimes, now: float, due: bool) -> None:
    assert schedule.is_due(POLICY, t, now) is due


@pytest.mark.parametrize(
    ("t", "now", "draw", "expected"),
    [
        (times(HOUR), NOW, 0.0, NOW + 2700),  # no jitter: exactly at the lead
        (times(HOUR), NOW, 1.0, NOW + 2700 - 270),  # full jitter: 10 % of the time left earlier
        (times(HOUR), NOW, 0.5, NOW + 2700 - 135),
        (times(HOUR), NOW + 3000, 0.7, NOW + 3000),  # already due: now, never in the past
        (times(HOUR, refresh=False), NOW, 0.9, NOW + HOUR),  # looked at again when it dies
        (times(None), NOW + 10, 0.0, NOW + 3600),  # unknown: unknown_expiry_check after obtained
        (times(None), NOW + 10, 1.0, NOW + 3240),
    ],
)
def test_next_check(t: TokenTimes, now: float, draw: float, expected: float) -> None:
    assert schedule.next_check(POLICY, t, now, draw) == pytest.approx(expected)


BACKOFF = TimerPolicy(backoff_base=60, backoff_max=3600, jitter=0.1, retry_after_max=86_400)


@pytest.mark.parametrize(
    ("attempts", "retry_after", "draw", "expected"),
    [
        (1, None, 0.5, 60.0),  # draw 0.5: no jitter
        (2, None, 0.5, 120.0),
        (3, None, 0.5, 240.0),
        (7, None, 0.5, 3600.0),  # capped
        (30, None, 0.5, 3600.0),
        (1, None, 0.0, 54.0),  # -10 %
        (1, None, 1.0, 66.0),  # +10 %
        (1, 900.0, 0.5, 900.0),  # the provider's Retry-After is a floor
        (2, 5.0, 0.5, 120.0),  # ... a short one changes nothing
        (1, 10.0**9, 0.5, 86_400.0),  # ... a silly one is capped
        (1, -3.0, 0.5, 60.0),  # ... a negative one is ignored
    ],
)
def test_backoff(attempts: int, retry_after: float | None, draw: float, expected: float) -> None:
    assert schedule.backoff(BACKOFF, attempts, retry_after, draw) == pytest.approx(expected)


@pytest.mark.parametrize(("attempts", "warn"), [(1, False), (2, False), (3, True), (4, False)])
def test_warn_once_per_streak(attempts: int, warn: bool) -> None:
    assert schedule.warn_now(TimerPolicy(warn_after=3), attempts) is warn


def test_timer_margin_covers_the_jitter_window() -> None:
    """A check that jitter moved as early as it can still finds the token due."""
    t = times(HOUR)
    earliest = schedule.next_check(POLICY, t, NOW, 1.0)
    assert schedule.is_due(POLICY, t, earliest)
    assert schedule.timer_margin(POLICY, t) == pytest.approx(900 + 0.1 * 2700)
