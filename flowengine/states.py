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

Each row also says what the move does besides changing the state (its :class:`Effects`):
which columns of the flow row it sets or clears (the deadline of a waiting flow, when the
timer looks at a connection next, the token's expiry, the error fields), what happens to
the flow's secrets (a verifier, a device code, the callback's code) and whether tasks
waiting on the flow are woken. The engine applies them in one place (``FlowEngine.move``);
a move's effects depend on its trigger and condition alone, never on the source state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "ACTIVE_STATES",
    "PENDING_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Condition",
    "Effects",
    "ErrorEffect",
    "FlowState",
    "FlowTrigger",
    "Secrets",
    "Transition",
    "Value",
    "allowed_triggers",
    "effects_of",
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


class Value(StrEnum):
    """How a move sets one time column of the flow row."""

    KEEP = "keep"  # untouched
    CLEAR = "clear"  # NULL
    GIVEN = "given"  # the caller's value (None: NULL)
    GIVEN_OR_NOW = "given_or_now"  # the caller's value, else the move's time
    GIVEN_OR_RETRY = "given_or_retry"  # the caller's value, else a minute after the move
    VALID_FOR = "valid_for"  # the move's time + the caller's ``valid_for`` (ms)
    GIVEN_OR_LINK_TTL = "given_or_link_ttl"  # the caller's value, else the move's time + the
    #                                          engine's TTL of a sent link
    CODE_TTL = "code_ttl"  # the move's time + the engine's TTL of a received code


class ErrorEffect(StrEnum):
    """How a move sets ``error_code`` / ``error_description``."""

    KEEP = "keep"  # untouched
    CLEAR = "clear"  # both NULL (the connection is healthy again)
    SET = "set"  # both from the caller (what it leaves out is NULL)
    NOTE = "note"  # what the caller gives; the rest kept


class Secrets(StrEnum):
    """What a move does with the flow's secrets (``flow_secrets``, ``oauth_pending``)."""

    KEEP = "keep"
    DROP = "drop"  # the flow can no longer exchange: verifier, device code, unused code go
    STORE_DEVICE = "store_device"  # the device code and user code are kept while it polls
    STORE_CODE = "store_code"  # the callback's code waits in oauth_pending


@dataclass(frozen=True, slots=True)
class Effects:
    """What a move does besides changing the state; every row declares its own."""

    deadline: Value = Value.KEEP
    next_check_at: Value = Value.KEEP
    token_expires_at: Value = Value.KEEP
    error: ErrorEffect = ErrorEffect.KEEP
    #: the event detail key the error code is recorded under, if the move has one
    error_key: str | None = None
    secrets: Secrets = Secrets.KEEP
    #: tasks waiting on the flow (``FlowEngine.wait_flow``) look at it again
    wakes: bool = True

    def describe(self) -> str:
        """``deadline cleared; secrets dropped; wakes waiters``: the diagrams' table column."""
        parts = [
            f"{name} {_WORDS[value]}"
            for name, value in (
                ("deadline", self.deadline),
                ("next check", self.next_check_at),
                ("token expiry", self.token_expires_at),
                ("error", self.error),
                ("secrets", self.secrets),
            )
            if value.value != "keep"
        ]
        if self.error_key:
            parts.append(f"event notes {self.error_key}")
        parts.append("wakes waiters" if self.wakes else "wakes nobody")
        return "; ".join(parts)


_WORDS: dict[StrEnum, str] = {
    Value.CLEAR: "cleared",
    Value.GIVEN: "given",
    Value.GIVEN_OR_NOW: "given, else now",
    Value.GIVEN_OR_RETRY: "given, else now + 1 min",
    Value.VALID_FOR: "now + the code's validity",
    Value.GIVEN_OR_LINK_TTL: "given, else now + link TTL",
    Value.CODE_TTL: "now + code TTL",
    ErrorEffect.CLEAR: "cleared",
    ErrorEffect.SET: "set",
    ErrorEffect.NOTE: "noted",
    Secrets.DROP: "dropped",
    Secrets.STORE_DEVICE: "device code kept",
    Secrets.STORE_CODE: "code kept",
}


@dataclass(frozen=True, slots=True)
class Transition:
    trigger: FlowTrigger
    sources: tuple[FlowState, ...]
    dest: FlowState
    condition: Condition | None = None
    why: str = ""
    #: what the move does to the flow row, its secrets and its waiters (required)
    effects: Effects = field(kw_only=True)


S = FlowState
T = FlowTrigger
V = Value
E = ErrorEffect

#: an authorization's ending before any token: no deadline, secrets gone, error recorded
_ENDED_WITH_ERROR = Effects(deadline=V.CLEAR, error=E.SET, error_key="error", secrets=Secrets.DROP)

