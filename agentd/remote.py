"""``agentd token <provider> --from https://<host>.<tailnet>.ts.net:8400``: a token from a
daemon on another machine of the tailnet.

The daemon names this machine with whois and its ``[[access]]`` policy decides (see
api/tokens.py); there is no secret to set up here. :class:`RemoteTokens` asks
``GET /v1/tokens/<provider>`` over HTTPS, trusting the system CAs plus ``[client]
ca_file`` (flowengine/trust.py), through ``https_proxy`` when the environment names one
(a userspace-networking tailscaled offers such a proxy; ``no_proxy`` is honoured).

Tokens are cached **in memory only**, per provider, while they have more than the on-use
margin left (min(60 s, a quarter of their lifetime), as ``agentd token`` uses locally):
nothing is written to this machine's disk, no refresh token ever arrives here. A program
that keeps one :class:`RemoteTokens` asks the daemon once per token lifetime; each
``agentd token --from`` run is its own process and asks once.

Answers map onto the errors ``agentd token`` raises locally, so the exit codes are the same
(README): 3 not connected, 4 connect again, 5 unavailable (the daemon or its provider,
network, TLS, rate limit), 2 refused by the daemon's policy or a bad ``--from``.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from flowengine.errors import (
    BrokerError,
    ConfigError,
    NotConnectedError,
    ProviderError,
    ProviderTLSError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from flowengine.schedule import TokenTimes, use_margin, valid_for

__all__ = ["RemoteToken", "RemoteTokens", "check_base_url"]

#: seconds a token of unknown lifetime is reused before asking again
UNKNOWN_LIFETIME_REUSE = 60.0
USER_AGENT = "agentd-remote-token/1"


def check_base_url(url: str) -> str:
    """``https://host[:port]`` (a trailing slash is dropped), else ConfigError (``--from``)."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - ValueError for a port that is not 0-65535
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme != "https"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ConfigError(
            f"{url!r} is not the daemon's address",
            key="--from",
            hint="https://<host>.<tailnet>.ts.net:8400 (also $AGENTD_URL)",
        )
    return f"https://{parts.netloc}"


@dataclass(frozen=True, slots=True)
class RemoteToken:
    """A token the daemon handed out. ``repr`` hides it."""

    provider: str
    access: str = field(repr=False)
    token_type: str = "Bearer"
    expires: int | None = None  # epoch ms
    scope: str | None = None
    fetched_at: float = 0.0  # epoch s

    def valid_at(self, now: float) -> bool:
        if self.expires is None:
            return now - self.fetched_at < UNKNOWN_LIFETIME_REUSE
        times = TokenTimes(self.expires, int(self.fetched_at * 1000), False)
        return valid_for(times, now, use_margin(times))


def _text(value: object, limit: int = 300) -> str | None:
    """A string the daemon sent, fit for one terminal line (control characters dropped)."""
    if not isinstance(value, str):
        return None
    clean = "".join(ch for ch in value if ch.isprintable())[:limit].strip()
    return clean or None


