"""When to refresh, when to retry, when to warn: pure functions of times and a policy. [pure]

Times are epoch seconds (floats) except the token's own ``expires``/``obtained_at``, which
are epoch milliseconds as auth.json and the vault keep them. Randomness comes in as a
number in [0, 1) drawn by the caller (``random.random()``), so every function here is a
plain function of its arguments and its tests are tables.

Two margins, on purpose different:

* **on use** (``use_margin``): a caller asking for a token gets a refresh first when the
  token has less than min(60 s, a quarter of its lifetime) left. A 10-second token is
  refreshed when 2.5 s are left, so a freshly refreshed short-lived token is never
  refreshed again by the next caller (a fixed 60 s leeway refreshed it every time);
* **by the timer** (``refresh_lead``): well ahead of expiry, when ``refresh_fraction`` of
  the lifetime is left or ``refresh_floor`` seconds (at most half the lifetime), whichever
  comes first, minus jitter (only ever earlier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "USE_MARGIN_CAP",
    "TimerPolicy",
    "TokenTimes",
    "backoff",
    "is_due",
    "lifetime",
    "next_check",
    "refresh_lead",
    "timer_margin",
    "use_margin",
    "valid_for",
    "warn_now",
]

#: the on-use margin never exceeds this (seconds)
USE_MARGIN_CAP = 60.0


@dataclass(frozen=True, slots=True)
class TimerPolicy:
    """How often the timer sweeps and when it refreshes. Seconds unless said otherwise."""

    #: seconds between sweeps
    interval: float = 30.0
    #: refresh when this fraction of the access token's lifetime is left ...
    refresh_fraction: float = 0.25
    #: ... or when it is this close to expiry, whichever comes first (at most half the
    #: lifetime, so short-lived tokens are not refreshed on every sweep)
    refresh_floor: float = 300.0
    #: relative jitter: checks move up to this fraction earlier, backoff +- this fraction
    jitter: float = 0.1
    #: tokens of unknown lifetime are refreshed (checked) this long after they were obtained
    unknown_expiry_check: float = 3600.0
    #: first retry delay after a failure; doubles on every consecutive failure
    backoff_base: float = 60.0
    backoff_max: float = 3600.0
    #: a provider's Retry-After is honoured up to this long
    retry_after_max: float = 86_400.0
    #: queue one ``refresh_failing`` notification after this many consecutive failures
    warn_after: int = 3
    #: most connections looked at in one sweep (the rest wait for the next one)
    batch: int = 500
    #: refreshes of different providers running at once within a sweep
    concurrency: int = 8


class TokenTimes(NamedTuple):
    """What scheduling needs to know about a token pair (no secret)."""

    expires: int | None  # epoch ms; None = unknown
    obtained_at: int | None  # epoch ms
    has_refresh: bool = True


def lifetime(times: TokenTimes) -> float | None:
    """Seconds the access token was issued for, when both ends are known."""
    if times.expires is None or times.obtained_at is None or times.expires <= times.obtained_at:
        return None
    return (times.expires - times.obtained_at) / 1000


def use_margin(times: TokenTimes, cap: float = USE_MARGIN_CAP) -> float:
    """Seconds of validity a token must have left to be handed out without a refresh."""
    span = lifetime(times)
    return cap if span is None else min(cap, span / 4)


def valid_for(times: TokenTimes, now: float, margin: float) -> bool:
    """Usable for at least ``margin`` more seconds. Unknown expiry counts as valid."""
    return times.expires is None or times.expires / 1000 - margin > now


def refresh_lead(policy: TimerPolicy, times: TokenTimes) -> float:
    """Seconds before expiry at which the timer refreshes."""
    span = lifetime(times)
    if span is None:
        return policy.refresh_floor
    return max(policy.refresh_fraction * span, min(policy.refresh_floor, span / 2))


def timer_margin(policy: TimerPolicy, times: TokenTimes) -> float:
    """``refresh_lead`` widened by the jitter window: a check that jitter moved earlier
    still finds the token due, and asks the broker for at least this much validity."""
    lead = refresh_lead(policy, times)
    span = lifetime(times)
    if span is None:
        return lead
    return lead + policy.jitter * max(0.0, span - lead)


def is_due(policy: TimerPolicy, times: TokenTimes, now: float) -> bool:
    """Should the timer refresh (or, without a refresh token, expire) these tokens now?"""
    if times.expires is None:
        if times.obtained_at is None:
            return True
        age = now - times.obtained_at / 1000
        return age >= policy.unknown_expiry_check * (1 - policy.jitter)
    if not times.has_refresh:
        return times.expires / 1000 <= now
    return not valid_for(times, now, timer_margin(policy, times))


def next_check(policy: TimerPolicy, times: TokenTimes, now: float, draw: float) -> float:
    """When (epoch seconds) the timer looks at a connection next; never before ``now``.

    ``draw`` in [0, 1) moves the check earlier by up to ``jitter`` of the time left.
    """
    if times.expires is None:
        start = now if times.obtained_at is None else times.obtained_at / 1000
        due = start + policy.unknown_expiry_check
        spread = policy.jitter * policy.unknown_expiry_check
    elif not times.has_refresh:
        # nothing to refresh with: look again when it dies, to mark it expired
        return max(now, times.expires / 1000)
    else:
        due = times.expires / 1000 - refresh_lead(policy, times)
        spread = policy.jitter * max(0.0, due - now)
    return max(now, due - spread * draw)


def backoff(policy: TimerPolicy, attempts: int, retry_after: float | None, draw: float) -> float:
    """Seconds before retry number ``attempts`` (1 = after the first failure).

    Exponential from ``backoff_base``, capped at ``backoff_max``, jittered by ``draw``
    (0.5 = no jitter); a provider's Retry-After is a floor, capped at ``retry_after_max``.
    """
    delay = float(min(policy.backoff_max, policy.backoff_base * 2.0 ** max(0, attempts - 1)))
    delay *= 1.0 + policy.jitter * (2 * draw - 1)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, policy.retry_after_max))
    return delay


def warn_now(policy: TimerPolicy, attempts: int) -> bool:
    """Queue the owner one ``refresh_failing`` notice per failure streak, at this count."""
    return attempts == policy.warn_after
