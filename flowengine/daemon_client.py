"""Client for the daemon's ``GET /oauth/pending/<state>`` long-poll (used by the CLI and bot).

The poller may run in another process (or host) than the daemon: it asks over HTTP with
the API bearer token until the code arrives, the flow ends, or its own deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
import httpx

from .errors import BrokerError, FlowNotFound, ProviderTransientError

__all__ = ["PendingResult", "wait_for_code"]


@dataclass(frozen=True, slots=True)
class PendingResult:
    """``status``: ``ready`` (code holds the code), ``gone`` (reason says why) or ``timeout``."""

    status: str
    flow_id: str | None = None
    provider: str | None = None
    code: str | None = field(default=None, repr=False)
    received_at: int | None = None
    reason: str | None = None
    error: str | None = None
    error_description: str | None = None


class DaemonAuthError(BrokerError):
    """The daemon refused the API token (401/403)."""

    code = "daemon_unauthorized"


async def wait_for_code(
    http: httpx.AsyncClient,
    base_url: str,
    state: str,
    api_token: str,
    *,
    timeout: float,
    step: float = 25.0,
    retry_delay: float = 1.0,
    on_wait: Callable[[], Any] | None = None,
) -> PendingResult:
    """Long-poll the daemon until a code or an ending arrives (or ``timeout`` seconds pass).

    Network errors and 5xx are retried until the deadline; 401/403 raise DaemonAuthError;
    404 raises FlowNotFound.
    """
    url = f"{base_url.rstrip('/')}/oauth/pending/{quote(state, safe='')}"
    headers = {"Authorization": f"Bearer {api_token}", "Accept": "application/json"}
    deadline = time.monotonic() + timeout
    last_error: str | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if last_error:
                raise ProviderTransientError(
                    f"the daemon could not be reached: {last_error}", provider="agentd"
                )
            return PendingResult(status="timeout")
        wait = max(0, min(step, int(remaining)))
        try:
            response = await http.get(
                url,
                params={"wait": str(wait)},
                headers=headers,
                timeout=httpx.Timeout(wait + 10.0, connect=10.0),
            )
        except httpx.HTTPError as err:
            last_error = type(err).__name__
            await anyio.sleep(min(retry_delay, max(0.0, deadline - time.monotonic())))
            continue
        if on_wait is not None:
            on_wait()
        if response.status_code in (401, 403):
            raise DaemonAuthError("the daemon refused the API token (check server.api_token)")
        if response.status_code == 404:
            raise FlowNotFound("the daemon knows no authorization with this state")
        if response.status_code >= 500:
            last_error = f"HTTP {response.status_code}"
            await anyio.sleep(min(retry_delay, max(0.0, deadline - time.monotonic())))
            continue
        last_error = None
        if response.status_code == 202:
            continue
        try:
            data = response.json()
        except ValueError:
            last_error = "malformed answer"
            continue
        if response.status_code == 200:
            return PendingResult(
                status="ready",
                flow_id=data.get("flow_id"),
                provider=data.get("provider"),
                code=data.get("code"),
                received_at=data.get("received_at"),
            )
        if response.status_code == 410:
            return PendingResult(
                status="gone",
                flow_id=data.get("flow_id"),
                provider=data.get("provider"),
                reason=data.get("reason"),
                error=data.get("error"),
                error_description=data.get("error_description"),
            )
        last_error = f"HTTP {response.status_code}"
        await anyio.sleep(min(retry_delay, max(0.0, deadline - time.monotonic())))