class RemoteTokens:
    """Access tokens from the daemon at ``base_url``, cached in memory."""

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext,
        timeout: float = 20.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.timeout = timeout
        self.clock = clock
        self._cache: dict[str, RemoteToken] = {}
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(),  # https_proxy / no_proxy from the environment
            urllib.request.HTTPSHandler(context=ssl_context),
        )
        #: requests actually sent (the cache's effect is visible in tests)
        self.requests = 0

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or self.base_url

    def get(self, provider: str) -> str:
        """A valid access token for ``provider``: cached, or fetched from the daemon."""
        return self.fetch(provider).access

    def fetch(self, provider: str) -> RemoteToken:
        cached = self._cache.get(provider)
        if cached is not None and cached.valid_at(self.clock()):
            return cached
        self._cache.pop(provider, None)
        token = self._request(provider)
        self._cache[provider] = token
        return token

    def forget(self, provider: str | None = None) -> None:
        """Drop the cached token of ``provider`` (every provider when None)."""
        if provider is None:
            self._cache.clear()
        else:
            self._cache.pop(provider, None)

    # ------------------------------------------------------------------ internals

    def _request(self, provider: str) -> RemoteToken:
        url = f"{self.base_url}/v1/tokens/{quote(provider, safe='')}"
        request = urllib.request.Request(
            url, headers={"Accept": "application/json", "User-Agent": USER_AGENT}
        )
        for attempt in (1, 2):
            self.requests += 1
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    body = response.read(1 << 20)
                    status = response.status
                break
            except urllib.error.HTTPError as err:
                with err:
                    raise self._refused(
                        provider, err.code, err.headers, err.read(1 << 16)
                    ) from None
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = err.reason if isinstance(err, urllib.error.URLError) else err
                if attempt == 1 and isinstance(reason, ConnectionResetError | BrokenPipeError):
                    # closed before it answered (the daemon sheds idle connections when
                    # crowded): a GET is safe to send once more
                    continue
                raise self._unreachable(provider, err) from None
        if status != 200:
            raise ProviderError(
                f"the daemon at {self.base_url} answered HTTP {status}",
                provider=provider,
                provider_status=status,
            )
        try:
            data = json.loads(body)
            access = data["access_token"]
            expires = data.get("expires")
            if not isinstance(access, str) or not access:
                raise ValueError
            if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            # never the body's text: it holds the token
            raise ProviderError(
                f"the daemon at {self.base_url} sent an answer that is not a token",
                provider=provider,
            ) from None
        scope = data.get("scope")
        return RemoteToken(
            provider=provider,
            access=access,
            token_type=str(data.get("token_type") or "Bearer"),
            expires=expires,
            scope=scope if isinstance(scope, str) else None,
            fetched_at=self.clock(),
        )

    def _unreachable(self, provider: str, err: BaseException) -> BrokerError:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, ssl.SSLCertVerificationError):
            why = reason.verify_message or "certificate verify failed"
            return ProviderTLSError(
                f"TLS verification failed for {self.host}: {why} (is its CA in [client] ca_file?)",
                provider="agentd",
                host=self.host,
                reason=why,
            )
        if isinstance(reason, ssl.SSLError):
            return ProviderTLSError(
                f"TLS with {self.host} failed ({type(reason).__name__})",
                provider="agentd",
                host=self.host,
                reason=type(reason).__name__,
            )
        if isinstance(reason, TimeoutError):
            detail = "it did not answer in time"
        elif isinstance(reason, OSError) and reason.strerror:
            detail = reason.strerror
        else:
            detail = type(reason).__name__
        return ProviderTransientError(
            f"the daemon at {self.base_url} could not be reached: {detail}", provider="agentd"
        )

    def _refused(self, provider: str, status: int, headers: Any, body: bytes) -> BrokerError:
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                data = {}
        except ValueError:
            data = {}
        code = data.get("error")
        message = _text(data.get("message")) or f"HTTP {status}"
        hint = _text(data.get("hint"))
        where = f"the daemon at {self.base_url}"
        if status == 404 and code == "not_connected":
            return NotConnectedError(provider=provider, daemon=where)
        if status == 409 and code == "reauthorization_required":
            return ReauthorizationRequired(
                message,
                provider=provider,
                oauth_error=_text(data.get("reason"), 64),
                provider_status=status,
                daemon=where,
            )
        if status in (429, 503):
            retry_after = _retry_after(headers)
            then = f"; retry in {retry_after:g} s" if retry_after is not None else ""
            return ProviderTransientError(
                f"{where}: {message}{then}",
                provider=provider,
                provider_status=status,
                retry_after=retry_after,
            )
        if status == 403:
            return ConfigError(
                f"{where} refused: {message}",
                key=provider,
                hint="the owner grants it in the daemon's agentd.toml: [[access]] who = [...]"
                " providers = [...]",
            )
        if status == 404 and code == "unknown_provider":
            return ConfigError(f"{where} does not know the provider {provider!r}", key=provider)
        if status == 409 and code == "credentials_missing":
            return ConfigError(f"{where}: {message}", key=provider, hint=hint)
        if status == 404:
            return ConfigError(
                f"{where} hands out no tokens (HTTP 404: is it agentd, and recent enough?)",
                key="--from",
            )
        if status >= 500:
            return ProviderTransientError(
                f"{where}: {message}", provider=provider, provider_status=status
            )
        return ProviderError(f"{where} answered HTTP {status}: {message}", provider=provider)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None
