"""BotSettings: everything the Telegram bot needs to know, as one frozen value.

The composition root (agentd) builds it from agentd.toml with :meth:`BotSettings.from_config`
(the ``[telegram]`` section and the daemon's redirect URI); tests build it directly. The bot
runs inside the daemon and calls the Broker in-process: it needs no address or token of the
daemon's API. ``AGENTD_TELEGRAM_*`` environment overrides are already applied by the config
loader; :meth:`from_env` reads them for a bot started without a config file. Secrets (bot
token, api hash) are hidden from ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flowengine import paths
from flowengine.errors import ConfigError

__all__ = ["BotSettings", "RESUME_FILE_NAME", "TelegramSection"]

RESUME_FILE_NAME = "telegram-flows.json"


class TelegramSection(Protocol):
    """agentd.toml's ``[telegram]`` as the composition root reads it (bot never imports
    agentd: this names what the bot takes from it)."""

    @property
    def bot_token(self) -> str: ...
    @property
    def api_id(self) -> int: ...
    @property
    def api_hash(self) -> str: ...
    @property
    def owner_ids(self) -> Iterable[int | str]: ...
    @property
    def timezone(self) -> str: ...


def _ids(raw: Iterable[Any], *, source: str) -> frozenset[int]:
    out: set[int] = set()
    for value in raw:
        try:
            out.add(int(str(value).strip()))
        except ValueError as err:
            raise ConfigError(
                f"{value!r} is not a Telegram user id", file=source, key="telegram.owner_ids"
            ) from err
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class BotSettings:
    """How the bot logs in, whom it serves and where it reaches the daemon."""

    bot_token: str = field(repr=False)
    api_id: int
    api_hash: str = field(repr=False)
    owner_ids: frozenset[int]
    #: the redirect URI registered at providers (the daemon's /oauth/callback)
    redirect_uri: str
    session_path: Path = field(default_factory=paths.telegram_session_path)
    resume_path: Path = field(default_factory=lambda: paths.state_dir() / RESUME_FILE_NAME)
    #: IANA time zone for times shown to the owner
    timezone: str = "UTC"
    #: seconds between looks at undelivered notifications
    notify_interval: float = 5.0
    #: longest FloodWait the bot sleeps through before giving up on a message
    max_flood_wait: float = 300.0

    def problems(self) -> list[str]:
        """What makes these settings unusable (empty list: fine)."""
        out: list[str] = []
        if not self.bot_token:
            out.append("telegram.bot_token is empty")
        if self.api_id <= 0:
            out.append("telegram.api_id must be set (my.telegram.org)")
        if not self.api_hash:
            out.append("telegram.api_hash must be set (my.telegram.org)")
        if not self.owner_ids:
            out.append("telegram.owner_ids is empty: nobody could talk to the bot")
        if not self.redirect_uri.startswith(("https://", "http://")):
            out.append("server.redirect_uri must be the daemon's https callback URL")
        return out

    def check(self) -> BotSettings:
        """Raise ConfigError listing every problem; return self when there is none."""
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems), file="telegram bot settings")
        return self

    @classmethod
    def from_config(
        cls, telegram: TelegramSection, *, redirect_uri: str, state_dir: Path | None = None
    ) -> BotSettings:
        """From agentd.toml's ``[telegram]`` section (agentd.sections.TelegramSection)."""
        state = state_dir or paths.state_dir()
        return cls(
            bot_token=telegram.bot_token,
            api_id=telegram.api_id,
            api_hash=telegram.api_hash,
            owner_ids=_ids(telegram.owner_ids, source="agentd.toml"),
            redirect_uri=redirect_uri,
            session_path=state / "telegram.session",
            resume_path=state / RESUME_FILE_NAME,
            timezone=telegram.timezone or "UTC",
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotSettings:
        """From ``AGENTD_TELEGRAM_*`` and ``AGENTD_SERVER_REDIRECT_URI``."""
        e = os.environ if env is None else env
        state = paths.state_dir(e)
        try:
            api_id = int(e.get("AGENTD_TELEGRAM_API_ID", "0") or 0)
        except ValueError as err:
            raise ConfigError(
                "must be a whole number", file="$AGENTD_TELEGRAM_API_ID", key="telegram.api_id"
            ) from err
        owners = [p for p in e.get("AGENTD_TELEGRAM_OWNER_IDS", "").split(",") if p.strip()]
        return cls(
            bot_token=e.get("AGENTD_TELEGRAM_BOT_TOKEN", ""),
            api_id=api_id,
            api_hash=e.get("AGENTD_TELEGRAM_API_HASH", ""),
            owner_ids=_ids(owners, source="$AGENTD_TELEGRAM_OWNER_IDS"),
            redirect_uri=e.get("AGENTD_SERVER_REDIRECT_URI", ""),
            session_path=state / "telegram.session",
            resume_path=state / RESUME_FILE_NAME,
            timezone=e.get("AGENTD_TELEGRAM_TIMEZONE", "UTC") or "UTC",
        )
