"""agentd-oauth's Telegram bot: a pure conversation table driven by an I/O runner.

``bot.dialogue`` and ``bot.texts`` are pure; ``bot.runner`` does the I/O; ``bot.client`` is
the only module that imports Telethon. Names load lazily (PEP 562), so importing the pure
modules never pulls in Telethon or httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "BotRunner",
    "BotSettings",
    "ChatCommandHandler",
    "ChatTransport",
    "TelethonTransport",
    "TransportError",
    "run_bot",
]

_WHERE = {
    "BotRunner": "runner",
    "ChatCommandHandler": "runner",
    "BotSettings": "settings",
    "ChatTransport": "transport",
    "TransportError": "transport",
    "TelethonTransport": "client",
    "run_bot": "client",
}

if TYPE_CHECKING:  # pragma: no cover
    from .client import TelethonTransport, run_bot
    from .runner import BotRunner, ChatCommandHandler
    from .settings import BotSettings
    from .transport import ChatTransport, TransportError


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bot' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
