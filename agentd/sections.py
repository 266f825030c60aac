"""The sections of agentd.toml as typed, frozen values: ``config.timer.awaiting_ttl``.

:func:`agentd.config.load_config` reads, coerces and validates the file and the environment
once (every problem listed); :class:`agentd.config.Config` builds these from the result the
first time a section is asked for. Defaults, hints and environment names live in
:data:`agentd.config.SCHEMA`, whose keys these fields mirror one for one (a test checks it).
Lists are tuples here. This module is imported lazily: ``agentd token``'s fast path reads
its paths without paying for the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SECTIONS",
    "ClientSection",
    "PathsSection",
    "RemoteSection",
    "ServerSection",
    "TelegramSection",
    "TimerSection",
]


@dataclass(frozen=True, slots=True)
class ServerSection:
    """``[server]``: how and where the daemon listens."""

    mode: str
    host: str
    port: int
    public_port: int
    public_name: str
    redirect_uri: str
    cert_file: str
    key_file: str
    allow_public_bind: bool
    allowed_logins: tuple[str, ...]
    api_token: str = field(repr=False)
    localapi_socket: str


@dataclass(frozen=True, slots=True)
class TimerSection:
    """``[timer]``: seconds (and a fraction) the refresh timer and the flows run on."""

    interval: float
    awaiting_ttl: float
    code_ttl: float
    refresh_fraction: float
    refresh_floor: float
    unknown_expiry_check: float


@dataclass(frozen=True, slots=True)
class TelegramSection:
    """``[telegram]``: the bot's login and whom it serves (empty bot_token: no bot)."""

    bot_token: str = field(repr=False)
    api_id: int
    api_hash: str = field(repr=False)
    owner_ids: tuple[int, ...]
    timezone: str


@dataclass(frozen=True, slots=True)
class ClientSection:
    """``[client]``: the trust of every HTTPS call agentd makes."""

    ca_file: str


@dataclass(frozen=True, slots=True)
class RemoteSection:
    """``[remote]``: token hand-outs to other machines (rate limits, audit retention)."""

    rate: float
    burst: int
    audit_days: float
    audit_max_rows: int


@dataclass(frozen=True, slots=True)
class PathsSection:
    """``[paths]``: where state and auth.json live (empty: the XDG defaults)."""

    state_dir: str
    auth_file: str


#: section name -> its class, in the file's order
SECTIONS: dict[str, type[Any]] = {
    "server": ServerSection,
    "timer": TimerSection,
    "telegram": TelegramSection,
    "client": ClientSection,
    "remote": RemoteSection,
    "paths": PathsSection,
}


def build(name: str, values: dict[str, Any]) -> Any:
    """Section ``name`` from its validated values (lists become tuples)."""
    return SECTIONS[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
