"""The provider catalog: provider id -> ProviderSpec. [pure]

A provider is declarative data: endpoints, scopes and the quirks real providers have
(token endpoint client auth, scope separator, extra parameters for every token request or
only for the code exchange or only for the refresh, a response envelope with its own error
statuses, revocation, whether refresh tokens rotate, how long a grant lives). Each entry
names its documentation (``docs_url``, ``sources``) and the fields checked against it
(``verified``); everything else is flagged unverified by ``agentd providers <id>``.

The built-in catalog ships in the package as ``providers.toml``; a user file
(``$XDG_CONFIG_HOME/agent/providers.toml``) adds providers or overrides fields of
built-in ones, table by table::

    [providers.dexcom]
    scopes = ["offline_access"]

    [providers.myhealth]
    name = "My Health"
    authorize_url = "https://auth.example.org/authorize"
    token_url = "https://auth.example.org/token"
    token_auth_method = "client_secret_basic"

Providers found by discovery (``agentd connect <url>``: RFC 9728 / RFC 8414, see
discovery.py) are a third layer, written by the program into the state directory
(``discovered.json``, see :func:`parse_discovered`) and merged between the two: built-ins,
then discovered entries, then the user's file (which may still override their fields).

Client credentials are not part of the catalog (see credentials.py). Every validation
error is a ConfigError naming the file, the provider and the field.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from . import paths
from .errors import ConfigError, UnknownProviderError
from .models import plain, public_fields

__all__ = [
    "BUILTIN_CATALOG",
    "LIFETIME_RULES",
    "Catalog",
    "ProviderSpec",
    "RefreshLifetime",
    "TOKEN_AUTH_METHODS",
    "check_catalog",
    "load_catalog",
    "parse_catalog",
    "parse_discovered",
    "spec_fields",
]

TokenAuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]

#: how the client authenticates at the token endpoint (RFC 6749 §2.3.1, RFC 7591 §2)
TOKEN_AUTH_METHODS: tuple[str, ...] = ("client_secret_basic", "client_secret_post", "none")

#: the catalog shipped with the package
BUILTIN_CATALOG = Path(__file__).with_name("providers.toml")

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_BAD_ID = "provider id must be lowercase letters, digits, '-' or '_'"

#: how a provider ends a grant on its own: ``absolute`` = a fixed time after the owner
#: authorized, refreshing does not extend it; ``idle`` = a fixed time after the last
#: refresh (each refresh starts it again); ``none`` = documented never to expire
LIFETIME_RULES: tuple[str, ...] = ("absolute", "idle", "none")


@dataclass(frozen=True, slots=True)
class RefreshLifetime:
    """How long a grant (its refresh token) lives. Unknown = no RefreshLifetime at all.

    ``months`` are calendar months (a grant authorized on 31 Aug with 6 months ends on
    28/29 Feb); ``days`` are 24-hour days. ``condition`` makes the rule informational:
    it holds only in some setups (Google apps in "Testing"), so no forecast uses it
    unless a user catalog restates the rule without the condition.
    """

    rule: Literal["absolute", "idle", "none"]
    months: int = 0
    days: int = 0
    condition: str | None = None

    def public(self) -> dict[str, Any]:
        return public_fields(self)


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """What the broker knows about one OAuth 2.0 provider. Holds no secret."""

    id: str
    name: str
    authorize_url: str
    token_url: str
    revocation_url: str | None = None
    api_base_url: str | None = None
    scopes: tuple[str, ...] = ()
    scope_separator: str = " "
    use_pkce: bool = True
    token_auth_method: TokenAuthMethod = "client_secret_basic"
    authorize_params: Mapping[str, str] = field(default_factory=dict)
    #: sent with every token request: code exchange and refresh (Withings: action)
    token_params: Mapping[str, str] = field(default_factory=dict)
    #: sent with the code exchange only
    exchange_params: Mapping[str, str] = field(default_factory=dict)
    #: sent with refresh requests only (WHOOP: scope=offline)
    refresh_params: Mapping[str, str] = field(default_factory=dict)
    #: key of the object holding the token response (Withings: "body"), or None
    response_envelope: str | None = None
    #: key of the envelope's status; any value but 0 is an error (Withings: "status")
    envelope_status_key: str = "status"
    #: envelope statuses that mean "try again later" (kept tokens, backoff)
    envelope_transient: frozenset[int] = frozenset()
    #: envelope statuses that mean the grant is gone (connect again)
    envelope_reauthorize: frozenset[int] = frozenset()
    #: True: every refresh returns a new refresh token and the old one dies;
    #: False: the refresh token stays; None: unknown (handled like True)
    rotates_refresh_tokens: bool | None = None
    #: documented access-token lifetime in seconds, when the response omits expires_in
    access_token_lifetime: int | None = None
    #: RFC 8707 resource indicator sent with the authorization, token, refresh and device
    #: requests (the protected resource, e.g. an MCP server, the token is for)
    resource: str | None = None
    #: RFC 8628 device authorization endpoint (``agentd connect <id> --device``)
    device_authorization_url: str | None = None
    #: RFC 8414 issuer identifier of the authorization server, when known
    issuer: str | None = None
    #: RFC 7591 dynamic client registration endpoint, when the server has one
    registration_url: str | None = None
    #: how long a grant lives; None = unknown
    refresh_lifetime: RefreshLifetime | None = None
    docs_url: str | None = None
    #: further documentation the entry was checked against
    sources: tuple[str, ...] = ()
    #: the fields checked against the documentation; every other field is unverified
    verified: frozenset[str] = frozenset()
    notes: str | None = None

    @property
    def needs_secret(self) -> bool:
        """True unless the client is public (token_auth_method = "none")."""
        return self.token_auth_method != "none"

    def public(self) -> dict[str, Any]:
        """JSON-ready view (a spec holds no secret)."""
        data = public_fields(self, omit=("notes",))
        data["unverified"] = self.unverified_fields()
        data["needs_secret"] = self.needs_secret
        return data

    def unverified_fields(self) -> list[str]:
        """Fields that carry a value the documentation was not seen to confirm.

        A field left at its default (nothing claimed) is not listed; a claim that is
        verified (present or, like ``revocation_url``, documented to be absent) is not
        listed either.
        """
        out = []
        for name in CLAIM_FIELDS:
            if name in self.verified:
                continue
            value = getattr(self, name)
            if value == _DEFAULTS[name]:
                continue
            out.append(name)
        return out


_FIELDS = {f.name for f in fields(ProviderSpec)} - {"id"}
_REQUIRED = ("authorize_url", "token_url")
#: fields that state a fact about the provider (what ``verified`` speaks about)
CLAIM_FIELDS: tuple[str, ...] = tuple(
    f.name
    for f in fields(ProviderSpec)
    if f.name not in ("id", "name", "docs_url", "sources", "verified", "notes")
)
_DEFAULTS: dict[str, Any] = {
    f.name: (f.default_factory() if callable(f.default_factory) else f.default)
    for f in fields(ProviderSpec)
    if f.name in CLAIM_FIELDS
}
_DEFAULTS["use_pkce"] = None  # PKCE on or off is always a claim
_DEFAULTS["token_auth_method"] = None  # so is the client authentication


class Catalog:
    """An immutable set of providers; ``with_override`` returns a new catalog."""

    def __init__(self, specs: Mapping[str, ProviderSpec] | None = None) -> None:
        self._specs: dict[str, ProviderSpec] = dict(sorted((specs or {}).items()))

    def get(self, provider_id: str) -> ProviderSpec:
        spec = self._specs.get(provider_id)
        if spec is None:
            close = difflib.get_close_matches(provider_id, list(self._specs), n=3, cutoff=0.6)
            raise UnknownProviderError(provider=provider_id, suggestions=tuple(close))
        return spec

    def ids(self) -> list[str]:
        return list(self._specs)

    def all(self) -> list[ProviderSpec]:
        return list(self._specs.values())

    def __contains__(self, provider_id: object) -> bool:
        return provider_id in self._specs

    def __iter__(self) -> Iterator[ProviderSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def with_override(self, spec: ProviderSpec) -> Catalog:
        """A new catalog with ``spec`` added (or replacing the provider of the same id)."""
        _validate(spec, file="<code>")
        return Catalog({**self._specs, spec.id: spec})

    def register(self, spec: ProviderSpec) -> None:
        """Add or replace a provider in place (tests, the demo's simulated provider)."""
        _validate(spec, file="<code>")
        self._specs[spec.id] = spec
        self._specs = dict(sorted(self._specs.items()))

    def __repr__(self) -> str:
        return f"Catalog({', '.join(self._specs)})"


# --------------------------------------------------------------------- parsing


def _err(file: str, provider: str, key: str | None, message: str) -> ConfigError:
    where = f"providers.{provider}" + (f".{key}" if key else "")
    return ConfigError(message, file=file, key=where)


def _url(file: str, pid: str, key: str, value: Any, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _err(file, pid, key, "must be a non-empty URL string")
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in value):
        raise _err(file, pid, key, "must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number 0-65535
    except ValueError:
        raise _err(file, pid, key, f"is not a valid URL: {value!r}") from None
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise _err(file, pid, key, f"must be an absolute http(s) URL, got {value!r}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise _err(file, pid, key, "must use https (plain http only for localhost)")
    return value


def _str_map(file: str, pid: str, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _err(file, pid, key, "must be a table of string values")
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise _err(file, pid, f"{key}.{k}", "must be a string")
        out[str(k)] = str(v)
    return out


def _coerce(file: str, pid: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check types of the fields present in ``raw`` and convert them."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, sorted(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _err(file, pid, key, f"unknown field{hint}")
        if key in ("authorize_url", "token_url"):
            out[key] = _url(file, pid, key, value, optional=False)
        elif key in (
            "revocation_url",
            "api_base_url",
            "device_authorization_url",
            "registration_url",
        ):
            out[key] = _url(file, pid, key, value or None, optional=True)
        elif key in ("resource", "issuer"):
            url = _url(file, pid, key, value or None, optional=True)
            if url is not None and "#" in url:
                raise _err(file, pid, key, "must not contain a fragment (RFC 8707 §2)")
            if url is not None and key == "issuer" and urlsplit(url).query:
                raise _err(file, pid, key, "must not contain a query (RFC 8414 §2)")
            out[key] = url
        elif key == "scopes":
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                raise _err(file, pid, key, "must be a list of non-empty strings")
            if any(" " in s for s in value):
                raise _err(file, pid, key, "a scope may not contain a space")
            out[key] = tuple(value)
        elif key == "scope_separator":
            if value not in (" ", ",", "+"):
                raise _err(file, pid, key, "must be ' ', ',' or '+'")
            out[key] = value
        elif key == "use_pkce":
            if not isinstance(value, bool):
                raise _err(file, pid, key, "must be true or false")
            out[key] = value
        elif key == "rotates_refresh_tokens":
            if value is not None and not isinstance(value, bool):
                raise _err(file, pid, key, "must be true or false")
            out[key] = value
        elif key == "token_auth_method":
            if value not in TOKEN_AUTH_METHODS:
                raise _err(file, pid, key, f"must be one of {', '.join(TOKEN_AUTH_METHODS)}")
            out[key] = value
        elif key in ("authorize_params", "token_params", "exchange_params", "refresh_params"):
            out[key] = _str_map(file, pid, key, value)
        elif key in ("envelope_transient", "envelope_reauthorize"):
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise _err(file, pid, key, "must be a list of integer statuses")
            out[key] = frozenset(value)
        elif key == "refresh_lifetime":
            out[key] = _lifetime(file, pid, value)
        elif key == "sources":
            if not isinstance(value, list):
                raise _err(file, pid, key, "must be a list of URLs")
            out[key] = tuple(
                _url(file, pid, f"{key}[{i}]", v, optional=False) or "" for i, v in enumerate(value)
            )
        elif key == "verified":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _err(file, pid, key, "must be a list of field names")
            for name in value:
                if name not in CLAIM_FIELDS:
                    close = difflib.get_close_matches(name, CLAIM_FIELDS, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise _err(file, pid, key, f"{name!r} is not a field that states a fact{hint}")
            out[key] = frozenset(value)
        elif key == "access_token_lifetime":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**9:
                raise _err(file, pid, key, "must be a positive number of seconds")
            out[key] = value
        elif key in ("name", "docs_url", "notes", "response_envelope", "envelope_status_key"):
            if value is not None and (not isinstance(value, str) or not value):
                raise _err(file, pid, key, "must be a non-empty string")
            out[key] = value
        else:  # pragma: no cover - every field is handled above
            out[key] = value
    return out


def _lifetime(file: str, pid: str, value: Any) -> RefreshLifetime:
    key = "refresh_lifetime"
    if not isinstance(value, dict):
        raise _err(file, pid, key, 'must be a table: { rule = "absolute", months = 6 }')
    unknown = set(value) - {"rule", "months", "days", "condition"}
    if unknown:
        raise _err(file, pid, f"{key}.{sorted(unknown)[0]}", "unknown field")
    rule = value.get("rule")
    if rule not in LIFETIME_RULES:
        raise _err(file, pid, f"{key}.rule", f"must be one of {', '.join(LIFETIME_RULES)}")
    spans = {}
    for unit in ("months", "days"):
        amount = value.get(unit, 0)
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise _err(file, pid, f"{key}.{unit}", "must be a whole number, 0 or more")
        spans[unit] = amount
    if rule == "none" and (spans["months"] or spans["days"]):
        raise _err(file, pid, key, "rule 'none' takes no months or days")
    if rule != "none" and not (spans["months"] or spans["days"]):
        raise _err(file, pid, key, f"rule {rule!r} needs months or days")
    condition = value.get("condition")
    if condition is not None and (not isinstance(condition, str) or not condition):
        raise _err(file, pid, f"{key}.condition", "must be a non-empty string")
    return RefreshLifetime(rule, months=spans["months"], days=spans["days"], condition=condition)


def _validate(spec: ProviderSpec, *, file: str) -> None:
    pid = spec.id
    if not _ID_RE.match(pid):
        raise _err(file, pid, None, _BAD_ID)
    raw = public_fields(spec, omit=("id",))
    if spec.refresh_lifetime is not None:
        raw["refresh_lifetime"] = {
            k: v for k, v in spec.refresh_lifetime.public().items() if v is not None
        }
    _coerce(file, pid, {k: v for k, v in raw.items() if v is not None})
    for key in _REQUIRED:
        if not getattr(spec, key):
            raise _err(file, pid, key, "is required")


def _new_spec(file: str, pid: str, values: dict[str, Any]) -> ProviderSpec:
    """A provider no earlier layer defines, from its coerced ``values``."""
    for key in _REQUIRED:
        if key not in values:
            raise _err(file, pid, key, "is required for a new provider")
    values.setdefault("name", pid)
    return ProviderSpec(id=pid, **values)


def parse_catalog(
    data: Mapping[str, Any],
    *,
    file: str,
    base: Mapping[str, ProviderSpec] | None = None,
) -> dict[str, ProviderSpec]:
    """Providers of one parsed TOML document, merged over ``base`` field by field."""
    specs = dict(base or {})
    unknown = set(data) - {"providers"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            "unknown top-level key (expected [providers.<id>] tables)", file=file, key=key
        )
    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        raise ConfigError("must be a table of [providers.<id>] tables", file=file, key="providers")
    for pid, raw in providers.items():
        if not _ID_RE.match(pid):
            raise _err(file, pid, None, _BAD_ID)
        if not isinstance(raw, dict):
            raise _err(file, pid, None, "must be a table")
        values = _coerce(file, pid, raw)
        if pid in specs:
            specs[pid] = replace(specs[pid], **values)
            continue
        specs[pid] = _new_spec(file, pid, values)
    return specs


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", file=str(path)) from err
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", file=str(path)) from err


def spec_fields(spec: ProviderSpec) -> dict[str, Any]:
    """The fields of ``spec`` that differ from their defaults, as plain data (for JSON)."""
    out: dict[str, Any] = {}
    for f in fields(ProviderSpec):
        if f.name == "id":
            continue
        value = getattr(spec, f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if value == default:
            continue
        if isinstance(value, RefreshLifetime):
            out[f.name] = {k: v for k, v in value.public().items() if v}
        else:
            out[f.name] = plain(value)
    return out


def parse_discovered(
    data: Mapping[str, Any],
    *,
    file: str,
    base: Mapping[str, ProviderSpec] | None = None,
) -> dict[str, ProviderSpec]:
    """Providers the program found by discovery (``discovered.json``) over ``base``.

    The file is ``{"version": 1, "providers": {id: {"spec": {fields}, "discovery": {...}}}}``;
    only ``spec`` describes the provider (``discovery`` says where it came from). A
    discovered provider replaces a base provider of the same id as a whole.
    """
    specs = dict(base or {})
    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        raise ConfigError("must be an object of providers", file=file, key="providers")
    for pid, entry in providers.items():
        if not isinstance(pid, str) or not _ID_RE.match(pid):
            raise _err(file, str(pid), None, _BAD_ID)
        raw = entry.get("spec") if isinstance(entry, dict) else None
        if not isinstance(raw, dict):
            raise _err(file, pid, "spec", "must be an object of provider fields")
        values = _coerce(file, pid, raw)
        specs[pid] = _new_spec(file, pid, values)
    return specs


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"cannot read: {getattr(err, 'strerror', None) or err}", file=str(path)
        ) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"not valid JSON: {err.msg} (line {err.lineno})", file=str(path)) from err
    if not isinstance(data, dict):
        raise ConfigError("must be a JSON object", file=str(path))
    return data


def load_catalog(
    user_file: Path | None = None,
    *,
    builtin: Path | None = None,
    discovered: Path | None = None,
) -> Catalog:
    """The built-in catalog, the discovered providers (``discovered``, when given) and the
    user's file on top (absent files: left out)."""
    builtin_path = builtin or BUILTIN_CATALOG
    specs = parse_catalog(_read(builtin_path), file=str(builtin_path))
    if discovered is not None:
        specs = parse_discovered(_read_json(discovered), file=str(discovered), base=specs)
    user = user_file if user_file is not None else paths.user_catalog_path()
    if user.exists():
        specs = parse_catalog(_read(user), file=str(user), base=specs)
    return Catalog(specs)


def check_catalog(
    user_file: Path | None = None, *, builtin: Path | None = None
) -> list[ConfigError]:
    """Every problem of the built-in catalog and the user's file, not only the first one
    (``agentd config check``, ``agentd providers``); empty when :func:`load_catalog` works."""
    problems: list[ConfigError] = []
    user = user_file if user_file is not None else paths.user_catalog_path()
    known: set[str] = set()
    for path in (builtin or BUILTIN_CATALOG, user):
        if path is user and not path.exists():
            continue
        file = str(path)
        try:
            data = _read(path)
        except ConfigError as err:
            problems.append(err)
            continue
        for key in sorted(set(data) - {"providers"}):
            problems.append(
                ConfigError(
                    "unknown top-level key (expected [providers.<id>] tables)", file=file, key=key
                )
            )
        providers = data.get("providers", {})
        if not isinstance(providers, dict):
            problems.append(
                ConfigError(
                    "must be a table of [providers.<id>] tables", file=file, key="providers"
                )
            )
            continue
        for pid, raw in providers.items():
            if not _ID_RE.match(pid):
                problems.append(_err(file, pid, None, _BAD_ID))
                continue
            if not isinstance(raw, dict):
                problems.append(_err(file, pid, None, "must be a table"))
                continue
            for key, value in raw.items():
                try:
                    _coerce(file, pid, {key: value})
                except ConfigError as err:
                    problems.append(err)
            if pid not in known:
                for key in _REQUIRED:
                    if key not in raw:
                        problems.append(_err(file, pid, key, "is required for a new provider"))
            known.add(pid)
    if not problems:
        try:  # whatever the field-by-field checks cannot see
            load_catalog(user_file, builtin=builtin)
        except ConfigError as err:
            problems.append(err)
    return problems
