"""Durations as owners type them, ages as they read them: table-driven. [pure module]"""

from __future__ import annotations

from datetime import timedelta

import pytest

from integrations.durations import age, parse_since


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("30d", timedelta(days=30)),
        ("1y", timedelta(days=365)),
        ("90min", timedelta(minutes=90)),
        (" 2 W ", timedelta(weeks=2)),
        ("100y", timedelta(days=36_500)),
    ],
)
def test_parse_since(text: str, delta: timedelta) -> None:
    assert parse_since(text) == delta


@pytest.mark.parametrize(
    "text", ["", "30", "d", "0y", "-1d", "1.5d", "3mo", "soon", "101y", "99999999d", "9" * 40 + "m"]
)
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_since(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s ago"),
        (59, "59s ago"),
        (60, "1m ago"),
        (3599, "59m 59s ago"),
        (3600, "1h ago"),
        (3660, "1h 1m ago"),
        (47 * 3600 + 59 * 60, "1d 23h ago"),
        (48 * 3600, "2d ago"),
        (-30, "0s ago"),
    ],
)
def test_age(seconds: int, text: str) -> None:
    assert age(timedelta(seconds=seconds)) == text
