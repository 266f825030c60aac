"""agentd-oauth's engine: OAuth flows as explicit state machines, persisted in a ledger.

The public surface is ``__all__``. Names load lazily (PEP 562) so that a light command
such as ``agentd token`` imports only what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ACTIVE_STATES",
    "PENDING_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "BrokerError",
    "CallbackParams",
    "Clock",
    "CodeAlreadyUsedError",
    "ConcurrentUpdateError",
    "ConfigError",
    "CredentialsMissingError",
    "Flow",
    "FlowEngine",
    "FlowError",
    "FlowEvent",
    "FlowExpiredError",
    "FlowMachine",
    "FlowNotFound",
    "FlowRecord",
    "FlowState",
    "FlowTrigger",
    "InvalidTransition",
    "Ledger",
    "ManualClock",
    "NotConnectedError",
    "PendingCode",
    "PendingStatus",
    "ProviderError",
    "ProviderTransientError",
    "ReauthorizationRequired",
    "StartedFlow",
    "StateMismatchError",
    "StorageError",
    "SystemClock",
    "TokenFileCorruptError",
    "UnknownProviderError",
]

_WHERE = {
    "ACTIVE_STATES": "states",
    "PENDING_STATES": "states",
    "TERMINAL_STATES": "states",
    "TRANSITIONS": "states",
    "FlowState": "states",
    "FlowTrigger": "states",
    "FlowMachine": "machine",
    "CallbackParams": "protocol",
    "Clock": "clock",
    "ManualClock": "clock",
    "SystemClock": "clock",
    "Flow": "models",
    "FlowEvent": "models",
    "FlowRecord": "models",
    "PendingCode": "models",
    "PendingStatus": "models",
    "StartedFlow": "models",
    "FlowEngine": "engine",
    "Ledger": "ledger",
}

if TYPE_CHECKING:  # pragma: no cover
    from .clock import Clock, ManualClock, SystemClock
    from .engine import FlowEngine
    from .errors import (
        BrokerError,
        CodeAlreadyUsedError,
        ConcurrentUpdateError,
        ConfigError,
        CredentialsMissingError,
        FlowError,
        FlowExpiredError,
        FlowNotFound,
        InvalidTransition,
        NotConnectedError,
        ProviderError,
        ProviderTransientError,
        ReauthorizationRequired,
        StateMismatchError,
        StorageError,
        TokenFileCorruptError,
        UnknownProviderError,
    )
    from .ledger import Ledger
    from .machine import FlowMachine
    from .models import Flow, FlowEvent, FlowRecord, PendingCode, PendingStatus, StartedFlow
    from .protocol import CallbackParams
    from .states import (
        ACTIVE_STATES,
        PENDING_STATES,
        TERMINAL_STATES,
        TRANSITIONS,
        FlowState,
        FlowTrigger,
    )


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'flowengine' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE.get(name, 'errors')}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
