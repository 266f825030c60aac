"""Absorbing hostile peers: connection caps, the file-descriptor limit, accept-error logs.

- :class:`ConnectionLimiter` decides at accept time, before a byte is read: at most
  ``max_total`` open connections, at most ``max_per_peer`` from one peer, and at most
  ``max_idle_per_peer`` *idle* ones from one peer (idle: no request on it has passed the
  guard yet). When a cap is reached a connection is closed to make room: the peer's own
  oldest idle one, else one of the peer with the most idle connections, else the oldest
  *parked* one (a long-poll that is only waiting: its client polls again), so neither an
  idle flood nor a crowd of pollers locks a real client out; only when every connection in
  the way is busy is the new one refused. Under userspace networking every tailnet peer
  arrives from 127.0.0.1, which is why eviction, not refusal, is the answer to floods.
- :func:`raise_nofile_limit` lifts ``RLIMIT_NOFILE``'s soft limit to the hard one (systemd
  starts services at 1024 soft / 524288 hard); :func:`default_caps` sizes the caps below it.
- :class:`AcceptErrorLog` turns accept() failures for lack of descriptors (EMFILE & co.)
  into one line a minute with a count (asyncio's own accept loop would log a traceback
  for each attempt).
- :func:`peer_uid` reads a unix-socket peer's uid (``SO_PEERCRED``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AcceptErrorLog",
    "Caps",
    "ConnectionLimiter",
    "Conn",
    "default_caps",
    "peer_uid",
    "raise_nofile_limit",
]

log = logging.getLogger("api.limits")

#: file descriptors kept free for the ledger, auth.json, certificates, tailscaled, logs
FD_RESERVE = 128
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True, slots=True)
class Caps:
    max_total: int
    max_per_peer: int
    max_idle_per_peer: int


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("could not raise the open-file limit from %d: %s", soft, err)
            return soft, soft
        return soft, target
    return soft, soft


def default_caps(nofile: int | None = None) -> Caps:
    """Caps that keep the daemon under its file-descriptor limit with room to spare."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    total = max(32, min(8192, nofile - FD_RESERVE))
    return Caps(max_total=total, max_per_peer=max(16, total // 4), max_idle_per_peer=32)


@dataclass(eq=False, slots=True)
class Conn:
    """One accepted connection as the limiter sees it."""

    peer: str
    close: Callable[[], None] = field(repr=False)
    active: bool = False
    #: what the connection's requests carry into the ASGI scope (listener, peer uid, ...)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    #: a long-poll on it is only waiting (it may be closed to make room)
    parked: bool = False
    #: its slot is free again (released, or evicted: the fd is closed at once, though
    #: Hypercorn's task for it may linger until its idle timer ends)
    released: bool = False


class ConnectionLimiter:
    """Caps on open connections; evicts the oldest idle ones to make room."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self._open: dict[str, int] = {}
        self._idle: dict[str, OrderedDict[Conn, None]] = {}
        self._idle_all: OrderedDict[Conn, None] = OrderedDict()
        self._parked: OrderedDict[Conn, None] = OrderedDict()
        self.total = 0
        self.refused = 0
        self.evicted = 0

    def admit(self, conn: Conn) -> bool:
        """Take ``conn`` in (possibly closing idle ones); False: refuse it, close it now."""
        caps = self.caps
        peer = conn.peer
        idle = self._idle.get(peer)
        if self._open.get(peer, 0) >= caps.max_per_peer and not self._evict_from(idle):
            self.refused += 1
            return False
        if idle is not None and len(idle) >= caps.max_idle_per_peer:
            self._evict_from(idle)
        if self.total >= caps.max_total and not self._make_room():
            self.refused += 1
            return False
        self.total += 1
        self._open[peer] = self._open.get(peer, 0) + 1
        self._idle.setdefault(peer, OrderedDict())[conn] = None
        self._idle_all[conn] = None
        return True

    def activate(self, conn: Conn) -> None:
        """A request on ``conn`` passed the guard: it no longer counts as idle."""
        if conn.active:
            return
        conn.active = True
        self._forget_idle(conn)

    @contextlib.contextmanager
    def parked(self, conn: Conn) -> Iterator[None]:
        """While a long-poll on ``conn`` only waits, the daemon may close it to make room."""
        if conn.released:
            yield
            return
        conn.parked = True
        self._parked[conn] = None
        try:
            yield
        finally:
            conn.parked = False
            self._parked.pop(conn, None)

    def release(self, conn: Conn) -> None:
        """``conn`` closed (for whatever reason); call once per admitted conn."""
        if conn.released:
            return
        conn.released = True
        self._forget_idle(conn)
        self.total -= 1
        left = self._open.get(conn.peer, 1) - 1
        if left:
            self._open[conn.peer] = left
        else:
            self._open.pop(conn.peer, None)

    def idle_count(self, peer: str | None = None) -> int:
        if peer is None:
            return len(self._idle_all)
        return len(self._idle.get(peer) or ())

    def _forget_idle(self, conn: Conn) -> None:
        self._parked.pop(conn, None)
        self._idle_all.pop(conn, None)
        idle = self._idle.get(conn.peer)
        if idle is not None:
            idle.pop(conn, None)
            if not idle:
                del self._idle[conn.peer]

    def _evict(self, conn: Conn) -> None:
        conn.active = True  # never activated or chosen again
        self.release(conn)
        self.evicted += 1
        conn.close()

    def _evict_from(self, idle: OrderedDict[Conn, None] | None) -> bool:
        if not idle:
            return False
        self._evict(next(iter(idle)))
        return True

    def _make_room(self) -> bool:
        """Close one connection for a newcomer: an idle one of the peer with the most idle
        connections (a flood renews its connections all the time, so the globally oldest
        idle one would be a real client's), else the longest-parked long-poll, else the
        oldest idle connection at all. False when everything is busy."""
        crowd = max(self._idle.values(), key=len, default=None)
        if crowd is not None and len(crowd) > 1:
            self._evict(next(iter(crowd)))
            return True
        if self._parked:
            self._evict(next(iter(self._parked)))
            return True
        if self._idle_all:
            self._evict(next(iter(self._idle_all)))
            return True
        return False


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a unix-socket peer (Linux ``SO_PEERCRED``), None when unavailable."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock.family != socket.AF_UNIX:
        return None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", data)
    return int(uid)


class AcceptErrorLog:
    """accept() failing for lack of resources (EMFILE & co.): one line a ``period``, counted.

    The accept loop calls :meth:`note` for every failure; without it, a daemon at its
    descriptor limit writes a line (asyncio: a traceback) per attempt.
    """

    def __init__(self, *, period: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.period = period
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0
        self.total = 0

    def note(self, exc: OSError) -> bool:
        """Count (and maybe log) ``exc``; False when it is no resource error."""
        if exc.errno not in _RESOURCE_ERRNOS:
            return False
        self.total += 1
        now = self._clock()
        if self._last is not None and now - self._last < self.period:
            self.suppressed += 1
            return True
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        log.error(
            "cannot accept connections: %s (open-file limit %d); retrying%s",
            exc.strerror or exc,
            soft,
            more,
        )
        self._last = now
        self.suppressed = 0
        return True
