"""HTTP to providers' token and revocation endpoints (RFC 6749 §4.1.3, §6; RFC 7009).

The ``httpx.AsyncClient`` is injected (tests pass one on an ``httpx.MockTransport``).
Client authentication: ``client_secret_basic`` is built here, form-urlencoding the client id
and secret before Base64 as RFC 6749 §2.3.1 requires (Authlib's ``ClientAuth`` does not, so a
secret with ``:``, ``+``, ``%``, ``/`` or a space would be mangled); ``client_secret_post`` and
``none`` are Authlib's. The request itself goes through httpx so that the caller's client,
timeouts and error mapping stay ours. :func:`client_ssl_context` is the TLS trust every HTTPS
call of the product uses: the system CA store plus ``[client] ca_file``.

Scopes: a token response's ``scope`` is what the provider granted. When the exchange's
answer omits it, RFC 6749 §5.1 says the granted scope equals the requested one: the tokens
carry the requested scopes and ``scope_source = "requested"`` (else ``"granted"``) so every
place that shows scopes can say which it is. A refresh that omits ``scope`` keeps the previous
scope and its source (RFC 6749 §6).

Every answer is validated before anything is returned, so a caller never persists a bad
response: no ``access_token``, a body that is not JSON, or an error inside an envelope
(Withings ``{"status": 601, ...}`` with HTTP 200) raise instead. What a provider needs
beyond RFC 6749 is catalog data read here generically: ``token_params`` go with every
token request, ``exchange_params`` with the code exchange only, ``refresh_params`` with
refreshes only, ``resource`` (RFC 8707) with both; an envelope's statuses are sorted by
``envelope_transient`` and ``envelope_reauthorize``. Errors map onto errors.py:

* network trouble, timeouts, HTTP 5xx, HTTP 429 (``Retry-After`` parsed) ->
  :class:`ProviderTransientError` (retry later; stored tokens stay); a TLS failure ->
  :class:`ProviderTLSError`, naming the host and the reason (e.g. an unknown CA);
* ``invalid_grant``, ``invalid_client``, ``unauthorized_client`` ... ->
  :class:`ReauthorizationRequired` (the owner must connect again);
* anything else malformed -> :class:`ProviderError`.

A caller that must not lose a token answer passes ``capture`` (an :class:`AnswerSink`, the
vault's ``AnswerCapture``): the response is then streamed and every body chunk is handed to
the sink as it comes off the socket, before anything parses it; ``token_from_answer``
parses such a captured answer later exactly as a live one.

No message carries a secret or a raw response body: only the provider id, the HTTP
status and the OAuth error code. The provider's ``error_description`` is kept (cut short)
in the exception's ``description`` attribute, never in its text.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import quote_plus, urlencode, urlsplit

import httpx
from authlib.oauth2.auth import ClientAuth

from .catalog import ProviderSpec
from .credentials import ClientCredentials
from .errors import (
    ProviderError,
    ProviderTLSError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from .tokens import TokenSet
from .trust import client_ssl_context

__all__ = [
    "DEFAULT_TIMEOUT",
    "AnswerSink",
    "PERMANENT_ERRORS",
    "basic_auth_header",
    "client_ssl_context",
    "exchange_code",
    "parse_retry_after",
    "refresh_tokens",
    "resource_params",
    "revoke",
    "tls_error",
    "tls_failure",
    "token_from_answer",
]

log = logging.getLogger("flowengine.oauth_http")

DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=5.0)

#: OAuth error codes after which only a new authorization helps
PERMANENT_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "access_denied",
        "invalid_token",
        # GitHub's spellings (HTTP 200 with an "error" key)
        "bad_refresh_token",
        "bad_verification_code",
        "incorrect_client_credentials",
    }
)

_MAX_DESCRIPTION = 200
#: headers that describe the wire encoding of a streamed body, not the decoded bytes
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


class AnswerSink(Protocol):
    """Receives a token answer while it is read (see vault.AnswerCapture)."""

    def begin(self, status: int, content_type: str | None) -> None: ...

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> bool: ...


def tls_failure(err: BaseException) -> str | None:
    """Why TLS failed, when ``err`` (e.g. an httpx ConnectError) comes from TLS; else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            message = getattr(current, "verify_message", None) or getattr(current, "reason", None)
            return str(message or "certificate verification failed")
        if isinstance(current, ssl.SSLError):
            return f"TLS handshake failed ({getattr(current, 'reason', None) or current})"
        current = current.__cause__ or current.__context__
    return None


