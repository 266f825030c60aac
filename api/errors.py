"""HTTP-side errors and the one mapping from the BrokerError tree to HTTP status codes.

The mapping is looked up along the exception's MRO (as starlette does), so a new
subclass gets its parent's status until it is listed itself.
"""

from __future__ import annotations

from flowengine.errors import (
    BrokerError,
    CodeAlreadyUsedError,
    ConcurrentUpdateError,
    ConfigError,
    CredentialsMissingError,
    DiscoveryError,
    FlowError,
    FlowExpiredError,
    FlowNotFound,
    InvalidTransition,
    NotConnectedError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
    StateMismatchError,
    StorageError,
    UnknownProviderError,
)

from .tailscale import TailscaleError

__all__ = [
    "STATUS_BY_ERROR",
    "ApiError",
    "BadRequestError",
    "UnauthorizedError",
    "status_for",
]


class ApiError(BrokerError):
    """A request the API refuses before it reaches the engine."""

    code = "api_error"
    http_status = 400


class BadRequestError(ApiError):
    """A query parameter is missing or malformed; ``parameter`` names it."""

    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class UnauthorizedError(ApiError):
    """No or wrong bearer token."""

    code = "unauthorized"
    http_status = 401


#: exception class -> HTTP status; the first class on the MRO that is listed wins
STATUS_BY_ERROR: dict[type[BaseException], int] = {
    BadRequestError: 400,
    UnauthorizedError: 401,
    ApiError: 400,
    StateMismatchError: 400,
    FlowNotFound: 404,
    FlowExpiredError: 410,
    CodeAlreadyUsedError: 410,
    InvalidTransition: 409,
    ConcurrentUpdateError: 409,
    FlowError: 400,
    UnknownProviderError: 404,
    DiscoveryError: 400,
    ConfigError: 500,
    CredentialsMissingError: 409,
    NotConnectedError: 409,
    ReauthorizationRequired: 409,
    ProviderTransientError: 503,
    ProviderError: 502,
    TailscaleError: 503,
    StorageError: 503,
    BrokerError: 500,
}


def status_for(error: BaseException) -> int:
    for cls in type(error).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return 500
