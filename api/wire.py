"""What the blueprints read from a request and write back: a number from the query string
(absent or empty -> a default, anything else -> a 400), a JSON answer with a status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from quart import Response, jsonify

from .errors import BadRequestError

__all__ = ["json_response", "query_number"]

_N = TypeVar("_N", int, float)


def query_number(
    value: str | None, kind: Callable[[str], _N], *, name: str, default: _N, must: str
) -> _N:
    """``?name=value`` as ``kind``; ``default`` when absent or empty; BadRequestError
    (``"<name> must be <must>"``) when it is not one. The caller checks the range."""
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError as err:
        raise BadRequestError(f"{name} must be {must}", parameter=name) from err


def json_response(status: int, payload: dict[str, Any]) -> Response:
    """``payload`` as JSON with HTTP status ``status``."""
    response = jsonify(payload)
    response.status_code = status
    return response
