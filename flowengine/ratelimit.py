"""Per-identity token buckets: how often a caller may fetch tokens. [pure]

Each key (an identity) has a bucket of ``burst`` tokens that refills at ``per_second``
tokens a second; a request takes one. An empty bucket answers how long until the next
token is there (the ``Retry-After``). Time is passed in (monotonic seconds), so the
module never reads a clock and its tests are tables.

A bucket that has refilled to the brim is the same as no bucket, so buckets are dropped
once full when there are more than ``max_keys`` of them: memory stays bounded however many
identities come and go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Rate", "TokenBuckets"]


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` sustained, ``burst`` at once. Both > 0."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second > 0):
            raise ValueError("per_second must be a positive number")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise ValueError("burst must be at least 1")


class TokenBuckets:
    """One token bucket per key. Not thread-safe (one event loop uses it)."""

    __slots__ = ("_buckets", "max_keys", "rate")

    def __init__(self, rate: Rate, *, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.max_keys = max_keys
        #: key -> (tokens left, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self.rate.burst
        tokens, at = found
        elapsed = max(0.0, now - at)  # a clock that went back refills nothing
        return min(self.rate.burst, tokens + elapsed * self.rate.per_second)

    def take(self, key: str, now: float) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is there (> 0)."""
        level = self._level(key, now)
        found = self._buckets.get(key)
        counted = max(now, found[1]) if found is not None else now  # time never goes back
        if level >= 1.0:
            self._buckets[key] = (level - 1.0, counted)
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)
            return 0.0
        self._buckets[key] = (level, counted)
        return (1.0 - level) / self.rate.per_second + (counted - now)

    def configure(self, rate: Rate) -> None:
        """A new rate (config reload); buckets keep their level, cut to the new burst."""
        self.rate = rate
        self._buckets = {
            key: (min(tokens, rate.burst), at) for key, (tokens, at) in self._buckets.items()
        }

    def _forget_full(self, now: float) -> None:
        full = [key for key in self._buckets if self._level(key, now) >= self.rate.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) > self.max_keys:
            # still too many (a flood of fresh keys): drop the oldest-touched
            by_age = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in by_age[: len(self._buckets) - self.max_keys]:
                del self._buckets[key]
