"""agentd.toml: one configuration file, environment overrides, and ``agentd config check``.

File: ``$AGENTD_CONFIG`` or ``$XDG_CONFIG_HOME/agent/agentd.toml`` (optional: every key has
a default). Any key can be overridden from the environment as ``AGENTD_<SECTION>_<KEY>``
(e.g. ``AGENTD_SERVER_PORT=8443``, ``AGENTD_TELEGRAM_BOT_TOKEN=...``). Lists are
comma-separated in the environment.

Loading never stops at the first problem: :func:`load_config` collects every problem
with file, key and a hint; ``agentd config check`` prints them all. The result is read by
attribute, one typed frozen section each (agentd/sections.py): ``config.timer.awaiting_ttl``.
Keys that are no longer used (:data:`DEPRECATED`) are accepted with a warning.

``[[access]]`` tables (who may fetch which provider's tokens from another machine, see
flowengine/access.py) are read into :attr:`Config.access`; they have no environment
override. Their provider ids are checked against the catalog by :func:`check_access`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

from flowengine import paths

if TYPE_CHECKING:  # pragma: no cover
    from flowengine.access import AccessPolicy
if TYPE_CHECKING:  # pragma: no cover
    from agentd.sections import (
        ClientSection,
        PathsSection,
        RemoteSection,
        ServerSection,
        TelegramSection,
        TimerSection,
    )

__all__ = [
    "DEPRECATED",
    "SCHEMA",
    "SECRET_KEYS",
    "Config",
    "ConfigProblem",
    "check_access",
    "check_files",
    "load_config",
]

# section -> key -> (type, default, hint)
SCHEMA: dict[str, dict[str, tuple[type, Any, str]]] = {
    "server": {
        "mode": (
            str,
            "tls",
            "tls (own certificate from tailscaled) or serve (behind tailscale serve)",
        ),
        "host": (str, "", "bind address; empty = the Tailscale IP (tls) or 127.0.0.1 (serve)"),
        "port": (int, 8400, "TCP port the daemon listens on, 1-65535"),
        "public_port": (int, 0, "port in the redirect URI; 0 = same as port (serve mode: 8400)"),
        "public_name": (str, "", "MagicDNS name, e.g. host.tailnet.ts.net; empty = ask tailscaled"),
        "redirect_uri": (str, "", "empty = https://<public_name>:<port>/oauth/callback"),
        "cert_file": (str, "", "PEM certificate chain from `tailscale cert`; empty = fetch"),
        "key_file": (str, "", "PEM private key from `tailscale cert`; empty = fetch"),
        "allow_public_bind": (bool, False, "true only if you really mean a non-tailnet address"),
        "allowed_logins": (list, [], "tailnet logins allowed to reach the daemon; empty = any"),
        "api_token": (str, "", "bearer token for the API; empty = generated in the state dir"),
        "localapi_socket": (str, "/var/run/tailscale/tailscaled.sock", "tailscaled's socket"),
    },
    "timer": {
        "interval": (float, 30.0, "seconds between sweeps, > 0"),
        "awaiting_ttl": (float, 600.0, "seconds a link stays valid, > 0"),
        "code_ttl": (float, 300.0, "seconds a received code waits for its exchange, > 0"),
        "refresh_fraction": (float, 0.25, "refresh when this fraction of the lifetime is left"),
        "refresh_floor": (float, 300.0, "always refresh this many seconds before expiry"),
        "unknown_expiry_check": (float, 3600.0, "check tokens of unknown lifetime this often"),
    },
    "telegram": {
        "bot_token": (str, "", "from @BotFather; empty = no bot"),
        "api_id": (int, 0, "from my.telegram.org"),
        "api_hash": (str, "", "from my.telegram.org"),
        "owner_ids": (list, [], "Telegram user ids allowed to talk to the bot"),
        "timezone": (str, "UTC", "the owner's time zone for charts, e.g. Europe/Berlin"),
    },
    "client": {
        "ca_file": (str, "", "CA bundle to trust for the daemon; empty = system CAs"),
    },
    "remote": {
        "rate": (float, 1.0, "token requests a second one identity may make, sustained (> 0)"),
        "burst": (int, 30, "token requests one identity may make at once, 1-100000"),
        "audit_days": (float, 90.0, "days a token hand-out stays in the audit, > 0"),
        "audit_max_rows": (int, 100_000, "hand-outs the audit keeps at most, 1-100000000"),
    },
    "paths": {
        "state_dir": (str, "", "empty = $XDG_STATE_HOME/agentd"),
        "auth_file": (str, "", "empty = $AGENT_AUTH_FILE or $XDG_DATA_HOME/agent/auth.json"),
    },
}

#: keys whose values are never shown
SECRET_KEYS = frozenset({"telegram.bot_token", "telegram.api_hash", "server.api_token"})
#: keys agentd no longer reads -> why; accepted (an old file keeps working) with a warning
DEPRECATED: dict[str, str] = {
    "client.api_base_url": "no longer used: the CLI reaches the daemon on its unix socket and"
    " the bot runs inside it; remove the key",
}
#: the hint of every ``[[access]]`` problem
ACCESS_HINT = (
    '[[access]] who = ["tag:<name>", "user@example.com"] providers = ["<provider id>"]'
    " (see `agentd providers`)"
)


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    file: str
    key: str
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message} (hint: {self.hint})"


_S = TypeVar("_S")


class _Section(Generic[_S]):
    """``config.<name>``: section ``<name>`` as its typed value (:meth:`Config.section`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, config: None, owner: type | None = None) -> _Section[_S]: ...
    @overload
    def __get__(self, config: Config, owner: type | None = None) -> _S: ...
    def __get__(self, config: Config | None, owner: type | None = None) -> _S | _Section[_S]:
        if config is None:
            return self
        section: _S = config.section(self.name)
        return section


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated; read it by section: ``config.server.port``."""

    file: Path
    #: the validated values as loaded (section -> key -> value), what the typed sections
    #: are built from on first use; read the sections instead
    _raw: dict[str, dict[str, Any]] = field(repr=False)
    problems: tuple[ConfigProblem, ...] = ()
    #: what works but should change (keys no longer used); never stops a command
    warnings: tuple[ConfigProblem, ...] = ()
    file_exists: bool = False
    #: ``"section.key"`` -> (where it was set: "file" or "$AGENTD_...", the value as written
    #: there), for the keys the file or the environment set; ``config show`` prints these
    #: when they are wrong, not the defaults used in their place
    origins: dict[str, tuple[str, Any]] = field(default_factory=dict, repr=False)
    #: what the file holds that is not a key of SCHEMA (unknown sections and keys, as written)
    unknown: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the ``[[access]]`` rules as parsed (None: the file has none); see :attr:`access`
    access_rules: AccessPolicy | None = field(default=None, repr=False)

    def section(self, name: str) -> Any:
        """Section ``name`` (a key of SCHEMA) as its typed value, built once."""
        cache = self.__dict__.setdefault("_sections", {})
        if name not in cache:
            from agentd.sections import build

            cache[name] = build(name, self._raw[name])
        return cache[name]

    def items(self) -> Iterator[tuple[str, Any]]:
        """``("section.key", value)`` for every key, in SCHEMA's order (lists as tuples)."""
        for name, keys in SCHEMA.items():
            section = self.section(name)
            for key in keys:
                yield f"{name}.{key}", getattr(section, key)

    server: ClassVar[_Section[ServerSection]] = _Section()
    timer: ClassVar[_Section[TimerSection]] = _Section()
    telegram: ClassVar[_Section[TelegramSection]] = _Section()
    client: ClassVar[_Section[ClientSection]] = _Section()
    remote: ClassVar[_Section[RemoteSection]] = _Section()
    paths: ClassVar[_Section[PathsSection]] = _Section()

    @property
    def access(self) -> AccessPolicy:
        """Who may fetch which provider's tokens from another machine (default: nobody).
        flowengine.access is imported only for a file with ``[[access]]`` tables, so that
        ``agentd token``'s fast path does not pay for it otherwise."""
        if self.access_rules is not None:
            return self.access_rules
        from flowengine.access import AccessPolicy

        return AccessPolicy()

    # the paths are read from the values as loaded, not from the typed section: ``agentd
    # token``'s fast path needs them and nothing else (see agentd/sections.py)

    @property
    def state_dir(self) -> Path:
        explicit = self._raw["paths"]["state_dir"]
        return Path(explicit).expanduser() if explicit else paths.state_dir()

    @property
    def auth_file(self) -> Path:
        explicit = self._raw["paths"]["auth_file"]
        return Path(explicit).expanduser() if explicit else paths.auth_file()

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def credentials_path(self) -> Path:
        return self.state_dir / "credentials.json"

    @property
    def api_token_path(self) -> Path:
        return self.state_dir / "api-token"

    @property
    def discovered_path(self) -> Path:
        """Providers found by discovery (``agentd connect <url>``), a catalog layer."""
        return self.state_dir / "discovered.json"

    @property
    def telegram_enabled(self) -> bool:
        return bool(self.telegram.bot_token)


