"""agentd-oauth's engine: OAuth flows as explicit state machines, persisted in a ledger.

The public surface is ``__all__``. Names load lazily (PEP 562) so that a light command
such as ``agentd token`` imports only what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ACTIVE_STATES",
    "Adopted",
    "AnswerError",
    "BadRequestError",
    "Broker",
    "BrokerError",
    "CallbackParams",
    "CallbackParseError",
    "Catalog",
    "ClientCredentials",
    "Clock",
    "CodeAlreadyUsedError",
    "ConcurrentUpdateError",
    "ConfigError",
    "ConnectStart",
    "ConnectionStatus",
    "CredentialStore",
    "CredentialsMissingError",
    "DaemonRefusedError",
    "DeviceOutcome",
    "DeviceStart",
    "DisconnectResult",
    "DiscoveredStore",
    "DiscoveryError",
    "DotUnavailableError",
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
    "NoDeviceEndpointError",
    "NotConnectedError",
    "Outcome",
    "PENDING_STATES",
    "PendingCode",
    "PendingStatus",
    "ProviderError",
    "ProviderSpec",
    "ProviderTLSError",
    "ProviderTransientError",
    "ReauthorizationRequired",
    "RecoveryReport",
    "RefreshOutcome",
    "RefreshTimer",
    "RegistrationError",
    "RequestError",
    "ServiceError",
    "StartedFlow",
    "StateMismatchError",
    "StorageError",
    "SystemClock",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "TailscaleError",
    "TimerPolicy",
    "TokenFileCorruptError",
    "TokenRejectedError",
    "TokenSet",
    "TokenStore",
    "TransportError",
    "UnauthorizedError",
    "UnknownProviderError",
    "Vault",
    "load_catalog",
    "parse_retry_after",
]

_WHERE = {
    "Adopted": "broker",
    "Broker": "broker",
    "DeviceOutcome": "broker",
    "DeviceStart": "broker",
    "DiscoveredStore": "discovery",
    "ConnectStart": "broker",
    "ConnectionStatus": "broker",
    "DisconnectResult": "broker",
    "Outcome": "broker",
    "RefreshOutcome": "broker",
    "Catalog": "catalog",
    "ProviderSpec": "catalog",
    "load_catalog": "catalog",
    "parse_retry_after": "oauth_http",
    "ClientCredentials": "credentials",
    "CredentialStore": "credentials",
    "TokenSet": "tokens",
    "TokenStore": "tokens",
    "RefreshTimer": "timer",
    "TimerPolicy": "schedule",
    "Vault": "vault",
    "RecoveryReport": "engine",
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
    from .broker import (
        Adopted,
        Broker,
        ConnectionStatus,
        ConnectStart,
        DeviceOutcome,
        DeviceStart,
        DisconnectResult,
        Outcome,
        RefreshOutcome,
    )
    from .catalog import Catalog, ProviderSpec, load_catalog
    from .clock import Clock, ManualClock, SystemClock
    from .credentials import ClientCredentials, CredentialStore
    from .discovery import DiscoveredStore
    from .engine import FlowEngine, RecoveryReport
    from .errors import (
        AnswerError,
        BadRequestError,
        BrokerError,
        CallbackParseError,
        CodeAlreadyUsedError,
        ConcurrentUpdateError,
        ConfigError,
        CredentialsMissingError,
        DaemonRefusedError,
        DiscoveryError,
        DotUnavailableError,
        FlowError,
        FlowExpiredError,
        FlowNotFound,
        InvalidTransition,
        NoDeviceEndpointError,
        NotConnectedError,
        ProviderError,
        ProviderTLSError,
        ProviderTransientError,
        ReauthorizationRequired,
        RegistrationError,
        RequestError,
        ServiceError,
        StateMismatchError,
        StorageError,
        TailscaleError,
        TokenFileCorruptError,
        TokenRejectedError,
        TransportError,
        UnauthorizedError,
        UnknownProviderError,
    )
    from .ledger import Ledger
    from .machine import FlowMachine
    from .models import Flow, FlowEvent, FlowRecord, PendingCode, PendingStatus, StartedFlow
    from .oauth_http import parse_retry_after
    from .protocol import CallbackParams
    from .schedule import TimerPolicy
    from .states import (
        ACTIVE_STATES,
        PENDING_STATES,
        TERMINAL_STATES,
        TRANSITIONS,
        FlowState,
        FlowTrigger,
    )
    from .timer import RefreshTimer
    from .tokens import TokenSet, TokenStore
    from .vault import Vault


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'flowengine' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE.get(name, 'errors')}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
