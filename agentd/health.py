"""How healthy a connection is, from what the broker and the ledger say. [pure]

``agentd status`` shows one of these per connection (its HEALTH column and ``--json``):

===================  ==============================================================
``ok``               a usable token, or one the next refresh renews; nothing failing
``refresh_due``      the access token expired but a refresh token is there: the next
                     ``agentd token`` (or the daemon's timer, if it runs) renews it
``refresh_failing``  refreshes keep failing (network, 5xx, 429) since ``since``; the
                     stored token is kept and retried; ``reason`` says why
``needs_reconnect``  the provider refused the grant (or it ended): connect again
``expires_soon``     no refresh token: the access token ends within a day (or has
                     ended) and only a new authorization replaces it
===================  ==============================================================

Worst first: a connection that needs reconnecting is reported as such even if it also
expires soon. ``last_error`` is the most recent failure the ledger recorded for the
connection (also after it recovered), with when it happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowengine.models import FlowEvent
from flowengine.states import FlowState, FlowTrigger

__all__ = ["HEALTH_KINDS", "EXPIRES_SOON_S", "Health", "LastError", "assess", "last_error"]

HEALTH_KINDS = ("ok", "refresh_due", "refresh_failing", "needs_reconnect", "expires_soon")
#: a token without a refresh token "expires soon" this long before it does
EXPIRES_SOON_S = 86_400


@dataclass(frozen=True, slots=True)
class LastError:
    code: str
    at: int  # epoch ms
    description: str | None = None

    def public(self) -> dict[str, Any]:
        return {"code": self.code, "at": self.at, "description": self.description}


@dataclass(frozen=True, slots=True)
class Health:
    kind: str  # one of HEALTH_KINDS
    since: int | None = None  # epoch ms: when it started being so, where known
    reason: str | None = None  # an error code or a short reason, never a secret

    def public(self) -> dict[str, Any]:
        return {"status": self.kind, "since": self.since, "reason": self.reason}


def _error_of(event: FlowEvent) -> str | None:
    detail = event.detail or {}
    for key in ("error", "reason"):
        value = detail.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def last_error(events: Sequence[FlowEvent], *, description: str | None = None) -> LastError | None:
    """The newest event that recorded an error (``description``: the flow's latest one)."""
    for event in reversed(events):
        if event.trigger in (
            FlowTrigger.REFRESH_FAILED,
            FlowTrigger.EXPIRE,
            FlowTrigger.EXCHANGE_FAILED,
            FlowTrigger.STORE_FAILED,
            FlowTrigger.DENY,
        ):
            code = _error_of(event)
            if code is not None:
                return LastError(code, event.at, description)
    return None


def _failing_since(events: Sequence[FlowEvent]) -> tuple[int, str] | None:
    """The first of the transient refresh failures since the last success, and the latest
    failure's code; None when the last refresh (or the authorization) succeeded."""
    first: FlowEvent | None = None
    latest_code: str | None = None
    for event in reversed(events):
        if event.trigger in (FlowTrigger.REFRESHED, FlowTrigger.STORE):
            break
        if event.trigger is FlowTrigger.REFRESH_FAILED and event.to_state is FlowState.STORED:
            first = event
            latest_code = latest_code or _error_of(event) or "unknown"
    if first is None or latest_code is None:
        return None
    return first.at, latest_code


def assess(
    *,
    state: str,
    expires: int | None,
    has_refresh_token: bool,
    error_code: str | None,
    events: Sequence[FlowEvent],
    now_ms: int,
) -> Health:
    """The connection's health; ``state`` is a FlowState value or ``"external"``."""
    if state == FlowState.EXPIRED.value:
        ended = next((e.at for e in reversed(events) if e.to_state is FlowState.EXPIRED), None)
        return Health("needs_reconnect", ended, error_code)
    if not has_refresh_token:
        if expires is not None and expires <= now_ms:
            return Health("needs_reconnect", expires, "token expired, no refresh token")
        if expires is not None and expires - now_ms <= EXPIRES_SOON_S * 1000:
            return Health("expires_soon", expires, "no refresh token")
        return Health("ok")
    failing = _failing_since(events)
    if failing is not None:
        since, code = failing
        return Health("refresh_failing", since, code)
    if expires is not None and expires <= now_ms:
        return Health("refresh_due", expires, None)
    return Health("ok")