def _key_hint(section: str, key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(SCHEMA[section]), n=1)
    listing = f"one of {', '.join(SCHEMA[section])}"
    return f"did you mean {close[0]!r}? ({listing})" if close else listing


def _coerce(value: Any, kind: type, *, from_env: bool) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and str(value).lower() in {"1", "true", "yes", "on"}:
            return True
        if from_env and str(value).lower() in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError("must be true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, int):
            return value
        if from_env:
            return int(str(value).strip())
        raise ValueError("must be a whole number")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            if isinstance(value, (int, float)):
                return float(value)
            if from_env:
                return float(str(value).strip())
        except OverflowError:
            raise ValueError("is far too large") from None
        raise ValueError("must be a number")
    if kind is list:
        if isinstance(value, list):
            return list(value)
        if from_env:
            return [part.strip() for part in str(value).split(",") if part.strip()]
        raise ValueError("must be a list")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError("must be a string")
    raise TypeError(kind)  # pragma: no cover


#: seconds: (smallest allowed, largest allowed) of each [timer] key; NaN and inf never pass
_TIMER_RANGES: dict[str, tuple[float, float]] = {
    "interval": (0.0, 86_400.0),
    "awaiting_ttl": (0.0, 7 * 86_400.0),
    "code_ttl": (0.0, 86_400.0),
    "refresh_floor": (0.0, 30 * 86_400.0),
    "unknown_expiry_check": (0.0, 30 * 86_400.0),
}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_TELEGRAM_ID_MAX = 2**63 - 1


def _printable(text: str) -> bool:
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _url_problem(url: str, *, schemes: tuple[str, ...]) -> str | None:
    """Why ``url`` is not an absolute URL with one of ``schemes`` and a host, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number 0-65535
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in schemes or not parts.hostname:
        return f"must look like {schemes[0]}://<host>[:port]"
    if port == 0:
        return "has port 0"
    return None


def _validate(values: dict[str, dict[str, Any]], where: str) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []

    def bad(section: str, key: str, message: str) -> None:
        problems.append(ConfigProblem(where, f"{section}.{key}", message, SCHEMA[section][key][2]))

    # text: no control characters anywhere (a NUL in a path or a newline in a name)
    for section, keys in SCHEMA.items():
        for key, (kind, default, _) in keys.items():
            value = values[section][key]
            if kind is str and not _printable(value):
                bad(section, key, "contains control characters")
                values[section][key] = default
    server = values["server"]
    if server["mode"] not in ("tls", "serve"):
        bad("server", "mode", f"unknown mode {server['mode']!r}")
    if not 1 <= server["port"] <= 65535:
        bad("server", "port", f"{server['port']} is not a TCP port")
    if not 0 <= server["public_port"] <= 65535:
        bad("server", "public_port", f"{server['public_port']} is not a TCP port")
    if bool(server["cert_file"]) != bool(server["key_file"]):
        key = "key_file" if server["cert_file"] else "cert_file"
        bad("server", key, "cert_file and key_file go together")
    for key in ("cert_file", "key_file"):
        if server[key] and not Path(server[key]).expanduser().is_file():
            bad("server", key, f"no such file: {server[key]}")
    ca_file = values["client"]["ca_file"]
    if ca_file and not Path(ca_file).expanduser().is_file():
        bad("client", "ca_file", f"no such file: {ca_file}")
    uri = server["redirect_uri"]
    if uri and (
        not (uri.startswith("https://") and uri.endswith("/oauth/callback"))
        or _url_problem(uri, schemes=("https",))
    ):
        bad("server", "redirect_uri", "must be https://<name>:<port>/oauth/callback")
    if server["public_name"] and not _HOSTNAME.match(server["public_name"]):
        bad("server", "public_name", f"{server['public_name']!r} is not a host name")
    logins = server["allowed_logins"]
    if not all(isinstance(login, str) and login and _printable(login) for login in logins):
        bad("server", "allowed_logins", "must be a list of login names (strings)")
        server["allowed_logins"] = []
    for key, (low, high) in _TIMER_RANGES.items():
        value = values["timer"][key]
        if not (math.isfinite(value) and low < value <= high):
            bad("timer", key, f"must be greater than {low:g} and at most {high:g} seconds")
    if not 0 < values["timer"]["refresh_fraction"] < 1:  # NaN fails too
        bad("timer", "refresh_fraction", "must be between 0 and 1")
    remote = values["remote"]
    if not (math.isfinite(remote["rate"]) and 0 < remote["rate"] <= 1_000_000):
        bad("remote", "rate", "must be greater than 0 and at most 1000000 a second")
    if not 1 <= remote["burst"] <= 100_000:
        bad("remote", "burst", f"{remote['burst']} is not between 1 and 100000")
    if not (math.isfinite(remote["audit_days"]) and 0 < remote["audit_days"] <= 36_500):
        bad("remote", "audit_days", "must be greater than 0 and at most 36500 days")
    if not 1 <= remote["audit_max_rows"] <= 100_000_000:
        bad("remote", "audit_max_rows", f"{remote['audit_max_rows']} is not between 1 and 1e8")
    tg = values["telegram"]
    if not 0 <= tg["api_id"] <= 2**31 - 1:
        bad("telegram", "api_id", f"{tg['api_id']} is not an api_id")
    if tg["bot_token"]:
        if tg["api_id"] <= 0:
            bad("telegram", "api_id", "a bot token needs api_id too")
        if not tg["api_hash"]:
            bad("telegram", "api_hash", "a bot token needs api_hash too")
        if not tg["owner_ids"]:
            bad("telegram", "owner_ids", "nobody could talk to the bot")
    ids: list[int] = []
    for raw in tg["owner_ids"]:
        user_id = _telegram_id(raw)
        if user_id is None:
            shown = raw if isinstance(raw, str | int) and not isinstance(raw, bool) else "value"
            bad("telegram", "owner_ids", f"{shown!r} is not a Telegram user id")
        else:
            ids.append(user_id)
    tg["owner_ids"] = ids
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tg["timezone"])
    except Exception:  # noqa: BLE001 - any lookup failure is a config problem
        bad("telegram", "timezone", f"unknown time zone {tg['timezone']!r}")
    return problems


def check_files(config: Config) -> list[ConfigProblem]:
    """Problems with the contents of configured TLS files (a CA bundle that is no PEM, a
    certificate that does not match its key); slower than :func:`load_config` (imports ssl)."""
    import ssl

    problems: list[ConfigProblem] = []
    where = str(config.file)
    ca_file, server = config.client.ca_file, config.server
    if ca_file and Path(ca_file).expanduser().is_file():
        try:
            ssl.create_default_context(cafile=str(Path(ca_file).expanduser()))
        except (ssl.SSLError, OSError, ValueError) as err:
            problems.append(
                ConfigProblem(
                    where,
                    "client.ca_file",
                    f"cannot be loaded as a PEM CA bundle ({type(err).__name__})",
                    SCHEMA["client"]["ca_file"][2],
                )
            )
    cert, key = server.cert_file, server.key_file
    if cert and key and Path(cert).expanduser().is_file() and Path(key).expanduser().is_file():
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                str(Path(cert).expanduser()), str(Path(key).expanduser())
            )
        except (ssl.SSLError, OSError, ValueError) as err:
            problems.append(
                ConfigProblem(
                    where,
                    "server.cert_file",
                    f"cert_file and key_file do not load as a PEM pair ({type(err).__name__})",
                    SCHEMA["server"]["cert_file"][2],
                )
            )
    return problems


def check_access(config: Config) -> list[ConfigProblem]:
    """``[[access]]`` providers the catalog does not know (loads the catalog; a catalog
    that does not load is reported where it is used, not here)."""
    if not config.access.providers():
        return []
    import difflib

    from flowengine.access import unknown_providers
    from flowengine.catalog import load_catalog
    from flowengine.errors import ConfigError

    try:
        catalog = load_catalog()
    except ConfigError:
        return []
    problems = []
    for key, provider in unknown_providers(config.access, catalog.ids()):
        close = difflib.get_close_matches(provider, catalog.ids(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else ACCESS_HINT
        message = f"unknown provider {provider!r}"
        problems.append(ConfigProblem(str(config.file), key, message, hint))
    return problems


def _telegram_id(raw: Any) -> int | None:
    """A positive 64-bit Telegram user id from an int or a string of digits, else None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str) and raw.strip().isdigit() and len(raw.strip()) <= 19:
        raw = int(raw.strip())
    if isinstance(raw, int) and 0 < raw <= _TELEGRAM_ID_MAX:
        return raw
    return None


