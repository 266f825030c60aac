"""Terminal prompts for client credentials: one clear error for EOF or garbage, never a traceback.

RFC 6749 Appendix A: ``client_id`` and ``client_secret`` are ``*VSCHAR`` (printable ASCII,
%x20-7E). Anything else (control characters, non-ASCII, bytes that are not UTF-8) is refused
with the key it concerns; the value itself is never echoed.
"""

from __future__ import annotations

import getpass
import sys

from flowengine.errors import ConfigError

__all__ = ["ask", "check_credential", "read_secret_line"]


def check_credential(value: str, *, key: str, what: str, missing: str | None = None) -> str:
    """``value`` stripped, or ConfigError (``missing`` when empty) if empty or not printable."""
    value = value.strip()
    if not value:
        raise ConfigError(missing or f"{what} is required", key=key)
    if any(not 0x20 <= ord(ch) <= 0x7E for ch in value):
        raise ConfigError(
            f"{what} may hold only printable ASCII characters (RFC 6749 Appendix A)", key=key
        )
    return value


def ask(
    prompt: str, *, key: str, what: str, secret: bool = False, missing: str | None = None
) -> str:
    """Ask on the terminal (``secret``: not echoed); ConfigError on EOF or an invalid answer."""
    try:
        answer = getpass.getpass(prompt) if secret else input(prompt)
    except EOFError:
        print(file=sys.stderr)  # end the prompt's line
        raise ConfigError(f"standard input ended before the {what} was given", key=key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} is not valid UTF-8 text", key=key) from None
    return check_credential(answer, key=key, what=what, missing=missing)


def read_secret_line(*, key: str, what: str, missing: str | None = None) -> str:
    """One line from standard input (``--secret-stdin``), checked like a prompt's answer."""
    try:
        line = sys.stdin.readline()
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} is not valid UTF-8 text", key=key) from None
    return check_credential(line, key=key, what=what, missing=missing)
