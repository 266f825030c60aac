"""Per-identity token buckets. [pure: tables, time passed in]"""

from __future__ import annotations

import pytest

from flowengine.ratelimit import Rate, TokenBuckets


@pytest.mark.parametrize(
    ("rate", "steps"),
    [
        # (at, key, expected wait): burst 3, one a second
        (
            Rate(1.0, 3),
            [
                (0.0, "a", 0.0),
                (0.0, "a", 0.0),
                (0.0, "a", 0.0),
                (0.0, "a", 1.0),  # empty: the next token in a second
                (0.0, "b", 0.0),  # another identity has its own bucket
                (0.5, "a", 0.5),
                (1.0, "a", 0.0),
                (1.0, "a", 1.0),
                (10.0, "a", 0.0),  # refilled, but never above the burst
                (10.0, "a", 0.0),
                (10.0, "a", 0.0),
                (10.0, "a", 1.0),
            ],
        ),
        # ten a second, burst 1: every 0.1 s
        (
            Rate(10.0, 1),
            [(0.0, "a", 0.0), (0.05, "a", 0.05), (0.1, "a", 0.0), (0.1, "a", 0.1)],
        ),
        # a clock that goes back refills nothing
        (Rate(1.0, 1), [(5.0, "a", 0.0), (4.0, "a", 2.0), (5.0, "a", 1.0), (6.0, "a", 0.0)]),
    ],
)
def test_buckets(rate: Rate, steps: list[tuple[float, str, float]]) -> None:
    buckets = TokenBuckets(rate)
    for at, key, wait in steps:
        assert buckets.take(key, at) == pytest.approx(wait), (at, key)


def test_a_refused_request_takes_nothing() -> None:
    buckets = TokenBuckets(Rate(1.0, 1))
    assert buckets.take("a", 0.0) == 0.0
    for _ in range(100):  # hammering while empty does not push the next token away
        assert buckets.take("a", 0.5) == pytest.approx(0.5)
    assert buckets.take("a", 1.0) == 0.0


def test_configure_keeps_levels_within_the_new_burst() -> None:
    buckets = TokenBuckets(Rate(1.0, 10))
    for _ in range(4):
        buckets.take("a", 0.0)  # 6 left
    buckets.configure(Rate(100.0, 2))
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == pytest.approx(0.01)


def test_memory_stays_bounded() -> None:
    buckets = TokenBuckets(Rate(1.0, 2), max_keys=100)
    for i in range(1000):
        buckets.take(f"k{i}", float(i) / 1000)
    assert len(buckets) <= 101
    # full buckets were the ones forgotten: a recent key keeps its level
    buckets.take("recent", 2.0)
    buckets.take("recent", 2.0)
    assert buckets.take("recent", 2.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("per_second", "burst"),
    [(0.0, 1), (-1.0, 1), (float("nan"), 1), (float("inf"), 1), (1.0, 0), (1.0, float("nan"))],
)
def test_rate_must_make_sense(per_second: float, burst: float) -> None:
    with pytest.raises(ValueError, match="per_second|burst"):
        Rate(per_second, burst)
