"""Loopback only: a test may talk to this machine, never to the network.

:func:`install` patches the socket module so that connecting (``socket.connect``,
``connect_ex``, ``sendto``; ``create_connection`` and asyncio go through these) to an address
that is not loopback, or resolving a name other than ``localhost`` (``getaddrinfo``: a DNS
query is network access too), raises :class:`NetworkBlockedError` and records the attempt.
Unix sockets and loopback addresses (127.0.0.0/8, ::1) pass; so do numeric addresses given to
``getaddrinfo`` (a bind to 0.0.0.0 resolves, it connects nowhere).

In-process, tests/conftest.py installs it for the whole session and fails any test during
which an attempt was recorded, even one the code under test caught and turned into an
"unavailable" answer. Python subprocesses (the agentd CLI, the daemon, crash rigs) get the
same guard from a ``.pth`` file conftest writes into the virtualenv: it runs this file when
``$NETGUARD_FILE`` names it, and such a process appends its attempts to ``$NETGUARD_LOG``,
which conftest reads after each test. Programs that are not Python (Chromium, node, Go's
tailscaled) are not guarded: they only ever get loopback addresses from the tests.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["NetworkBlockedError", "attempts", "install", "is_loopback"]

#: what was blocked in this process, oldest first
attempts: list[str] = []


class NetworkBlockedError(OSError):
    """A test tried to reach the network (tests/netguard.py allows loopback only)."""


def is_loopback(host: str) -> bool:
    """``localhost``, or an address literal in 127.0.0.0/8 or ::1 (IPv4-mapped included)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    import ipaddress

    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _is_literal(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    return True


def _block(what: str, report: Callable[[str], None]) -> NetworkBlockedError:
    attempts.append(what)
    report(what)
    return NetworkBlockedError(f"network access blocked in tests: {what} (loopback only)")


def _address_ok(family: int, address: Any) -> tuple[bool, str]:
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return True, ""  # unix sockets, netlink, ...
    host = str(address[0])
    return is_loopback(host), f"{host}:{address[1]}"


def install(report: Callable[[str], None] = lambda what: None) -> None:
    """Patch the socket module of this process (idempotent)."""
    if getattr(socket, "_netguard_installed", False):
        return
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_sendto = socket.socket.sendto
    original_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        ok, shown = _address_ok(self.family, address)
        if not ok:
            raise _block(f"connect to {shown}", report)
        original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        ok, shown = _address_ok(self.family, address)
        if not ok:
            raise _block(f"connect to {shown}", report)
        return original_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        address = args[-1]
        ok, shown = _address_ok(self.family, address)
        if not ok:
            raise _block(f"datagram to {shown}", report)
        return int(original_sendto(self, data, *args))

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not isinstance(host, str):
            host = bytes(host).decode("idna")  # bytes, as asyncio may pass them
        if host and not is_loopback(host) and not _is_literal(host):
            raise _block(f"name lookup of {host}", report)
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign, assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign, assignment]
    socket.socket.sendto = sendto  # type: ignore[method-assign, assignment]
    socket.getaddrinfo = getaddrinfo
    socket._netguard_installed = True  # type: ignore[attr-defined]


def _append_to_log(what: str) -> None:
    """In a subprocess: the attempt goes to ``$NETGUARD_LOG`` for the test to see."""
    log = os.environ.get("NETGUARD_LOG")
    line = f"pid {os.getpid()}: {what}\n"
    if log:
        try:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError:
            pass
    try:
        os.write(2, f"netguard: blocked {what}\n".encode())
    except OSError:
        pass


#: the one line of the .pth file conftest writes (site runs lines that start with "import")
PTH_LINE = (
    "import os; _p = os.environ.get('NETGUARD_FILE'); "
    "_p and exec(compile(open(_p, encoding='utf-8').read(), _p, 'exec'), "
    "{'__name__': '__netguard__', '__file__': _p})\n"
)

if __name__ == "__netguard__":  # run by the .pth line in a Python subprocess of a test
    install(report=_append_to_log)
