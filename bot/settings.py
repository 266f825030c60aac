"""BotSettings: everything the Telegram bot needs to know, as one frozen value.

The composition root (agentd) builds it from agentd.toml with :meth:`BotSettings.from_config`
(``[telegram]``, plus where the daemon is and its API token); tests build it directly.
``AGENTD_TELEGRAM_*`` environment overrides are already applied by the config loader;
:meth:`from_env` reads them for a bot started without a config file. Secrets (bot token,
api hash, API token) are hidden from ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowengine import paths
from flowengine.errors import ConfigError

__all__ = ["BotSettings", "RESUME_FILE_NAME"]

RESUME_FILE_NAME = "telegram-flows.json"


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
    #: the daemon's base URL (https://host.tailnet.ts.net:8400), for /oauth/pending
    api_base_url: str
    api_token: str = field(repr=False)
    #: the redirect URI registered at providers (the daemon's /oauth/callback)
    redirect_uri: str
    session_path: Path = field(default_factory=paths.telegram_session_path)
    resume_path: Path = field(default_factory=lambda: paths.state_dir() / RESUME_FILE_NAME)
    #: CA bundle for the daemon's certificate; None = system CAs
    ca_file: Path | None = None
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
        if not self.api_base_url.startswith(("https://", "http://")):
            out.append("client.api_base_url must be an http(s) URL of the daemon")
        if not self.api_token:
            out.append("the daemon's API token is missing")
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
        cls,
        values: Mapping[str, Mapping[str, Any]],
        *,
        api_base_url: str,
        api_token: str,
        redirect_uri: str,
        state_dir: Path | None = None,
    ) -> BotSettings:
        """From ``agentd.config.Config.values`` (a mapping: bot/ never imports agentd)."""
        tg = values.get("telegram", {})
        client = values.get("client", {})
        state = state_dir or paths.state_dir()
        ca_file = client.get("ca_file") or ""
        return cls(
            bot_token=str(tg.get("bot_token") or ""),
            api_id=int(tg.get("api_id") or 0),
            api_hash=str(tg.get("api_hash") or ""),
            owner_ids=_ids(tg.get("owner_ids") or (), source="agentd.toml"),
            api_base_url=api_base_url,
            api_token=api_token,
            redirect_uri=redirect_uri,
            session_path=state / "telegram.session",
            resume_path=state / RESUME_FILE_NAME,
            ca_file=Path(ca_file).expanduser() if ca_file else None,
            timezone=str(tg.get("timezone") or "UTC"),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotSettings:
        """From ``AGENTD_TELEGRAM_*``, ``AGENTD_CLIENT_API_BASE_URL``, ``AGENTD_SERVER_*``."""
        e = os.environ if env is None else env
        state = paths.state_dir(e)
        token_file = paths.api_token_path(e)
        api_token = e.get("AGENTD_SERVER_API_TOKEN", "")
        if not api_token and token_file.is_file():
            api_token = token_file.read_text(encoding="utf-8").strip()
        ca_file = e.get("AGENTD_CLIENT_CA_FILE", "")
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
            api_base_url=e.get("AGENTD_CLIENT_API_BASE_URL", ""),
            api_token=api_token,
            redirect_uri=e.get("AGENTD_SERVER_REDIRECT_URI", ""),
            session_path=state / "telegram.session",
            resume_path=state / RESUME_FILE_NAME,
            ca_file=Path(ca_file).expanduser() if ca_file else None,
            timezone=e.get("AGENTD_TELEGRAM_TIMEZONE", "UTC") or "UTC",
        )
