"""Requests to a provider's data API on the owner's bearer token, shared by integrations.

:class:`BearerClient` asks the broker (a :class:`TokenSource`) for the current access token
before every request and interprets the answer with the integration's ``classify``:

* ``classify`` returns the decoded data: done;
* it raises :class:`TokenRejectedError`: the broker is asked for ONE forced refresh and the
  request is sent again; a second rejection is :class:`ReauthorizationRequired`;
* it raises :class:`ProviderTransientError` (429, 5xx, "too many requests" in an envelope),
  or the network fails: bounded exponential backoff, at least the provider's Retry-After,
  then the error; a Retry-After beyond ``max_retry_after`` is raised at once;
* any other :class:`ProviderError` goes straight to the caller.

Messages carry the provider's name and HTTP status, never a token.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio
import httpx

from flowengine import (
    Clock,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
    SystemClock,
    TokenRejectedError,
    parse_retry_after,
)

__all__ = ["BearerClient", "Sleep", "TokenSource", "json_object"]

Sleep = Callable[[float], Awaitable[None]]


class TokenSource(Protocol):
    """Where bearer tokens come from (``flowengine.Broker`` is one)."""

    async def get_token(self, provider: str, *, actor: str) -> str:
        """A currently valid access token for ``provider``."""
        ...

    async def refresh(self, provider: str, *, actor: str, force: bool = True) -> object:
        """Refresh now; raises ReauthorizationRequired when the grant is gone."""
        ...


def json_object(response: httpx.Response, *, name: str, provider: str) -> dict[str, Any]:
    """The response's JSON object, or a ProviderError that does not echo the body."""
    try:
        data = response.json()
    except ValueError as err:
        raise ProviderError(
            f"{name} answered HTTP {response.status_code} with a body that is not JSON",
            provider=provider,
            provider_status=response.status_code,
        ) from err
    if not isinstance(data, dict):
        raise ProviderError(
            f"{name} answered HTTP {response.status_code} with an unexpected body",
            provider=provider,
            provider_status=response.status_code,
        )
    return data


class BearerClient:
    """One provider connection's data API. ``name`` is for messages ("Dexcom")."""

    def __init__(
        self,
        tokens: TokenSource,
        *,
        provider_id: str,
        name: str,
        http: httpx.AsyncClient,
        clock: Clock | None = None,
        actor: str = "integration",
        sleep: Sleep | None = None,
        max_retries: int = 3,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
    ) -> None:
        self.tokens = tokens
        self.provider_id = provider_id
        self.name = name
        self.http = http
        self.clock: Clock = clock or SystemClock()
        self.actor = actor
        self._sleep: Sleep = sleep if sleep is not None else anyio.sleep
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry ``attempt`` (0-based): Retry-After if given, else 2^n."""
        if retry_after is not None:
            return retry_after
        return float(min(self.backoff_max, self.backoff_base * math.pow(2, attempt)))

    async def request(
        self,
        method: str,
        url: str,
        *,
        classify: Callable[[httpx.Response], Any],
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
    ) -> Any:
        """Send the request on a fresh token; see the module docstring for retries."""
        refreshed = False
        attempt = 0
        while True:
            token = await self.tokens.get_token(self.provider_id, actor=self.actor)
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            cause: BaseException | None = None
            try:
                response = await self.http.request(
                    method, url, params=params, data=data, headers=headers
                )
            except httpx.TransportError as err:
                failure = ProviderTransientError(
                    f"cannot reach {self.name} ({type(err).__name__})", provider=self.provider_id
                )
                cause = err
            else:
                try:
                    return classify(response)
                except TokenRejectedError as rejected:
                    if refreshed:
                        raise ReauthorizationRequired(
                            f"{self.name} rejected the access token even after a refresh;"
                            f" connect {self.provider_id} again",
                            provider=self.provider_id,
                            oauth_error=rejected.oauth_error,
                            description=rejected.description,
                            provider_status=rejected.provider_status,
                        ) from None
                    refreshed = True
                    await self.tokens.refresh(self.provider_id, actor=self.actor, force=True)
                    continue
                except ProviderTransientError as err:
                    failure = err
            retry_after = failure.retry_after
            if attempt >= self.max_retries or (
                retry_after is not None and retry_after > self.max_retry_after
            ):
                if cause is not None:
                    raise failure from cause
                raise failure
            await self._sleep(self.backoff(attempt, retry_after))
            attempt += 1

    def retry_after(self, response: httpx.Response) -> float | None:
        """The response's Retry-After in seconds (delta or HTTP-date), or None."""
        return parse_retry_after(response.headers.get("Retry-After"), now=self.clock.now())
