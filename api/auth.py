"""Bearer-token check for the API routes (the callback route has none: the browser calls it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

from quart import request

from .context import api_context
from .errors import UnauthorizedError
from .settings import token_matches

__all__ = ["require_bearer"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def require_bearer(handler: F) -> F:
    """Refuse with 401 unless ``Authorization: Bearer <api token>`` matches (constant time).

    Requests on the local listener (the state dir's unix socket, admitted by peer uid) need
    no token: the socket's permissions and the uid check are the credential.
    """

    @wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if request.scope.get("agentd.listener") == "local":
            return await handler(*args, **kwargs)
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not token_matches(
            presented.strip(), api_context().settings.api_token
        ):
            raise UnauthorizedError("a valid API bearer token is required")
        return await handler(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
