"""The device authorization grant (RFC 8628): the two requests, no flow logic.

Where the owner's browser cannot reach the daemon's callback (a borrowed laptop, a phone
off the tailnet, a TV), the device grant needs no redirect at all: the provider's device
endpoint hands out a *device code* (ours, secret) and a *user code* (the owner's), the
owner enters the user code at the verification URI on any device, and we poll the token
endpoint with the device code until the owner approved or refused, or the code expired.

* :func:`request_device_code` -- §3.1/§3.2: POST to ``device_authorization_url`` with the
  client's authentication (as at the token endpoint), ``scope`` and, for a provider bound
  to a protected resource, ``resource`` (RFC 8707). ``interval`` defaults to 5 s.
* :func:`poll_device_token` -- §3.4/§3.5: one token request with
  ``grant_type=urn:ietf:params:oauth:grant-type:device_code``. The four answers §3.5 defines
  are values, not errors (:class:`PollAnswer`): ``authorization_pending`` and ``slow_down``
  (poll again), ``access_denied`` and ``expired_token`` (the flow ends); tokens come back
  as a :class:`~flowengine.tokens.TokenSet` checked like any exchange; every other failure
  raises as in oauth_http (ProviderTransientError: poll again later).

The device code never reaches a log line, an exception or a ``repr``; nor does the user
code (it is for the owner's eyes: the CLI and the bot show it, nothing else).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .catalog import ProviderSpec
from .credentials import ClientCredentials
from .errors import NoDeviceEndpointError, ProviderError

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from .oauth_http import AnswerSink
    from .tokens import TokenSet

__all__ = [
    "DEFAULT_INTERVAL",
    "DEVICE_GRANT_TYPE",
    "MAX_INTERVAL",
    "SLOW_DOWN_STEP",
    "DeviceCode",
    "Poll",
    "PollAnswer",
    "next_interval",
    "poll_device_token",
    "request_device_code",
]

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
#: §3.2: "If no value is provided, clients MUST use 5 as the default."
DEFAULT_INTERVAL = 5
#: §3.5: "the interval MUST be increased by 5 seconds for this and all subsequent requests"
SLOW_DOWN_STEP = 5
#: a provider asking for more than this (or a slow_down streak) is capped: the owner waits
MAX_INTERVAL = 120
#: a device code lives at most this long here, whatever the provider says (seconds)
MAX_EXPIRES_IN = 3600
_MAX_TEXT = 512


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """The device authorization response (§3.2). ``repr`` shows no code."""

    device_code: str = field(repr=False)
    user_code: str = field(repr=False)
    verification_uri: str
    #: the verification URI with the user code in it (for a QR code), if the provider gave one
    verification_uri_complete: str | None = field(default=None, repr=False)
    expires_in: int = 600
    interval: int = DEFAULT_INTERVAL


class Poll(StrEnum):
    """The error codes of a device token request that are answers, not failures (§3.5)."""

    PENDING = "authorization_pending"  # not yet: poll again after the interval
    SLOW_DOWN = "slow_down"  # not yet, and poll 5 s less often from now on
    DENIED = "access_denied"  # the owner refused: the flow ends
    EXPIRED = "expired_token"  # the device code expired: the flow ends

    @property
    def final(self) -> bool:
        return self in (Poll.DENIED, Poll.EXPIRED)


@dataclass(frozen=True, slots=True)
class PollAnswer:
    """A "not yet" or an ending; ``interval``: the one a ``slow_down`` named (GitHub's)."""

    poll: Poll
    interval: int | None = None
    description: str | None = None


def next_interval(current: int, answer: PollAnswer | None = None) -> int:
    """The poll interval after ``slow_down``: +5 s (§3.5), or the provider's own if longer."""
    wanted = current + SLOW_DOWN_STEP
    if answer is not None and answer.interval is not None:
        wanted = max(wanted, answer.interval)
    return min(wanted, MAX_INTERVAL)


def _seconds(value: Any, default: int, *, low: int, high: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int | float) or value != value:  # NaN
        return default
    return int(min(max(value, low), high))


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if isinstance(value, str) and value and len(value) <= _MAX_TEXT and value.isprintable():
        return value
    return None


def _uri(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return None
    return value


def parse_device_code(spec: ProviderSpec, data: Any) -> DeviceCode:
    """Validate a device authorization response (§3.2); ProviderError names what is wrong."""
    if not isinstance(data, dict):
        raise ProviderError(
            f"{spec.name} answered the device authorization with no object", provider=spec.id
        )
    device_code = _text(data, "device_code")
    user_code = _text(data, "user_code")
    # "verification_url" is what Google's older device endpoint calls it
    verification = _uri(_text(data, "verification_uri") or _text(data, "verification_url"))
    missing = [
        name
        for name, value in (
            ("device_code", device_code),
            ("user_code", user_code),
            ("verification_uri", verification),
        )
        if value is None
    ]
    if missing:
        raise ProviderError(
            f"{spec.name} answered the device authorization without a valid {', '.join(missing)}",
            provider=spec.id,
        )
    assert device_code is not None
    assert user_code is not None
    assert verification is not None
    complete = _uri(_text(data, "verification_uri_complete"))
    return DeviceCode(
        device_code=device_code,
        user_code=user_code,
        verification_uri=verification,
        verification_uri_complete=complete,
        expires_in=_seconds(data.get("expires_in"), 600, low=1, high=MAX_EXPIRES_IN),
        interval=_seconds(data.get("interval"), DEFAULT_INTERVAL, low=1, high=MAX_INTERVAL),
    )


async def request_device_code(
    spec: ProviderSpec,
    creds: ClientCredentials,
    *,
    scopes: Sequence[str],
    client: httpx.AsyncClient,
    timeout: float | None = None,
) -> DeviceCode:
    """Ask the device endpoint for a device code and a user code (RFC 8628 §3.1)."""
    from .oauth_http import _check_response, _post, resource_params

    if not spec.device_authorization_url:
        raise NoDeviceEndpointError(provider=spec.id, name=spec.name)
    form: list[tuple[str, str]] = []
    wanted = [s for s in scopes if s]
    if wanted:
        form.append(("scope", spec.scope_separator.join(wanted)))
    form += resource_params(spec, form)
    what = "device authorization"
    response = await _post(
        spec, creds, spec.device_authorization_url, form, what=what, client=client, timeout=timeout
    )
    data = _check_response(spec, what, response)
    return parse_device_code(spec, data)


async def poll_device_token(
    spec: ProviderSpec,
    creds: ClientCredentials,
    *,
    device_code: str,
    client: httpx.AsyncClient,
    now_ms: int,
    requested_scopes: Sequence[str] = (),
    timeout: float | None = None,
    capture: AnswerSink | None = None,
) -> TokenSet | PollAnswer:
    """One device access token request (§3.4): tokens, or a :class:`PollAnswer`.

    Raises what oauth_http raises for anything else (ProviderTransientError: try later).
    """
    from .oauth_http import (
        _check_response,
        _exchanged,
        _post_token_request,
        _require_access_token,
    )

    form = [("grant_type", DEVICE_GRANT_TYPE), ("device_code", device_code)]
    if spec.token_auth_method == "client_secret_basic":
        form.append(("client_id", creds.client_id))
    what = "device token request"
    response = await _post_token_request(
        spec, creds, form, what=what, client=client, timeout=timeout, capture=capture
    )
    try:
        data = response.json() if response.status_code < 500 else None
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if response.status_code != 429 and isinstance(error, str):
        try:
            poll = Poll(error)
        except ValueError:
            poll = None
        if poll is not None:
            assert isinstance(data, dict)
            description = data.get("error_description")
            named = None
            if poll is Poll.SLOW_DOWN:
                named = _seconds(data.get("interval"), 0, low=0, high=MAX_INTERVAL) or None
            return PollAnswer(
                poll, named, description[:200] if isinstance(description, str) else None
            )
    data = _check_response(spec, what, response)
    _require_access_token(spec, what, data)
    return _exchanged(data, now_ms=now_ms, requested_scopes=requested_scopes)