def _deprecated(where: str, dotted: str) -> ConfigProblem:
    return ConfigProblem(where, dotted, "is deprecated and ignored", DEPRECATED[dotted])


def load_config(
    file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read defaults, then the file, then ``AGENTD_*`` environment overrides."""
    environ = os.environ if env is None else env
    path = Path(file) if file else paths.config_file(environ)
    values: dict[str, dict[str, Any]] = {
        section: {
            key: (list(spec[1]) if spec[0] is list else spec[1]) for key, spec in keys.items()
        }
        for section, keys in SCHEMA.items()
    }
    problems: list[ConfigProblem] = []
    warnings: list[ConfigProblem] = []
    origins: dict[str, tuple[str, Any]] = {}
    unknown: dict[str, Any] = {}
    where = str(path)
    exists = path.is_file()
    policy: AccessPolicy | None = None
    if not exists and (file or environ.get("AGENTD_CONFIG")):
        # the default file is optional; one named explicitly must be there
        problems.append(
            ConfigProblem(
                where,
                "-",
                "no such file",
                "check --config / $AGENTD_CONFIG, or drop it to use the default location",
            )
        )
    if exists:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            problems.append(ConfigProblem(where, "-", f"cannot read: {err}", "check permissions"))
            data = {}
        except tomllib.TOMLDecodeError as err:
            problems.append(ConfigProblem(where, "-", f"not valid TOML: {err}", "fix the syntax"))
            data = {}
        except RecursionError:
            problems.append(ConfigProblem(where, "-", "nested too deeply", "fix the syntax"))
            data = {}
        if "access" in data:
            from flowengine.access import parse_rules

            policy, found = parse_rules(data.pop("access"))
            problems += [ConfigProblem(where, key, msg, ACCESS_HINT) for key, msg in found]
        for section, keys in data.items():
            if section not in SCHEMA:
                problems.append(
                    ConfigProblem(
                        where, section, "unknown section", f"one of {', '.join(SCHEMA)}, [[access]]"
                    )
                )
                unknown[section] = keys
                continue
            if not isinstance(keys, dict):
                problems.append(ConfigProblem(where, section, "must be a table", f"[{section}]"))
                unknown[section] = keys
                continue
            for key, value in keys.items():
                if key in SCHEMA[section]:
                    origins[f"{section}.{key}"] = ("file", value)
                elif f"{section}.{key}" in DEPRECATED:
                    unknown[f"{section}.{key}"] = value
                    warnings.append(_deprecated(where, f"{section}.{key}"))
                    continue
                else:
                    unknown[f"{section}.{key}"] = value
                    problems.append(
                        ConfigProblem(
                            where, f"{section}.{key}", "unknown key", _key_hint(section, key)
                        )
                    )
                    continue
                kind, _, hint = SCHEMA[section][key]
                try:
                    values[section][key] = _coerce(value, kind, from_env=False)
                except ValueError as err:
                    problems.append(ConfigProblem(where, f"{section}.{key}", str(err), hint))
    for section, keys in SCHEMA.items():
        for key, (kind, _, hint) in keys.items():
            name = f"AGENTD_{section.upper()}_{key.upper()}"
            if name in environ:
                origins[f"{section}.{key}"] = (f"${name}", environ[name])
                try:
                    values[section][key] = _coerce(environ[name], kind, from_env=True)
                except ValueError as err:
                    problems.append(ConfigProblem(f"${name}", f"{section}.{key}", str(err), hint))
    for dotted in DEPRECATED:
        name = "AGENTD_" + dotted.upper().replace(".", "_")
        if name in environ:
            warnings.append(_deprecated(f"${name}", dotted))
    problems += _validate(values, where)
    return Config(
        file=path,
        _raw=values,
        problems=tuple(problems),
        warnings=tuple(warnings),
        file_exists=exists,
        origins=origins,
        unknown=unknown,
        access_rules=policy,
    )
