"""Time, injected. The only module that reads the wall clock.

Everything in flowengine takes a :class:`Clock`; tests pass a :class:`ManualClock` or use
freezegun against :class:`SystemClock` (which reads ``time.time`` on every call, so
freezegun's patch is seen).
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "to_ms"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to (tests, simulations)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds

    def set(self, when: float) -> None:
        self._now = float(when)


def to_ms(seconds: float) -> int:
    """Epoch seconds to the epoch milliseconds auth.json and the ledger use."""
    return int(round(seconds * 1000))
