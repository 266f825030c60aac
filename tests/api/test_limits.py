"""Hostile peers: connection caps and eviction, accept-error logs, the fd limit, the local
socket's uid check (a real subprocess under another uid), timeouts on silent clients."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest

from api.app import create_app
from api.limits import (
    AcceptErrorLog,
    Caps,
    Conn,
    ConnectionLimiter,
    default_caps,
    peer_uid,
)
from api.serve import ServePlan, serve
from api.settings import ApiSettings
from flowengine.engine import FlowEngine

from .conftest import TOKEN

pytestmark = pytest.mark.anyio


class Closed:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def conn(self, peer: str, name: str) -> Conn:
        return Conn(peer, close=lambda: self.closed.append(name))


# ------------------------------------------------------------------ the limiter


def test_idle_connections_of_one_peer_evict_their_oldest() -> None:
    log = Closed()
    limiter = ConnectionLimiter(Caps(max_total=100, max_per_peer=100, max_idle_per_peer=3))
    conns = [log.conn("10.0.0.1", f"c{i}") for i in range(5)]
    assert all(limiter.admit(c) for c in conns)
    assert log.closed == ["c0", "c1"]  # the oldest idle ones made room
    for c in conns[:2]:
        limiter.release(c)  # their close arrives later: counted once
    assert limiter.idle_count("10.0.0.1") == 3
    assert limiter.total == 3
    assert limiter.evicted == 2


def test_active_connections_are_never_evicted() -> None:
    log = Closed()
    limiter = ConnectionLimiter(Caps(max_total=100, max_per_peer=3, max_idle_per_peer=3))
    a, b, c = (log.conn("p", n) for n in "abc")
    for conn in (a, b, c):
        assert limiter.admit(conn)
        limiter.activate(conn)
    # per-peer cap reached, nothing idle to evict: the newcomer is refused
    assert not limiter.admit(log.conn("p", "d"))
    assert log.closed == []
    assert limiter.refused == 1
    limiter.release(a)
    assert limiter.admit(log.conn("p", "e"))


def test_a_full_daemon_evicts_the_crowds_idle_connections_for_a_newcomer() -> None:
    log = Closed()
    limiter = ConnectionLimiter(Caps(max_total=5, max_per_peer=10, max_idle_per_peer=10))
    owner = log.conn("owner", "owner")
    assert limiter.admit(owner)  # the oldest idle connection of all (its TLS is slow)
    flood = [log.conn("attacker", f"x{i}") for i in range(3)]
    for conn in flood:
        assert limiter.admit(conn)
    poller = log.conn("agent", "poll")
    assert limiter.admit(poller)
    limiter.activate(poller)
    # the flood keeps renewing: each newcomer evicts from the peer with the most idle ones
    for i in range(3, 6):
        assert limiter.admit(log.conn("attacker", f"x{i}"))
    assert log.closed == ["x0", "x1", "x2"]
    assert not owner.released
    late = log.conn("owner", "owner2")
    assert limiter.admit(late)
    assert log.closed == ["x0", "x1", "x2", "x3"]


def test_release_keeps_the_books_balanced() -> None:
    log = Closed()
    limiter = ConnectionLimiter(Caps(max_total=50, max_per_peer=50, max_idle_per_peer=5))
    conns = [log.conn(f"p{i % 3}", str(i)) for i in range(40)]
    admitted = [c for c in conns if limiter.admit(c)]
    for c in admitted[::2]:
        limiter.activate(c)
    for c in admitted:
        limiter.release(c)
    assert limiter.total == 0
    assert limiter.idle_count() == 0
    assert limiter._open == {}
    assert limiter._idle == {}


def test_default_caps_stay_below_the_fd_limit() -> None:
    caps = default_caps(1024)
    assert caps.max_total == 1024 - 128
    assert caps.max_per_peer == caps.max_total // 4
    assert default_caps(1 << 20).max_total == 8192
    assert default_caps(100).max_total == 32


# ------------------------------------------------------------ accept errors


def test_accept_errors_are_logged_once_a_minute_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    errors = AcceptErrorLog(clock=lambda: now[0])
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="api.limits"):
        for _ in range(5000):
            assert errors.note(emfile)
            now[0] += 0.005  # 200 a second, for 25 s
        now[0] += 60
        errors.note(emfile)
    lines = [r for r in caplog.records if r.name == "api.limits"]
    assert len(lines) == 2
    assert "Too many open files" in lines[0].getMessage()
    assert "(4999 more since the last report)" in lines[1].getMessage()
    assert all(r.exc_info is None for r in lines)  # no traceback
    assert errors.total == 5001
    assert not errors.note(OSError(errno.ECONNABORTED, "aborted"))  # not a resource error


def test_the_soft_fd_limit_is_raised_to_the_hard_one() -> None:
    """In a child process: soft 256, hard 1024 -> 1024 (as systemd's 1024/524288)."""
    script = textwrap.dedent(
        """
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))
        from api.limits import raise_nofile_limit
        print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "(256, 1024) (1024, 1024)"


# --------------------------------------------------------- a real server


@pytest.fixture(name="served")
async def _served(engine: FlowEngine) -> AsyncIterator[tuple[ServePlan, ApiSettings]]:
    with tempfile.TemporaryDirectory(prefix="ag") as short:
        settings = ApiSettings(
            mode="plain-test",
            port=0,
            api_token=TOKEN,
            local_socket=Path(short) / "agentd.sock",
            header_timeout=1.0,
        )
        app = create_app(engine, settings=settings)
        stop = anyio.Event()
        caps = Caps(max_total=40, max_per_peer=40, max_idle_per_peer=8)
        async with anyio.create_task_group() as tg:
            plan = await tg.start(
                partial(serve, app, settings, shutdown_trigger=stop.wait, caps=caps)
            )
            yield plan, settings
            stop.set()


async def _open_idle(host: str, port: int, source: str, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        await anyio.to_thread.run_sync(sock.connect_ex, (host, port))
        socks.append(sock)
    return socks


async def test_an_idle_flood_never_locks_out_a_real_client(
    served: tuple[ServePlan, ApiSettings],
) -> None:
    plan, _ = served
    flood = await _open_idle("127.0.0.1", plan.port, "127.0.0.66", 60)  # > max_total
    try:
        async with httpx.AsyncClient(base_url=plan.base_url) as owner:
            for _ in range(5):
                response = await owner.get("/healthz", timeout=10)
                assert response.status_code == 200
    finally:
        for sock in flood:
            sock.close()


async def test_a_silent_connection_is_closed_after_the_header_timeout(
    served: tuple[ServePlan, ApiSettings],
) -> None:
    plan, _ = served
    with socket.create_connection(("127.0.0.1", plan.port), timeout=15) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        with anyio.fail_after(15):
            data = await anyio.to_thread.run_sync(sock.recv, 1024)
    assert data == b""  # closed by the server, without an answer


def test_peer_uid_reads_so_peercred() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert peer_uid(left) == os.getuid()
    with socket.socket() as tcp:
        assert peer_uid(tcp) is None


_OTHER_UID = 65534  # nobody
#: an interpreter another uid may run (the venv's may live under a private home)
_ANY_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child under another uid")
@pytest.mark.skipif(_ANY_PYTHON is None, reason="no system python3 for the other uid")
async def test_the_local_socket_refuses_another_uid(
    served: tuple[ServePlan, ApiSettings],
) -> None:
    """Two layers: the socket file is 0600 (the other uid cannot connect at all); even when
    the file is opened up, the peer-uid check closes the connection before reading it."""
    plan, _ = served
    path = anyio.Path(plan.local_socket)
    client = textwrap.dedent(
        """
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sys.argv[1])
        except PermissionError:
            print("EACCES"); sys.exit(0)
        s.settimeout(10)
        try:
            s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: agentd\\r\\n\\r\\n")
            data = s.recv(1024)
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        print("REPLY" if data else "CLOSED")
        """
    )

    async def as_nobody() -> str:
        result = await anyio.run_process(
            [str(_ANY_PYTHON), "-c", client, str(path)], user=_OTHER_UID, check=True
        )
        return result.stdout.decode().strip()

    assert await as_nobody() == "EACCES"
    await path.parent.chmod(0o755)
    await path.chmod(0o666)  # only to reach the second layer
    assert await as_nobody() == "CLOSED"
    # our own uid gets an answer on the very same socket
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, base_url="http://agentd") as local:
        assert (await local.get("/healthz")).status_code == 200


def test_parked_long_polls_make_room_when_the_daemon_is_full() -> None:
    log = Closed()
    limiter = ConnectionLimiter(Caps(max_total=3, max_per_peer=10, max_idle_per_peer=10))
    polls = [log.conn(f"poller{i}", f"p{i}") for i in range(3)]
    for conn in polls:
        assert limiter.admit(conn)
        limiter.activate(conn)
    with limiter.parked(polls[1]), limiter.parked(polls[2]):
        owner = log.conn("owner", "owner")
        assert limiter.admit(owner)  # the longest-parked poll made room
        assert log.closed == ["p1"]
        limiter.activate(owner)
        owner2 = log.conn("owner", "owner2")
        assert limiter.admit(owner2)
        assert log.closed == ["p1", "p2"]
        limiter.activate(owner2)
        # nothing idle, nothing parked: a busy daemon refuses
        assert not limiter.admit(log.conn("x", "x"))
    assert limiter._parked == {}


def test_a_lone_idle_connection_outlives_pollers_that_reconnect() -> None:
    """The owner's connection, still in its TLS handshake, while pollers keep reconnecting."""
    log = Closed()
    limiter = ConnectionLimiter(Caps(max_total=3, max_per_peer=10, max_idle_per_peer=10))
    polls = [log.conn(f"poller{i}", f"p{i}") for i in range(2)]
    for conn in polls:
        assert limiter.admit(conn)
        limiter.activate(conn)
    with limiter.parked(polls[0]), limiter.parked(polls[1]):
        owner = log.conn("owner", "owner")
        assert limiter.admit(owner)
        assert limiter.admit(log.conn("poller9", "p9"))  # a parked poll goes, not the owner
        assert log.closed == ["p0"]
        assert not owner.released


_AT_THE_LIMIT = textwrap.dedent(
    """
    import logging, resource, sys
    from functools import partial
    from pathlib import Path
    import anyio
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from api.app import create_app
    from api.limits import Caps
    from api.serve import serve
    from api.settings import ApiSettings
    from flowengine.engine import FlowEngine

    async def main():
        engine = await FlowEngine.open(Path(sys.argv[1]))
        settings = ApiSettings(mode="plain-test", port=0, api_token="t" * 32)
        app = create_app(engine, settings=settings)
        stop = anyio.Event()
        caps = Caps(max_total=1000, max_per_peer=1000, max_idle_per_peer=1000)  # > the limit
        async with anyio.create_task_group() as tg:
            run = partial(serve, app, settings, shutdown_trigger=stop.wait, caps=caps)
            plan = await tg.start(run)
            print(plan.port, flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
            stop.set()
        await engine.close()

    anyio.run(main)
    """
)


def test_a_daemon_out_of_descriptors_logs_once_and_recovers(tmp_path: Path) -> None:
    """Caps set above the fd limit on purpose, so accept() really fails with EMFILE."""
    from tests.agentd.cli_helpers import LineReader

    child = subprocess.Popen(
        [sys.executable, "-c", _AT_THE_LIMIT, str(tmp_path / "ledger.sqlite3")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    assert child.stdin is not None
    out, err = LineReader(child.stdout), LineReader(child.stderr)
    held: list[socket.socket] = []
    try:
        port = int(out.wait_for(lambda line: line.strip().isdigit(), timeout=30))
        for _ in range(110):  # ~70 accepted up to the limit, the rest wait in the backlog
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        err.wait_for(lambda line: "cannot accept connections" in line, timeout=30)
        for _ in range(10):  # more attempts while still full: counted, not logged
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for sock in held:
            sock.close()
        held.clear()
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
    finally:
        for sock in held:
            sock.close()
        child.stdin.close()
        child.wait(30)
        log = err.rest()
        out.rest()
        child.stdout.close()
        child.stderr.close()
    assert log.count("cannot accept connections: Too many open files (open-file limit 96)") == 1
    assert "Traceback" not in log
