"""Requests to a provider's data API on the owner's bearer token, shared by integrations.

:class:`BearerClient` asks the broker (a :class:`TokenSource`) for the current access token
before every request and interprets the answer with the integration's ``classify``:

* ``classify`` returns the decoded data: done;
* it raises :class:`TokenRejectedError`: the broker is asked for ONE forced refresh and the
  request is sent again; a second rejection is :class:`ReauthorizationRequired`;
* it raises :class:`ProviderTransientError` (429, 5xx, "too many requests" in an envelope),
  or the network fails: bounded exponential backoff (:class:`RetryPolicy`), at least the
  provider's Retry-After, then the error; a Retry-After beyond ``max_retry_after`` is
  raised at once;
* any other :class:`ProviderError` goes straight to the caller.

:class:`ProviderClient` is the base of an integration's client (DexcomClient,
WithingsClient): one catalog entry's API base URL, a :class:`BearerClient`, the clock.

Messages carry the provider's name and HTTP status, never a token.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, TypeVar

import anyio
import httpx

from flowengine import (
    Clock,
    ConfigError,
    ProviderError,
    ProviderSpec,
    ProviderTransientError,
    ReauthorizationRequired,
    SystemClock,
    TokenRejectedError,
    parse_retry_after,
)

if TYPE_CHECKING:  # pragma: no cover
    from . import Services

__all__ = [
    "BearerClient",
    "ProviderClient",
    "RetryPolicy",
    "Sleep",
    "TokenSource",
    "json_object",
]

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


class TokenSource(Protocol):
    """Where bearer tokens come from (``flowengine.Broker`` is one)."""

    async def get_token(self, provider: str, *, actor: str) -> str:
        """A currently valid access token for ``provider``."""
        ...

    async def refresh(self, provider: str, *, actor: str, force: bool = True) -> object:
        """Refresh now; raises ReauthorizationRequired when the grant is gone."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried."""

    #: retries after the first attempt (0: none)
    max_retries: int = 3
    #: seconds before the first retry; doubles with every further one, up to ``backoff_max``
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    #: a provider asking to wait longer than this gets its error raised at once
    max_retry_after: float = 120.0

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry ``attempt`` (0-based): Retry-After if given, else 2^n."""
        if retry_after is not None:
            return retry_after
        return float(min(self.backoff_max, self.backoff_base * math.pow(2, attempt)))

    def gives_up(self, attempt: int, retry_after: float | None) -> bool:
        """True when retry ``attempt`` (0-based) is not to be made."""
        too_long = retry_after is not None and retry_after > self.max_retry_after
        return attempt >= self.max_retries or too_long


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
        retry: RetryPolicy | None = None,
    ) -> None:
        self.tokens = tokens
        self.provider_id = provider_id
        self.name = name
        self.http = http
        self.clock: Clock = clock or SystemClock()
        self.actor = actor
        self._sleep: Sleep = sleep if sleep is not None else anyio.sleep
        self.retry = retry or RetryPolicy()

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
            if self.retry.gives_up(attempt, failure.retry_after):
                if cause is not None:
                    raise failure from cause
                raise failure
            await self._sleep(self.retry.backoff(attempt, failure.retry_after))
            attempt += 1

    def retry_after(self, response: httpx.Response) -> float | None:
        """The response's Retry-After in seconds (delta or HTTP-date), or None."""
        return parse_retry_after(response.headers.get("Retry-After"), now=self.clock.now())

    def http_failure(
        self,
        response: httpx.Response,
        *,
        what: str,
        oauth_error: str | None = None,
        description: str | None = None,
    ) -> ProviderError:
        """The error for an HTTP answer without data: transient for 429 and 5xx (with the
        answer's Retry-After), else a plain ProviderError naming ``what`` was asked."""
        status = response.status_code
        said = {
            "provider": self.provider_id,
            "oauth_error": oauth_error,
            "description": description,
            "provider_status": status,
        }
        if status == 429 or status >= 500:
            return ProviderTransientError(
                f"{self.name} is unavailable (HTTP {status})",
                retry_after=self.retry_after(response),
                **said,
            )
        return ProviderError(f"{self.name} answered HTTP {status} to {what}", **said)


class ProviderClient:
    """Base of an integration's API client: one catalog entry's data API on the owner's
    token. Subclasses name the provider and add the API's calls."""

    #: for messages ("Dexcom")
    title: ClassVar[str]
    #: the catalog id used when none is given
    default_provider: ClassVar[str]
    #: the hint when a catalog entry lacks ``api_base_url``
    base_url_hint: ClassVar[str]

    def __init__(
        self,
        tokens: TokenSource,
        *,
        provider_id: str | None = None,
        base_url: str,
        http: httpx.AsyncClient,
        clock: Clock | None = None,
        actor: str | None = None,
        sleep: Sleep | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.provider_id = provider_id or self.default_provider
        self.base_url = base_url.rstrip("/")
        self.clock: Clock = clock or SystemClock()
        self.actor = actor or f"{self.default_provider}-client"
        self.api = BearerClient(
            tokens,
            provider_id=self.provider_id,
            name=self.title,
            http=http,
            clock=self.clock,
            actor=self.actor,
            sleep=sleep,
            retry=retry,
        )

    @classmethod
    def from_spec(
        cls, spec: ProviderSpec, tokens: TokenSource, *, http: httpx.AsyncClient, **options: Any
    ) -> Self:
        """A client for a catalog entry (its id and ``api_base_url``)."""
        if not spec.api_base_url:
            raise ConfigError(
                f"provider {spec.id!r} has no api_base_url",
                key=f"providers.{spec.id}.api_base_url",
                hint=cls.base_url_hint,
            )
        return cls(tokens, provider_id=spec.id, base_url=spec.api_base_url, http=http, **options)

    @classmethod
    def for_services(cls, services: Services, provider: str) -> Self:
        """A client for ``provider`` with what an integration command is given."""
        spec = services.broker.catalog.get(provider)
        return cls.from_spec(
            spec, services.broker, http=services.http, clock=services.clock, actor=services.actor
        )

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    def parse_each(
        self, parse: Callable[[dict[str, Any]], T], raw: Iterable[dict[str, Any]], *, what: str
    ) -> list[T]:
        """Every raw record ``parse``d; one it cannot read (KeyError, TypeError, ValueError)
        is a ProviderError saying the provider sent ``what`` ("an EGV record") unreadable."""
        try:
            return [parse(record) for record in raw]
        except (KeyError, TypeError, ValueError) as err:
            raise ProviderError(
                f"{self.title} sent {what} this client cannot read",
                provider=self.provider_id,
                description=type(err).__name__,
            ) from err
