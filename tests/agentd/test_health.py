"""agentd.health: a connection's health from its state, token and ledger events (table)."""

from __future__ import annotations

import pytest

from agentd.health import EXPIRES_SOON_S, Health, LastError, assess, last_error
from flowengine.models import FlowEvent
from flowengine.states import FlowState, FlowTrigger

S, T = FlowState, FlowTrigger
NOW = 1_800_000_000_000
HOUR = 3_600_000


def ev(seq: int, at: int, trigger: FlowTrigger | None, to: FlowState, **detail: str) -> FlowEvent:
    return FlowEvent("f1", seq, at, None, to, trigger, "timer", dict(detail))


CONNECTED = [
    ev(1, NOW - 10 * HOUR, None, S.INITIATED),
    ev(2, NOW - 10 * HOUR, T.ISSUE_URL, S.AWAITING_CODE),
    ev(3, NOW - 10 * HOUR, T.RECEIVE_CODE, S.CODE_RECEIVED),
    ev(4, NOW - 10 * HOUR, T.EXCHANGE, S.EXCHANGED),
    ev(5, NOW - 10 * HOUR, T.STORE, S.STORED),
]


def failing(start: int, count: int, code: str = "temporarily_unavailable") -> list[FlowEvent]:
    out = []
    for i in range(count):
        at = start + i * HOUR
        out += [
            ev(10 + 2 * i, at, T.BEGIN_REFRESH, S.REFRESHING),
            ev(11 + 2 * i, at, T.REFRESH_FAILED, S.STORED, error=f"{code}{i}"),
        ]
    return out


REFRESHED = [
    ev(40, NOW - HOUR, T.BEGIN_REFRESH, S.REFRESHING),
    ev(41, NOW - HOUR, T.REFRESHED, S.STORED),
]


@pytest.mark.parametrize(
    ("state", "expires", "refresh", "error", "events", "expected"),
    [
        ("stored", NOW + HOUR, True, None, CONNECTED, Health("ok")),
        ("stored", None, True, None, CONNECTED, Health("ok")),
        ("external", NOW + HOUR, True, None, [], Health("ok")),
        # expired but renewable: the next token request refreshes it
        ("stored", NOW - HOUR, True, None, CONNECTED, Health("refresh_due", NOW - HOUR)),
        ("external", NOW - 1, True, None, [], Health("refresh_due", NOW - 1)),
        # a streak of transient failures: since the first, the latest's code
        (
            "stored",
            NOW + HOUR,
            True,
            "temporarily_unavailable2",
            CONNECTED + failing(NOW - 5 * HOUR, 3),
            Health("refresh_failing", NOW - 5 * HOUR, "temporarily_unavailable2"),
        ),
        # ... also when the token has meanwhile expired (the issue's "stored" for 20,792 days)
        (
            "stored",
            NOW - 20_792 * 24 * HOUR,
            True,
            "server_error0",
            CONNECTED + failing(NOW - 9 * HOUR, 1, "server_error"),
            Health("refresh_failing", NOW - 9 * HOUR, "server_error0"),
        ),
        # a success after failures ends the streak
        (
            "stored",
            NOW + HOUR,
            True,
            None,
            CONNECTED + failing(NOW - 5 * HOUR, 2) + REFRESHED,
            Health("ok"),
        ),
        # the provider refused the grant
        (
            "expired",
            NOW - HOUR,
            True,
            "invalid_grant",
            [
                *CONNECTED,
                ev(50, NOW - 2 * HOUR, T.REFRESH_FAILED, S.EXPIRED, error="invalid_grant"),
            ],
            Health("needs_reconnect", NOW - 2 * HOUR, "invalid_grant"),
        ),
        # no refresh token: fine while far, "expires soon" within a day, gone after
        ("stored", NOW + 2 * EXPIRES_SOON_S * 1000, False, None, CONNECTED, Health("ok")),
        (
            "stored",
            NOW + HOUR,
            False,
            None,
            CONNECTED,
            Health("expires_soon", NOW + HOUR, "no refresh token"),
        ),
        (
            "external",
            NOW - HOUR,
            False,
            None,
            [],
            Health("needs_reconnect", NOW - HOUR, "token expired, no refresh token"),
        ),
    ],
    ids=[
        "ok",
        "ok-unknown-expiry",
        "ok-external",
        "refresh-due",
        "refresh-due-external",
        "refresh-failing",
        "refresh-failing-long-expired",
        "recovered",
        "needs-reconnect",
        "no-refresh-far",
        "expires-soon",
        "no-refresh-expired",
    ],
)
def test_health(
    state: str,
    expires: int | None,
    refresh: bool,
    error: str | None,
    events: list[FlowEvent],
    expected: Health,
) -> None:
    health = assess(
        state=state,
        expires=expires,
        has_refresh_token=refresh,
        error_code=error,
        events=events,
        now_ms=NOW,
    )
    assert health == expected


def test_last_error_is_the_newest_failure_also_after_recovery() -> None:
    events = CONNECTED + failing(NOW - 5 * HOUR, 2, "server_error") + REFRESHED
    assert last_error(events, description="HTTP 503") == LastError(
        "server_error1", NOW - 4 * HOUR, "HTTP 503"
    )
    assert last_error(CONNECTED) is None
