"""Logging set-up shared by every entry point (the CLI's commands and ``agentd serve``).

Our own loggers never log a secret. Some libraries do at DEBUG or INFO: aiosqlite logs every
statement with its parameters (codes, verifiers), hpack every decoded header (the API's bearer
token), httpx/httpcore request lines and connection details; Telethon, Hypercorn, Quart and
transitions add chatter. They are held at WARNING whatever ``-v`` says.
"""

from __future__ import annotations

import logging

__all__ = ["QUIET_LIBRARIES", "JournalFormatter", "configure_logging", "quiet_libraries"]

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


class JournalFormatter(logging.Formatter):
    """For journald: no timestamp (journald adds its own), the level as a ``<priority>``
    prefix journald reads (sd-daemon(3)), then ``logger: message``."""

    PRIORITIES = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def configure_logging(
    *, verbose: bool, default: int = logging.WARNING, force: bool = False
) -> None:
    """Root logging to stderr: DEBUG with ``-v``, else ``default``; libraries quieted.

    When stderr is journald's stream (a systemd service), lines carry no timestamp of
    their own but a priority prefix (see :class:`JournalFormatter`).
    """
    from agentd.systemd import journald_stderr

    logging.basicConfig(
        level=logging.DEBUG if verbose else default,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=force,
    )
    if journald_stderr():
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JournalFormatter())
    quiet_libraries()
