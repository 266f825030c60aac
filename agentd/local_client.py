"""The daemon's local socket, as same-host commands (``agentd connect``) use it.

``agentd serve`` listens on ``<state dir>/agentd.sock`` (mode 0600; a peer that is not the
daemon's uid or root is closed before it is read). Over it a command starts a flow the
daemon completes and long-polls the flow's outcome: no bearer token, no TLS, no name to
resolve, nothing on the network.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from flowengine.errors import BrokerError, DaemonRefusedError, ProviderTransientError

__all__ = ["DaemonRefusedError", "LocalDaemon", "local_daemon", "socket_path"]


def socket_path(state_dir: Path) -> Path:
    return state_dir / "agentd.sock"


def _not_running(path: Path, detail: str) -> ProviderTransientError:
    return ProviderTransientError(
        f"the daemon is not running ({detail} at {path}); start it with `agentd serve`"
        " (it must use the same state_dir)",
        provider="agentd",
    )


class LocalDaemon:
    """Requests to the daemon over its unix socket."""

    def __init__(self, http: httpx.AsyncClient, path: Path) -> None:
        self._http = http
        self.path = path

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as err:
            raise ProviderTransientError(
                f"the daemon did not answer in time ({self.path})", provider="agentd"
            ) from err
        except httpx.TransportError as err:
            raise _not_running(self.path, f"{type(err).__name__} on the socket") from err

    @staticmethod
    def _refused(response: httpx.Response) -> BrokerError:
        try:
            data = response.json()
        except ValueError:
            data = {}
        code = str(data.get("error") or f"http_{response.status_code}")
        message = str(data.get("message") or f"the daemon answered HTTP {response.status_code}")
        return DaemonRefusedError(message, daemon_code=code)

    async def health(self) -> None:
        response = await self._request("GET", "/healthz", timeout=10.0)
        if response.status_code != 200:
            raise self._refused(response)

    async def begin(self, provider: str, scopes: list[str] | None = None) -> dict[str, Any]:
        """Start a flow the daemon completes; its id, authorize URL and deadline."""
        body: dict[str, Any] = {"provider": provider}
        if scopes is not None:
            body["scopes"] = scopes
        response = await self._request("POST", "/oauth/flows", json=body, timeout=30.0)
        if response.status_code != 201:
            raise self._refused(response)
        data: dict[str, Any] = response.json()
        return data

    async def outcome(
        self,
        flow_id: str,
        *,
        timeout: float,
        step: float = 25.0,
        retry_delay: float = 1.0,
        on_wait: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Long-poll until the flow has its outcome or ``timeout`` seconds pass.

        The answer's ``outcome`` is "pending" when time ran out. A daemon that stops or
        restarts meanwhile is waited for until the deadline (the flow lives in the ledger,
        not in this process); then ProviderTransientError.
        """
        deadline = time.monotonic() + timeout
        trouble = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 and trouble:
                raise ProviderTransientError(
                    f"the daemon could not be reached: {trouble}", provider="agentd"
                )
            wait = max(0.0, min(step, left))
            try:
                response = await self._request(
                    "GET",
                    f"/oauth/flows/{flow_id}/outcome",
                    params={"wait": f"{wait:.1f}"},
                    timeout=httpx.Timeout(wait + 30.0, connect=10.0),
                )
            except ProviderTransientError as err:
                response, trouble = None, err.message
            if on_wait is not None:
                on_wait()
            if response is not None and response.status_code in (200, 202):
                data: dict[str, Any] = response.json()
                if response.status_code == 200 or time.monotonic() >= deadline:
                    return data
                trouble = ""
                continue
            if response is not None and response.status_code < 500:
                raise self._refused(response)
            if response is not None:
                trouble = f"HTTP {response.status_code}"
            await anyio.sleep(min(retry_delay, max(0.0, deadline - time.monotonic())))


@asynccontextmanager
async def local_daemon(state_dir: Path) -> AsyncIterator[LocalDaemon]:
    """A client of the daemon's socket in ``state_dir``; fails fast when it is not there."""
    path = socket_path(state_dir)
    if not await anyio.Path(path).is_socket():
        raise _not_running(path, "no socket")
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, base_url="http://agentd.local") as http:
        daemon = LocalDaemon(http, path)
        await daemon.health()
        yield daemon
