"""The loopback-only guard (tests/netguard.py) blocks what it should, in this process and in
Python subprocesses, and lets loopback through."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netguard


@pytest.fixture(name="forget_attempts")
def _forget_attempts() -> Iterator[None]:
    """The attempts these tests make on purpose must not fail them (tests/conftest.py)."""
    seen = len(netguard.attempts)
    log = Path(os.environ["NETGUARD_LOG"])
    before = log.read_text(encoding="utf-8")
    yield
    del netguard.attempts[seen:]
    log.write_text(before, encoding="utf-8")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("agentd.localhost", True),
        ("192.0.2.1", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("2001:db8::1", False),
        ("example.com", False),
        ("host.tailnet.ts.net", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert netguard.is_loopback(host) is loopback


@pytest.mark.usefixtures("forget_attempts")
def test_a_connection_beyond_loopback_is_blocked_and_recorded() -> None:
    seen = len(netguard.attempts)
    with pytest.raises(netguard.NetworkBlockedError, match="192.0.2.1:9"):
        socket.create_connection(("192.0.2.1", 9), timeout=1)
    with pytest.raises(netguard.NetworkBlockedError, match="name lookup of example.com"):
        socket.getaddrinfo("example.com", 443)
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp,
        pytest.raises(netguard.NetworkBlockedError, match="datagram"),
    ):
        udp.sendto(b"x", ("2001:db8::1", 53))
    assert netguard.attempts[seen:] == [
        "connect to 192.0.2.1:9",
        "name lookup of example.com",
        "datagram to 2001:db8::1:53",
    ]


def test_loopback_and_literal_lookups_pass() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5):
            pass
    assert socket.getaddrinfo("0.0.0.0", 80)  # a literal resolves without a lookup
    assert socket.getaddrinfo(None, 80)


@pytest.mark.usefixtures("forget_attempts")
def test_a_python_subprocess_is_guarded_and_reports_to_the_log() -> None:
    log = Path(os.environ["NETGUARD_LOG"])
    before = log.read_text(encoding="utf-8")
    code = "import socket\nsocket.create_connection(('192.0.2.1', 9), timeout=1)\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode != 0
    assert "NetworkBlockedError" in result.stderr
    assert "netguard: blocked connect to 192.0.2.1:9" in result.stderr
    added = log.read_text(encoding="utf-8")[len(before) :]
    assert added == f"pid {added.split()[1].rstrip(':')}: connect to 192.0.2.1:9\n"
