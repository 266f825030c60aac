"""flowengine.timefmt: the one duration format, and the CLI and the bot both use it."""

from __future__ import annotations

import time

import pytest

from flowengine.timefmt import format_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.4, "0s"),
        (45, "45s"),
        (59.4, "59s"),
        (59.6, "1m"),
        (61, "1m 1s"),
        (598, "9m 58s"),
        (3599.6, "1h"),
        (3660, "1h 1m"),
        (7140, "1h 59m"),
        (7199, "1h 59m"),  # the seconds below the second unit are dropped
        (86_400, "1d"),
        (90_000, "1d 1h"),
        (20_792 * 86_400 + 7_200, "20792d 2h"),
        (-125, "2m 5s"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_cli_and_the_bot_write_durations_alike() -> None:
    from agentd.formatting import when as _when
    from bot.texts import relative

    now_ms = int(time.time() * 1000)
    at = now_ms + 7_140_000
    assert relative(at, now_ms) == "in 1h 59m"
    assert _when(at, now=now_ms / 1000).endswith("(in 1h 59m)")
    assert relative(now_ms - 300_000, now_ms) == "5m ago"
    assert _when(now_ms - 300_000, now=now_ms / 1000).endswith("(5m ago)")
