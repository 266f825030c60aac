"""Where agentd-oauth keeps its files (XDG base directories). [pure]

Every function takes an optional environment mapping so tests never touch the real home.

==================  =========================================================
auth.json           ``$AGENT_AUTH_FILE`` > ``$XDG_DATA_HOME/agent/auth.json``
                    > ``~/.local/share/agent/auth.json`` (shared with the agent runtime)
config file         ``$AGENTD_CONFIG`` > ``$XDG_CONFIG_HOME/agent/agentd.toml``
user catalog        ``$XDG_CONFIG_HOME/agent/providers.toml``
state dir           ``$AGENTD_STATE_DIR`` > ``$STATE_DIRECTORY`` (systemd StateDirectory=)
                    > ``$XDG_STATE_HOME/agentd`` > ``~/.local/state/agentd``
  ledger            ``<state>/ledger.sqlite3``
  credentials       ``<state>/credentials.json`` (client ids and secrets, 0600)
  api token         ``<state>/api-token`` (bearer for /oauth/pending and /oauth/flows, 0600)
  tls               ``<state>/tls/`` (certificate pair fetched from tailscaled)
  telegram session  ``<state>/telegram.session``
==================  =========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "api_token_path",
    "auth_file",
    "config_dir",
    "config_file",
    "credentials_path",
    "ledger_path",
    "state_dir",
    "telegram_session_path",
    "tls_dir",
    "user_catalog_path",
]


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def _xdg(env: Mapping[str, str], name: str, default: str) -> Path:
    value = env.get(name)
    # XDG: a relative path is invalid and must be ignored
    if value and os.path.isabs(value):
        return Path(value)
    return _home(env) / default


def auth_file(env: Mapping[str, str] | None = None) -> Path:
    e = _env(env)
    explicit = e.get("AGENT_AUTH_FILE")
    if explicit:
        return Path(explicit).expanduser()
    return _xdg(e, "XDG_DATA_HOME", ".local/share") / "agent" / "auth.json"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    return _xdg(_env(env), "XDG_CONFIG_HOME", ".config") / "agent"


def config_file(env: Mapping[str, str] | None = None) -> Path:
    e = _env(env)
    explicit = e.get("AGENTD_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return config_dir(e) / "agentd.toml"


def user_catalog_path(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / "providers.toml"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    e = _env(env)
    explicit = e.get("AGENTD_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    # systemd's StateDirectory=: colon-separated absolute paths, ours is the first
    service = e.get("STATE_DIRECTORY", "").split(":")[0]
    if service.startswith("/"):
        return Path(service)
    return _xdg(e, "XDG_STATE_HOME", ".local/state") / "agentd"


def ledger_path(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "ledger.sqlite3"


def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "credentials.json"


def api_token_path(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "api-token"


def tls_dir(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "tls"


def telegram_session_path(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "telegram.session"
