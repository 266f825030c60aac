"""A small TOML writer for ``agentd config show`` (the standard library only reads TOML).

:func:`value` writes one value so that ``tomllib`` reads back the same value (TOML 1.0):
strings as basic strings with every control character escaped, integers, floats
(``nan``, ``inf``), booleans, dates and times, arrays and inline tables. :func:`key`
quotes a key only when it is not bare.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["key", "value"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:  # a lone surrogate (undecodable bytes in the env)
            out.append("\\uFFFD")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name: str) -> str:
    """A key as TOML writes it: bare when it can be, else a quoted string."""
    return name if _BARE_KEY.match(name) else _string(name)


def value(obj: Any) -> str:
    """One TOML value for ``obj`` (str, int, float, bool, date/time, list, mapping)."""
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        text = repr(obj)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(obj, str):
        return _string(obj)
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{key(str(k))} = {value(v)}" for k, v in obj.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(value(v) for v in obj) + "]"
    raise TypeError(f"no TOML value for {type(obj).__name__}")
