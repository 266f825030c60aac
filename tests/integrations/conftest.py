"""Integration tests reuse the bot's rig (tests/bot/conftest.py): an in-memory chat, the real
API under Hypercorn, a broker, and a BotRunner handed the integrations' chat commands."""

from __future__ import annotations

from tests.bot.conftest import _catalog, _fake, _rig

__all__ = ["_catalog", "_fake", "_rig"]
