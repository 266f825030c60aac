"""systemd integration without a dependency: readiness, watchdog, journald.

* :func:`notify` sends one datagram to ``$NOTIFY_SOCKET`` (the sd_notify protocol: newline
  separated ``KEY=value`` lines; a path, or an abstract socket written with a leading
  ``@``). ``agentd serve`` says ``READY=1`` once it listens, ``WATCHDOG=1`` every half of
  ``$WATCHDOG_USEC`` while its event loop is alive, and ``STOPPING=1`` when it shuts down.
  Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) nothing is sent.
* :func:`journald_stderr` tells whether standard error is a journald stream
  (``$JOURNAL_STREAM`` holds its ``device:inode``): then the log lines carry no timestamp
  of their own (journald adds one) but a ``<priority>`` prefix journald understands.

``$STATE_DIRECTORY`` (``StateDirectory=``) is honoured where every component finds its
state dir: flowengine.paths.state_dir.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["journald_stderr", "notify", "watchdog_interval"]


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other kinds are not supported (never the case for a service)


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to the service manager; False when there is none to tell, or it
    could not take the message right now (never blocks: the event loop calls this)."""
    environ = os.environ if env is None else env
    address = _address(environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, kind) as sock:
        try:
            sock.connect(address)
            sock.send(message.encode("utf-8"))
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            return False  # its queue is full or it is gone: the next ping tries again
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no
    watchdog is set for this process (``$WATCHDOG_PID`` names another one)."""
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def journald_stderr(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the stream journald gave this service (``$JOURNAL_STREAM``)."""
    environ = os.environ if env is None else env
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"
