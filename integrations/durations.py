"""Durations as owners type them (``--since 30d``) and ages as they read them. [pure]

An age is written the way the CLI and the bot write every duration (flowengine/timefmt.py):
``4m ago``, ``2h 5m ago``, ``3d ago``.
"""

from __future__ import annotations

import re
from datetime import timedelta

from flowengine.errors import ConfigError
from flowengine.timefmt import format_duration

__all__ = ["age", "parse_since", "since_option"]

_SINCE_RE = re.compile(r"^\s*(\d+)\s*(m|min|h|d|w|y)\s*$", re.IGNORECASE)
_SINCE_UNITS = {"m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 604_800, "y": 31_536_000}
#: the longest look-back anyone means (no CGM or scale has data from before 1970 either)
MAX_SINCE = timedelta(days=100 * 365)


def parse_since(text: str) -> timedelta:
    """``--since`` values: ``90m``, ``6h``, ``24h``, ``7d``, ``2w``, ``1y`` -> timedelta."""
    match = _SINCE_RE.match(text or "")
    if not match:
        raise ValueError(
            f"cannot read duration {text!r}: use a number and a unit m, h, d, w or y (e.g. 24h, 7d)"
        )
    amount = int(match.group(1))
    if amount <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    seconds = amount * _SINCE_UNITS[match.group(2).lower()]
    if seconds > MAX_SINCE.total_seconds():
        raise ValueError(f"duration {text!r} is too long: at most 100 years (100y)")
    return timedelta(seconds=seconds)


def since_option(text: str, *, hint: str) -> timedelta:
    """:func:`parse_since` for the ``--since`` option: a ConfigError naming it, with
    ``hint`` (the integration's examples), when the text cannot be read."""
    try:
        return parse_since(text)
    except ValueError as err:
        raise ConfigError(str(err), key="--since", hint=hint) from err


def age(delta: timedelta) -> str:
    """How long ago, for a human: ``0s ago``, ``4m ago``, ``2h 5m ago``, ``3d ago`` (a time
    ahead of the clock, from a clock that runs behind, reads ``0s ago``)."""
    return f"{format_duration(max(0.0, delta.total_seconds()))} ago"
