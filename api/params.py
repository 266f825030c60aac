"""Query parameters as numbers: absent or empty -> a default, anything else -> a 400."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .errors import BadRequestError

__all__ = ["query_number"]

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
