"""States, triggers and the transition table of an authorization flow. [pure]

The table is data: the machine (machine.py), the ledger's checks, the diagrams and the
tests all read it from here, so there is exactly one definition of what may happen.

A flow is one authorization of one provider. It starts ``initiated``, waits for the
owner in the browser (``awaiting_code``), receives the code on the callback
(``code_received``), trades it for tokens (``exchanged``), writes them to auth.json
(``stored``) and from then on lives as the provider's connection: it goes through
``refreshing`` and back, until it ``expired`` (needs a new authorization), is
``revoked`` by the owner or ``superseded`` by a newer connection of the same provider.

The device authorization grant (RFC 8628) has no callback: the provider's device endpoint
answers with a user code (``issue_device_code`` -> ``awaiting_device``), the owner enters it
on another device while we poll the token endpoint; ``slow_down`` (§3.5) stays in
``awaiting_device`` with a longer interval, the tokens move the flow to ``exchanged``, and
``access_denied`` / ``expired_token`` end it (``deny`` -> ``failed``, ``expire``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ACTIVE_STATES",
    "PENDING_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Condition",
    "FlowState",
    "FlowTrigger",
    "Transition",
    "allowed_triggers",
    "next_state",
]


class FlowState(StrEnum):
    INITIATED = "initiated"
    AWAITING_CODE = "awaiting_code"
    AWAITING_DEVICE = "awaiting_device"
    CODE_RECEIVED = "code_received"
    EXCHANGED = "exchanged"
    STORED = "stored"
    REFRESHING = "refreshing"
    EXPIRED = "expired"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REVOKED = "revoked"
    SUPERSEDED = "superseded"


class FlowTrigger(StrEnum):
    ISSUE_URL = "issue_url"
    ISSUE_DEVICE_CODE = "issue_device_code"
    SLOW_DOWN = "slow_down"
    RECEIVE_CODE = "receive_code"
    DENY = "deny"
    EXCHANGE = "exchange"
    EXCHANGE_FAILED = "exchange_failed"
    STORE = "store"
    STORE_FAILED = "store_failed"
    BEGIN_REFRESH = "begin_refresh"
    REFRESHED = "refreshed"
    REFRESH_FAILED = "refresh_failed"
    EXPIRE = "expire"
    CANCEL = "cancel"
    REVOKE = "revoke"
    SUPERSEDE = "supersede"


class Condition(StrEnum):
    """Guards that split one trigger into several destinations."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Transition:
    trigger: FlowTrigger
    sources: tuple[FlowState, ...]
    dest: FlowState
    condition: Condition | None = None
    why: str = ""


S = FlowState
T = FlowTrigger

#: Rule 1: every allowed move. Anything not listed is an InvalidTransition.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(T.ISSUE_URL, (S.INITIATED,), S.AWAITING_CODE, why="authorize link sent"),
    Transition(
        T.ISSUE_DEVICE_CODE,
        (S.INITIATED,),
        S.AWAITING_DEVICE,
        why="device endpoint gave a user code (RFC 8628)",
    ),
    Transition(
        T.SLOW_DOWN,
        (S.AWAITING_DEVICE,),
        S.AWAITING_DEVICE,
        why="slow_down: poll interval +5 s",
    ),
    Transition(T.RECEIVE_CODE, (S.AWAITING_CODE,), S.CODE_RECEIVED, why="callback with code"),
    Transition(
        T.DENY,
        (S.AWAITING_CODE, S.AWAITING_DEVICE),
        S.FAILED,
        why="callback error= / access_denied",
    ),
    Transition(
        T.EXCHANGE,
        (S.CODE_RECEIVED, S.AWAITING_DEVICE),
        S.EXCHANGED,
        why="token endpoint answered",
    ),
    Transition(
        T.EXCHANGE_FAILED,
        (S.CODE_RECEIVED, S.AWAITING_DEVICE),
        S.FAILED,
        why="token endpoint refused",
    ),
    Transition(T.STORE, (S.EXCHANGED,), S.STORED, why="tokens written to auth.json"),
    Transition(T.STORE_FAILED, (S.EXCHANGED,), S.FAILED, why="tokens could not be stored"),
    Transition(T.BEGIN_REFRESH, (S.STORED,), S.REFRESHING, why="write-ahead before refresh"),
    Transition(T.REFRESHED, (S.REFRESHING,), S.STORED, why="new tokens stored"),
    Transition(
        T.REFRESH_FAILED,
        (S.REFRESHING,),
        S.STORED,
        Condition.TRANSIENT,
        why="network/5xx/429: token kept",
    ),
    Transition(
        T.REFRESH_FAILED,
        (S.REFRESHING,),
        S.EXPIRED,
        Condition.PERMANENT,
        why="invalid_grant: reconnect",
    ),
    Transition(
        T.EXPIRE,
        (S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE, S.CODE_RECEIVED, S.STORED),
        S.EXPIRED,
        why="TTL passed / token dead",
    ),
    Transition(
        T.CANCEL,
        (S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE),
        S.CANCELLED,
        why="owner cancelled",
    ),
    Transition(T.REVOKE, (S.STORED, S.EXPIRED), S.REVOKED, why="owner disconnected"),
    Transition(
        T.SUPERSEDE,
        (S.STORED, S.EXPIRED),
        S.SUPERSEDED,
        why="a newer connection replaced it",
    ),
)

#: states in which a flow waits for the owner or the callback (they have a TTL)
PENDING_STATES: frozenset[FlowState] = frozenset(
    {S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE, S.CODE_RECEIVED, S.EXCHANGED}
)
#: states of a live connection (tokens in auth.json)
ACTIVE_STATES: frozenset[FlowState] = frozenset({S.STORED, S.REFRESHING})
#: states nothing leaves (expired may still be revoked or superseded, so it is not here)
TERMINAL_STATES: frozenset[FlowState] = frozenset({S.FAILED, S.CANCELLED, S.REVOKED, S.SUPERSEDED})


def allowed_triggers(state: FlowState) -> list[FlowTrigger]:
    """Triggers that may fire from ``state``, in table order, without duplicates."""
    seen: list[FlowTrigger] = []
    for row in TRANSITIONS:
        if state in row.sources and row.trigger not in seen:
            seen.append(row.trigger)
    return seen


def next_state(
    state: FlowState, trigger: FlowTrigger, condition: Condition | None = None
) -> FlowState | None:
    """Plain lookup in the table: the destination, or None when not allowed.

    This is the reference model the machine is tested against.
    """
    for row in TRANSITIONS:
        if row.trigger is trigger and state in row.sources:
            if row.condition is None or row.condition is condition:
                return row.dest
    return None
