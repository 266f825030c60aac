"""Durations as owners type them (``--since 30d``) and ages as they read them. [pure]"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["age", "parse_since"]

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


def age(delta: timedelta) -> str:
    """How long ago, for a human: ``just now``, ``4 min ago``, ``2 h 5 min ago``, ``3 days ago``."""
    seconds = delta.total_seconds()
    if seconds < 60:
        return "just now"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min ago"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {rest} min ago" if rest else f"{hours} h ago"
    return f"{hours // 24} days ago"