def tls_error(
    err: BaseException, url: str, *, provider: str, during: str
) -> ProviderTLSError | None:
    """A ProviderTLSError naming the host and the reason when ``err`` is a TLS failure."""
    reason = tls_failure(err)
    if reason is None:
        return None
    host = urlsplit(url).hostname or url
    return ProviderTLSError(
        f"{during}: TLS verification failed for {host}: {reason}"
        " (trust its CA with [client] ca_file; the system CAs are always trusted)",
        provider=provider,
        host=host,
        reason=reason,
    )


def basic_auth_header(client_id: str, client_secret: str) -> str:
    """``Authorization: Basic`` value per RFC 6749 §2.3.1: each part form-urlencoded first."""
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def resource_params(
    spec: ProviderSpec, form: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """``resource`` (RFC 8707 §2) for a request to a provider bound to a protected resource,
    unless ``form`` has one already (a catalog ``token_params`` entry)."""
    if spec.resource and not any(name == "resource" for name, _ in form):
        return [("resource", spec.resource)]
    return []


def _short(text: Any) -> str | None:
    if not isinstance(text, str) or not text:
        return None
    return text[:_MAX_DESCRIPTION]


def _oauth_failure(
    spec: ProviderSpec, what: str, error: str, description: Any, status: int
) -> ProviderError:
    cls = ReauthorizationRequired if error in PERMANENT_ERRORS else ProviderError
    return cls(
        f"{spec.name} refused the {what}: {error} (HTTP {status})",
        provider=spec.id,
        oauth_error=error[:64],
        description=_short(description),
        provider_status=status,
    )


def _unwrap_envelope(spec: ProviderSpec, what: str, data: Any, status: int) -> Any:
    key = spec.response_envelope
    if not key:
        return data
    if not isinstance(data, dict) or spec.envelope_status_key not in data:
        raise ProviderError(
            f"{spec.name} answered the {what} without its {spec.envelope_status_key!r} envelope",
            provider=spec.id,
            provider_status=status,
        )
    code = data.get(spec.envelope_status_key)
    if code != 0:
        error = f"status_{code}"
        description = _short(data.get("error"))
        known = isinstance(code, int) and not isinstance(code, bool)
        kind: type[ProviderError] = ProviderError
        message = f"{spec.name} refused the {what}: {error}"
        if known and code in spec.envelope_transient:
            kind = ProviderTransientError
            message = f"{spec.name} is busy or failing ({error}); try again later"
        elif known and code in spec.envelope_reauthorize:
            kind = ReauthorizationRequired
        raise kind(
            message,
            provider=spec.id,
            oauth_error=error,
            description=description,
            provider_status=status,
        )
    return data.get(key)


def _check_response(spec: ProviderSpec, what: str, response: httpx.Response) -> dict[str, Any]:
    """The token response's JSON object, or the right exception. Never echoes the body."""
    status = response.status_code
    if status == 429:
        raise ProviderTransientError(
            f"{spec.name} is rate limiting the {what} (HTTP 429)",
            provider=spec.id,
            provider_status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status >= 500:
        raise ProviderTransientError(
            f"{spec.name} failed the {what} (HTTP {status}); try again later",
            provider=spec.id,
            provider_status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    try:
        data: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"]:
        if not spec.response_envelope or spec.envelope_status_key not in data:
            raise _oauth_failure(spec, what, data["error"], data.get("error_description"), status)
    if status >= 400:
        if status == 401:
            # RFC 6749 §5.2: a client authentication failure may come without a body
            raise _oauth_failure(spec, what, "invalid_client", None, status)
        raise ProviderError(
            f"{spec.name} refused the {what} (HTTP {status})",
            provider=spec.id,
            provider_status=status,
        )
    if data is None:
        raise ProviderError(
            f"{spec.name} answered the {what} with something that is not JSON (HTTP {status})",
            provider=spec.id,
            provider_status=status,
        )
    data = _unwrap_envelope(spec, what, data, status)
    if not isinstance(data, dict):
        raise ProviderError(
            f"{spec.name} answered the {what} with no token object",
            provider=spec.id,
            provider_status=status,
        )
    return data


def _require_access_token(spec: ProviderSpec, what: str, data: Mapping[str, Any]) -> None:
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise ProviderError(
            f"{spec.name} answered the {what} without an access_token; nothing was stored",
            provider=spec.id,
        )


async def _post(
    spec: ProviderSpec,
    creds: ClientCredentials,
    url: str,
    form: list[tuple[str, str]],
    *,
    what: str,
    client: httpx.AsyncClient,
    timeout: httpx.Timeout | float | None,
    capture: AnswerSink | None = None,
) -> httpx.Response:
    if spec.needs_secret and not creds.client_secret:
        from .errors import CredentialsMissingError

        raise CredentialsMissingError(provider=spec.id, needs_secret=True)
    body = urlencode(form)
    headers = {
        "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    if spec.token_auth_method == "client_secret_basic":
        headers["Authorization"] = basic_auth_header(creds.client_id, creds.client_secret or "")
    else:
        auth = ClientAuth(creds.client_id, creds.client_secret or "", spec.token_auth_method)
        url, headers, body = auth.prepare("POST", url, headers, body)
    log.info("%s request to %s (%s)", what, spec.id, spec.token_auth_method)
    try:
        if capture is not None:
            return await _post_captured(
                client, url, body, headers, DEFAULT_TIMEOUT if timeout is None else timeout, capture
            )
        return await client.post(
            url,
            content=body.encode("utf-8"),
            headers=headers,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        )
    except httpx.TimeoutException as err:
        raise ProviderTransientError(
            f"{spec.name} did not answer the {what} in time", provider=spec.id
        ) from err
    except httpx.TransportError as err:
        tls = tls_error(err, url, provider=spec.id, during=f"cannot reach {spec.name}")
        if tls is not None:
            raise tls from err
        raise ProviderTransientError(
            f"cannot reach {spec.name} for the {what}: {type(err).__name__}", provider=spec.id
        ) from err


async def _post_captured(
    client: httpx.AsyncClient,
    url: str,
    body: str,
    headers: Mapping[str, str],
    timeout: httpx.Timeout | float,
    capture: AnswerSink,
) -> httpx.Response:
    """POST and stream the answer into ``capture`` chunk by chunk as it arrives."""
    chunks: list[bytes] = []
    async with client.stream(
        "POST", url, content=body.encode("utf-8"), headers=headers, timeout=timeout
    ) as response:
        capture.begin(response.status_code, response.headers.get("content-type"))
        async for chunk in response.aiter_bytes():
            capture.write(chunk)
            chunks.append(chunk)
        capture.finish()
    kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _WIRE_HEADERS]
    return httpx.Response(
        response.status_code, headers=kept, content=b"".join(chunks), request=response.request
    )


async def _post_token_request(
    spec: ProviderSpec,
    creds: ClientCredentials,
    form: list[tuple[str, str]],
    params: Mapping[str, str] = _NO_PARAMS,
    *,
    what: str,
    client: httpx.AsyncClient,
    timeout: httpx.Timeout | float | None,
    capture: AnswerSink | None = None,
) -> httpx.Response:
    """POST a token request: ``form``, then the catalog's ``token_params``, the grant's own
    ``params`` and the resource indicator (unless one of them named it)."""
    form = [*form, *spec.token_params.items(), *params.items()]
    form += resource_params(spec, form)
    url = spec.token_url
    return await _post(
        spec, creds, url, form, what=what, client=client, timeout=timeout, capture=capture
    )


async def _token_answer(
    spec: ProviderSpec,
    creds: ClientCredentials,
    form: list[tuple[str, str]],
    params: Mapping[str, str],
    *,
    what: str,
    client: httpx.AsyncClient,
    timeout: httpx.Timeout | float | None,
    capture: AnswerSink | None,
) -> dict[str, Any]:
    """A token request whose answer must carry an access token; the answer's JSON."""
    response = await _post_token_request(
        spec, creds, form, params, what=what, client=client, timeout=timeout, capture=capture
    )
    data = _check_response(spec, what, response)
    _require_access_token(spec, what, data)
    return data


def token_from_answer(
    spec: ProviderSpec,
    *,
    status: int,
    content_type: str | None,
    body: bytes,
    now_ms: int,
    previous: TokenSet | None = None,
    requested_scopes: Sequence[str] = (),
    what: str = "refresh",
) -> TokenSet:
    """Parse a token answer captured earlier, with the checks a live answer gets.

    ``what`` is "refresh" (``previous`` is the pair refreshed) or "code exchange"
    (``requested_scopes`` as asked for in the authorization).
    """
    headers = {"content-type": content_type} if content_type else {}
    data = _check_response(spec, what, httpx.Response(status, headers=headers, content=body))
    _require_access_token(spec, what, data)
    if what == "refresh" and previous is not None and previous.refresh:
        return _refreshed(data, now_ms=now_ms, refresh_token=previous.refresh, previous=previous)
    return _exchanged(data, now_ms=now_ms, requested_scopes=requested_scopes)


async def exchange_code(
    spec: ProviderSpec,
    creds: ClientCredentials,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str | None,
    client: httpx.AsyncClient,
    now_ms: int,
    timeout: httpx.Timeout | float | None = None,
    requested_scopes: Sequence[str] = (),
    capture: AnswerSink | None = None,
) -> TokenSet:
    """Trade an authorization code for tokens (RFC 6749 §4.1.3, RFC 7636 §4.5).

    The tokens' ``scope`` is the granted one; the requested ones when the answer omits it.
    """
    form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
    ]
    if code_verifier is not None:
        form.append(("code_verifier", code_verifier))
    if spec.token_auth_method == "client_secret_basic":
        # RFC 6749 allows it; some providers (Fitbit) want it even with Basic auth
        form.append(("client_id", creds.client_id))
    data = await _token_answer(
        spec,
        creds,
        form,
        spec.exchange_params,
        what="code exchange",
        client=client,
        timeout=timeout,
        capture=capture,
    )
    return _exchanged(data, now_ms=now_ms, requested_scopes=requested_scopes)


def _exchanged(
    data: Mapping[str, Any], *, now_ms: int, requested_scopes: Sequence[str]
) -> TokenSet:
    tokens = TokenSet.from_response(data, now_ms=now_ms)
    if "scope" in data and data["scope"] is not None:
        return _with_scope(tokens, tokens.scope, "granted")
    return _with_scope(tokens, " ".join(requested_scopes) or None, "requested")


def _refreshed(
    data: Mapping[str, Any], *, now_ms: int, refresh_token: str, previous: TokenSet | None
) -> TokenSet:
    tokens = TokenSet.from_response(data, now_ms=now_ms, previous_refresh=refresh_token)
    if "scope" in data and data["scope"] is not None:
        return _with_scope(tokens, tokens.scope, "granted")
    if previous is not None and previous.scope is not None:
        source = previous.extra.get("scope_source")
        known = source if source in ("granted", "requested") else "granted"
        return _with_scope(tokens, previous.scope, known)
    return tokens


def _with_scope(tokens: TokenSet, scope: str | None, source: str) -> TokenSet:
    return replace(tokens, scope=scope, extra={**tokens.extra, "scope_source": source})


async def refresh_tokens(
    spec: ProviderSpec,
    creds: ClientCredentials,
    *,
    refresh_token: str,
    client: httpx.AsyncClient,
    now_ms: int,
    timeout: httpx.Timeout | float | None = None,
    previous: TokenSet | None = None,
    capture: AnswerSink | None = None,
) -> TokenSet:
    """Use a refresh token (RFC 6749 §6). No refresh_token in the answer keeps the old one;
    no ``scope`` keeps ``previous``'s scope and its source."""
    data = await _token_answer(
        spec,
        creds,
        [("grant_type", "refresh_token"), ("refresh_token", refresh_token)],
        spec.refresh_params,
        what="refresh",
        client=client,
        timeout=timeout,
        capture=capture,
    )
    return _refreshed(data, now_ms=now_ms, refresh_token=refresh_token, previous=previous)


async def revoke(
    spec: ProviderSpec,
    creds: ClientCredentials,
    *,
    token: str,
    token_type_hint: str | None = "refresh_token",
    client: httpx.AsyncClient,
    timeout: httpx.Timeout | float | None = None,
) -> bool:
    """Revoke a token at the provider (RFC 7009). False when it has no revocation endpoint.

    Raises ProviderTransientError (network, 5xx, 429) or ProviderError (refused).
    """
    if not spec.revocation_url:
        return False
    form = [("token", token)]
    if token_type_hint:
        form.append(("token_type_hint", token_type_hint))
    what = "revocation"
    response = await _post(
        spec, creds, spec.revocation_url, form, what=what, client=client, timeout=timeout
    )
    if response.is_success:
        return True
    _check_response(spec, what, response)  # raises for every error status
    return False  # pragma: no cover - _check_response raised
