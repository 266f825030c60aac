"""Frozen value objects shared by the engine, the API and the bot. [pure]"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, Protocol

from .states import FlowState, FlowTrigger

__all__ = [
    "Flow",
    "FlowEvent",
    "FlowRecord",
    "PendingCode",
    "PendingStatus",
    "StartedFlow",
    "plain",
    "public_fields",
]


class _Dataclass(Protocol):
    __dataclass_fields__: ClassVar[dict[str, Any]]


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: an enum by its value, a record by its ``public()``,
    a mapping as a dict, a tuple as a list, a set as a sorted list."""
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "public"):
        return value.public()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | list):
        return list(value)
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def public_fields(record: _Dataclass, *, omit: Collection[str] = ()) -> dict[str, Any]:
    """The JSON view of a record that holds no secret: its fields in declaration order
    (but ``omit``), each made :func:`plain`."""
    return {f.name: plain(getattr(record, f.name)) for f in fields(record) if f.name not in omit}


@dataclass(frozen=True, slots=True)
class Flow:
    """One authorization of one provider, as the ledger holds it. Holds no secret."""

    id: str
    provider: str
    state: FlowState
    version: int
    created_at: int  # epoch ms
    updated_at: int  # epoch ms
    redirect_uri: str
    scopes: tuple[str, ...]
    actor: str
    chat_id: int | None
    state_hash: str
    uses_pkce: bool
    deadline: int | None  # epoch ms: TTL of a pending state, None otherwise
    token_expires_at: int | None  # epoch ms of the stored access token, if known
    error_code: str | None = None
    error_description: str | None = None
    #: "code" (authorization code with a callback) or "device" (RFC 8628, polled)
    grant: str = "code"

    @property
    def is_pending(self) -> bool:
        from .states import PENDING_STATES

        return self.state in PENDING_STATES

    def public(self) -> dict[str, Any]:
        """JSON-ready view for the inspection API and the CLI (no secrets in a Flow)."""
        return public_fields(self, omit=("state_hash",))


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """One row of the append-only ledger: a transition that happened."""

    flow_id: str
    seq: int
    at: int  # epoch ms
    from_state: FlowState | None  # None for the creating event
    to_state: FlowState
    trigger: FlowTrigger | None  # None for the creating event
    actor: str
    detail: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "trigger": self.trigger.value if self.trigger else "create",
            "actor": self.actor,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """A flow with its whole history."""

    flow: Flow
    events: tuple[FlowEvent, ...]

    def public(self) -> dict[str, Any]:
        data = self.flow.public()
        data["events"] = [e.public() for e in self.events]
        return data


@dataclass(frozen=True, slots=True)
class StartedFlow:
    """What ``FlowEngine.start`` hands the caller: the flow and its two secrets.

    ``state`` goes into the authorize URL; ``code_verifier`` is needed for the exchange.
    Neither is logged; ``repr`` hides both.
    """

    flow: Flow
    state: str = field(repr=False)
    code_verifier: str | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class PendingCode:
    """A code that arrived on the callback, handed out once."""

    flow_id: str
    code: str = field(repr=False)
    received_at: int = 0  # epoch ms


@dataclass(frozen=True, slots=True)
class PendingStatus:
    """Where a flow stands from the poller's point of view.

    ``status`` is ``waiting`` (no code yet), ``ready`` (a code can be taken),
    ``consumed`` (it was taken), or ``gone`` (the flow expired, failed or was cancelled;
    ``reason`` says which).
    """

    flow_id: str
    provider: str
    status: str
    flow_state: FlowState
    received_at: int | None = None
    reason: str | None = None
    error_code: str | None = None
    error_description: str | None = None
