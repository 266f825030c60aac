"""How the ``agentd`` command ends on an error: one table, looked up along the MRO.

A row names the exit code (a key of ``EXIT``, README's table) and how the error is worded
for the terminal: ``error: <message>``, what to do about it after a semicolon (``advice``),
and further lines (``more``). The classes are the product's tree (flowengine/errors.py);
a new subclass ends like its parent until it has a row of its own. The daemon's own errors
reach a local client as :class:`DaemonRefusedError` carrying the daemon's code, which
:data:`DAEMON_CODES` turns into the same exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowengine import errors as e

__all__ = ["DAEMON_CODES", "ENDINGS", "Ending", "error_lines", "exit_name"]

Words = Callable[[Any], str | None]


@dataclass(frozen=True, slots=True)
class Ending:
    """The exit code's name (or how to tell it from the error) and the wording of one
    class of error."""

    exit: str | Callable[[Any], str]
    #: what to do, after the message and a semicolon
    advice: Words | None = None
    #: the line instead of ``error: <message>``
    text: Words | None = None
    #: lines after the first
    more: Callable[[Any], list[str]] | None = None


def _connect(err: Any) -> str:
    """Connect the provider again: here, or on the daemon the tokens came from."""
    where = "there" if getattr(err, "daemon", None) else "run"
    return f"{where}: agentd connect {err.provider}"


#: error codes the daemon answers a local request with -> exit code (agentd connect <url>)
DAEMON_CODES = {
    "discovery_failed": "usage",
    "registration_failed": "usage",
    "no_device_endpoint": "usage",
    "config_error": "usage",
    "unknown_provider": "usage",
    "credentials_missing": "usage",
    "bad_request": "usage",
    "provider_unavailable": "unavailable",
    "tls_error": "unavailable",
    "reauthorization_required": "reauthorize",
}

#: exception class -> ending; the first class on the MRO that is listed wins
ENDINGS: dict[type[BaseException], Ending] = {
    e.DaemonRefusedError: Ending(lambda err: DAEMON_CODES.get(err.daemon_code, "error")),
    e.UnknownProviderError: Ending(
        "usage",
        more=lambda err: [
            *([f"did you mean: {', '.join(err.suggestions)}?"] if err.suggestions else []),
            "see `agentd providers` for the catalog",
        ],
    ),
    # only `flow` and `diagram --flow` look flows up by id: a mistyped id is a usage error
    e.FlowNotFound: Ending("usage", advice=lambda err: "see `agentd flows`"),
    e.FlowError: Ending("flow_failed"),
    e.CredentialsMissingError: Ending(
        "usage", advice=lambda err: f"run: agentd credentials {err.provider}"
    ),
    e.NoDeviceEndpointError: Ending(
        "usage",
        advice=lambda err: f"connect it with the browser link: agentd connect {err.provider}",
    ),
    e.DotUnavailableError: Ending(
        "usage",
        text=lambda err: (
            "error: --format svg needs Graphviz's `dot`, which is not installed"
            " (Debian/Ubuntu: sudo apt-get install graphviz; or use --format mermaid or dot)"
        ),
    ),
    e.ConfigError: Ending("usage"),
    # the server will not register us; a client stored by hand will do
    e.RegistrationError: Ending(
        "usage",
        advice=lambda err: (
            f"register one by hand and store it with `agentd credentials {err.provider}`"
        ),
    ),
    e.ReauthorizationRequired: Ending("reauthorize", advice=_connect),
    e.ProviderTransientError: Ending("unavailable"),
    e.NotConnectedError: Ending("not_connected", advice=_connect),
    e.BrokerError: Ending("error"),
}

_UNEXPECTED = Ending("error")


def _ending(err: BaseException) -> Ending:
    return e.by_class(ENDINGS, err, _UNEXPECTED)


def exit_name(err: BaseException) -> str:
    """The exit code's name (a key of ``EXIT``) for ``err``."""
    named = _ending(err).exit
    return named if isinstance(named, str) else named(err)


def error_lines(err: e.BrokerError) -> list[str]:
    """What the command prints on stderr for ``err``: one line, sometimes a few more."""
    ending = _ending(err)
    line = ending.text(err) if ending.text else None
    if line is None:
        advice = ending.advice(err) if ending.advice else None
        line = f"error: {err.message}" + (f"; {advice}" if advice else "")
    return [line, *(ending.more(err) if ending.more else [])]