#: Rule 1: every allowed move, and what it does. Anything not listed is an InvalidTransition.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        T.ISSUE_URL,
        (S.INITIATED,),
        S.AWAITING_CODE,
        why="authorize link sent",
        # the TTL restarts, unless the callback came first (then the start's deadline holds)
        effects=Effects(deadline=V.GIVEN_OR_LINK_TTL),
    ),
    Transition(
        T.ISSUE_DEVICE_CODE,
        (S.INITIATED,),
        S.AWAITING_DEVICE,
        why="device endpoint gave a user code (RFC 8628)",
        effects=Effects(deadline=V.VALID_FOR, secrets=Secrets.STORE_DEVICE),
    ),
    Transition(
        T.SLOW_DOWN,
        (S.AWAITING_DEVICE,),
        S.AWAITING_DEVICE,
        why="slow_down: poll interval +5 s",
        # the poller itself asked; nobody else waits for a longer interval
        effects=Effects(wakes=False),
    ),
    Transition(
        T.RECEIVE_CODE,
        (S.AWAITING_CODE,),
        S.CODE_RECEIVED,
        why="callback with code",
        effects=Effects(deadline=V.CODE_TTL, secrets=Secrets.STORE_CODE),
    ),
    Transition(
        T.DENY,
        (S.AWAITING_CODE, S.AWAITING_DEVICE),
        S.FAILED,
        why="callback error= / access_denied",
        effects=_ENDED_WITH_ERROR,
    ),
    Transition(
        T.EXCHANGE,
        (S.CODE_RECEIVED, S.AWAITING_DEVICE),
        S.EXCHANGED,
        why="token endpoint answered",
        effects=Effects(deadline=V.CLEAR, secrets=Secrets.DROP),
    ),
    Transition(
        T.EXCHANGE_FAILED,
        (S.CODE_RECEIVED, S.AWAITING_DEVICE),
        S.FAILED,
        why="token endpoint refused",
        effects=_ENDED_WITH_ERROR,
    ),
    Transition(
        T.STORE,
        (S.EXCHANGED,),
        S.STORED,
        why="tokens written to auth.json",
        # the timer looks at the new connection on its next sweep unless told otherwise
        effects=Effects(token_expires_at=V.GIVEN, next_check_at=V.GIVEN_OR_NOW),
    ),
    Transition(
        T.STORE_FAILED,
        (S.EXCHANGED,),
        S.FAILED,
        why="tokens could not be stored",
        effects=_ENDED_WITH_ERROR,
    ),
    Transition(
        T.BEGIN_REFRESH,
        (S.STORED,),
        S.REFRESHING,
        why="write-ahead before refresh",
        effects=Effects(wakes=False),
    ),
    Transition(
        T.REFRESHED,
        (S.REFRESHING,),
        S.STORED,
        why="new tokens stored",
        effects=Effects(
            token_expires_at=V.GIVEN,
            next_check_at=V.GIVEN_OR_NOW,
            error=E.CLEAR,
            wakes=False,
        ),
    ),
    Transition(
        T.REFRESH_FAILED,
        (S.REFRESHING,),
        S.STORED,
        Condition.TRANSIENT,
        why="network/5xx/429: token kept",
        # still scheduled: a minute from now unless the timer sets its own backoff
        effects=Effects(
            next_check_at=V.GIVEN_OR_RETRY, error=E.SET, error_key="error", wakes=False
        ),
    ),
    Transition(
        T.REFRESH_FAILED,
        (S.REFRESHING,),
        S.EXPIRED,
        Condition.PERMANENT,
        why="invalid_grant: reconnect",
        effects=Effects(next_check_at=V.CLEAR, error=E.SET, error_key="error"),
    ),
    Transition(
        T.EXPIRE,
        (S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE, S.CODE_RECEIVED, S.STORED),
        S.EXPIRED,
        why="TTL passed / token dead",
        effects=Effects(
            deadline=V.CLEAR,
            next_check_at=V.CLEAR,
            error=E.NOTE,
            error_key="reason",
            secrets=Secrets.DROP,
        ),
    ),
    Transition(
        T.CANCEL,
        (S.INITIATED, S.AWAITING_CODE, S.AWAITING_DEVICE),
        S.CANCELLED,
        why="owner cancelled",
        effects=Effects(deadline=V.CLEAR, error=E.NOTE, error_key="reason", secrets=Secrets.DROP),
    ),
    Transition(
        T.REVOKE,
        (S.STORED, S.EXPIRED),
        S.REVOKED,
        why="owner disconnected",
        effects=Effects(next_check_at=V.CLEAR),
    ),
    Transition(
        T.SUPERSEDE,
        (S.STORED, S.EXPIRED),
        S.SUPERSEDED,
        why="a newer connection replaced it",
        effects=Effects(next_check_at=V.CLEAR),
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


def effects_of(trigger: FlowTrigger, condition: Condition | None = None) -> Effects:
    """What ``trigger`` (with ``condition``) does to a flow; ValueError for no such row.

    The same for every source state of the row, so the engine knows it before the move.
    """
    for row in TRANSITIONS:
        if row.trigger is trigger and (row.condition is None or row.condition is condition):
            return row.effects
    raise ValueError(f"no transition {trigger.value} with condition {condition}")
