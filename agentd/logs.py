"""Logging set-up shared by every entry point (the CLI's commands and ``agentd serve``).

Our own loggers never log a secret. Some libraries do at DEBUG or INFO: aiosqlite logs every
statement with its parameters (codes, verifiers), hpack every decoded header (the API's bearer
token), httpx/httpcore request lines and connection details; Telethon, Hypercorn, Quart and
transitions add chatter. They are held at WARNING whatever ``-v`` says.
"""

from __future__ import annotations

import logging

__all__ = ["QUIET_LIBRARIES", "configure_logging", "quiet_libraries"]

#: loggers kept at WARNING: they print SQL parameters, headers or request details below it
QUIET_LIBRARIES = (
    "aiosqlite",
    "asyncio",
    "authlib",
    "h11",
    "h2",
    "hpack",
    "httpcore",
    "httpx",
    "hypercorn",
    "matplotlib",
    "PIL",
    "quart",
    "telethon",
    "transitions",
    "urllib3",
)


def quiet_libraries() -> None:
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(
    *, verbose: bool, default: int = logging.WARNING, force: bool = False
) -> None:
    """Root logging to stderr: DEBUG with ``-v``, else ``default``; libraries quieted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else default,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=force,
    )
    quiet_libraries()
