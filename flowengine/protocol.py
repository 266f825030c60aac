"""OAuth 2.0 authorization-code pieces that need no I/O. [pure]

RFC 6749 §4.1 (authorization request and callback) and RFC 7636 (PKCE, S256 only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import CallbackParseError

__all__ = [
    "CallbackParams",
    "CallbackParseError",
    "build_authorize_url",
    "code_challenge",
    "hash_state",
    "new_code_verifier",
    "new_state",
    "parse_callback",
    "same_state",
]

# RFC 7636 §4.1: 43..128 characters of [A-Z] [a-z] [0-9] "-" "." "_" "~"
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
# what we accept as a state on the callback: our own states are 43 urlsafe characters
_STATE_RE = re.compile(r"^[A-Za-z0-9\-._~]{16,512}$")
# RFC 6749 §4.1.2.1: error codes are %x20-21 / %x23-5B / %x5D-7E
_ERROR_RE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,200}$")
_MAX_CODE = 4096
_MAX_DESCRIPTION = 1000


def new_state() -> str:
    """A fresh OAuth ``state``: 256 bits from the OS CSPRNG, URL-safe base64 (43 chars)."""
    return secrets.token_urlsafe(32)


def new_code_verifier() -> str:
    """A PKCE code verifier: 384 bits, 64 URL-safe characters (RFC 7636 §4.1)."""
    return secrets.token_urlsafe(48)


def code_challenge(verifier: str) -> str:
    """The S256 challenge for ``verifier`` (RFC 7636 §4.2)."""
    if not _VERIFIER_RE.match(verifier):
        raise ValueError("code verifier must be 43-128 unreserved characters (RFC 7636 §4.1)")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def hash_state(state: str) -> str:
    """What the ledger stores instead of the state itself: SHA-256, hex."""
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def same_state(a: str, b: str) -> bool:
    """Constant-time comparison of two state values."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def build_authorize_url(
    authorize_url: str,
    *,
    client_id: str,
    redirect_uri: str,
    state: str,
    scopes: Iterable[str] = (),
    scope_separator: str = " ",
    code_verifier: str | None = None,
    extra_params: Mapping[str, str] | None = None,
) -> str:
    """The URL the owner opens to authorize (RFC 6749 §4.1.1, RFC 7636 §4.3).

    Query parameters already on ``authorize_url`` are kept; ours come after them. The
    redirect URI is passed exactly as given: it must match the registered one byte for byte.
    """
    if not client_id:
        raise ValueError("client_id is required")
    if not redirect_uri:
        raise ValueError("redirect_uri is required")
    parts = urlsplit(authorize_url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("authorize URL must be an absolute http(s) URL")
    params: list[tuple[str, str]] = parse_qsl(parts.query, keep_blank_values=True)
    params += [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
    ]
    scope_list = [s for s in scopes if s]
    if scope_list:
        params.append(("scope", scope_separator.join(scope_list)))
    if code_verifier is not None:
        params += [
            ("code_challenge", code_challenge(code_verifier)),
            ("code_challenge_method", "S256"),
        ]
    reserved = {name for name, _ in params}
    for key, value in (extra_params or {}).items():
        if key in reserved:
            raise ValueError(f"extra parameter {key!r} would override a protocol parameter")
        params.append((key, value))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params), ""))


@dataclass(frozen=True, slots=True)
class CallbackParams:
    """A parsed redirect back from the provider: either a code or an error, and a state."""

    state: str = field(repr=False)
    code: str | None = field(default=None, repr=False)
    error: str | None = None
    error_description: str | None = None
    iss: str | None = None


def _single(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise CallbackParseError(reason=f"parameter {name!r} given more than once")
    return values[0]


def parse_callback(query: Mapping[str, list[str]] | str) -> CallbackParams:
    """Validate the callback's query (RFC 6749 §4.1.2 and §4.1.2.1).

    Accepts a raw query string or a mapping of name to list of values. Raises
    CallbackParseError with a reason that never echoes the input.
    """
    if isinstance(query, str):
        multi: dict[str, list[str]] = {}
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
        except ValueError as err:  # pragma: no cover - parse_qsl is lenient
            raise CallbackParseError(reason="query string is malformed") from err
        for name, value in pairs:
            multi.setdefault(name, []).append(value)
        query = multi
    state = _single(query, "state")
    code = _single(query, "code")
    error = _single(query, "error")
    description = _single(query, "error_description")
    iss = _single(query, "iss")
    if not state:
        raise CallbackParseError(reason="the callback has no state parameter")
    if not _STATE_RE.match(state):
        raise CallbackParseError(reason="the state parameter is not a valid state value")
    if error is not None:
        if not _ERROR_RE.match(error):
            raise CallbackParseError(reason="the error parameter is malformed")
        if description is not None:
            description = description[:_MAX_DESCRIPTION]
        return CallbackParams(state=state, error=error, error_description=description, iss=iss)
    if not code:
        raise CallbackParseError(reason="the callback has neither a code nor an error")
    if len(code) > _MAX_CODE or any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in code):
        raise CallbackParseError(reason="the code parameter is malformed")
    return CallbackParams(state=state, code=code, iss=iss)
