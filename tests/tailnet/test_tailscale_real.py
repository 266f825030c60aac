"""api/tailscale.py against real tailscaled: status, whois (LocalAPI and CLI), forwarding."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from api.tailscale import LocalAPI, TailscaleCLI, TailscaleClient

from .harness import BIN_DIR, Node, Tailnet

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture(name="server")
def _server(tailnet: Tailnet) -> Node:
    return tailnet["agentd-host"]


@pytest.fixture(name="client", params=["localapi", "cli"])
async def _client(request: pytest.FixtureRequest, server: Node) -> AsyncIterator[TailscaleClient]:
    """The daemon's two ways of asking tailscaled: its LocalAPI socket, the CLI fallback."""
    if request.param == "localapi":
        async with LocalAPI(server.socket, timeout=30) as api:
            yield api
    else:
        yield TailscaleCLI(str(BIN_DIR / "tailscale"), socket=server.socket, timeout=30)


async def test_status_gives_name_addresses_state_and_userspace_mode(
    client: TailscaleClient, server: Node
) -> None:
    status = await client.status()
    assert status.running
    assert status.backend_state == "Running"
    assert status.dns_name == "agentd-host.tailnet-test.ts.net"
    assert status.magicdns_name == "agentd-host.tailnet-test.ts.net"
    assert status.cert_domains == ("agentd-host.tailnet-test.ts.net",)
    assert status.tailscale_ips == tuple(server.status["TailscaleIPs"])
    assert status.ipv4 is not None
    assert status.ipv4.startswith("100.64.")
    assert status.tun is False  # --tun=userspace-networking
    assert status.https_capable  # testcontrol grants the "https" capability
    assert status.self_tags == ("tag:server",)


async def test_whois_names_users_tagged_nodes_self_and_strangers(
    client: TailscaleClient, tailnet: Tailnet
) -> None:
    owner, guest, tagged, me = (
        tailnet["owner-laptop"],
        tailnet["guest-phone"],
        tailnet["ci-runner"],
        tailnet["agentd-host"],
    )
    who = await client.whois(f"{owner.ip4}:41000")
    assert who is not None
    assert (who.login, who.tagged) == (owner.login, False)
    assert who.node_name == "owner-laptop.tailnet-test.ts.net"
    assert owner.login != guest.login  # testcontrol: one user per node
    guest_who = await client.whois(f"[{guest.ip6}]:443")
    assert guest_who is not None
    assert guest_who.login == guest.login
    tagged_who = await client.whois(tagged.ip4)
    assert tagged_who is not None
    assert tagged_who.tagged
    assert tagged_who.tags == ("tag:ci",)
    # the server's own address answers its own (tagged) node: tailscale-verified.md #8
    self_who = await client.whois(me.ip4)
    assert self_who is not None
    assert self_who.tags == ("tag:server",)
    # no node: LocalAPI 404 "no match for IP:port", CLI "peer not found"; both mean None
    assert await client.whois("100.64.99.99:80") is None
    assert await client.whois("127.0.0.1:1") is None


class _Listener:
    """A loopback TCP listener that records each accepted peer and holds it open."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self.accepted = threading.Event()
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, peer = self.sock.accept()
        with conn:
            self.peers.append(peer)
            self.accepted.set()
            self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self._thread.join(10)
        self.sock.close()


@pytest.fixture(name="listener")
def _listener() -> Iterator[_Listener]:
    listener = _Listener()
    yield listener
    listener.close()


async def test_userspace_forwarding_lands_on_loopback_and_whois_names_the_peer(
    client: TailscaleClient, tailnet: Tailnet, listener: _Listener
) -> None:
    """A peer's connection to the server's 100.x:port arrives from 127.0.0.1:<ephemeral>,
    and whois of that ip:port names the peer (netstack's ProxyMapper; verified.md #9)."""
    server, owner = tailnet["agentd-host"], tailnet["owner-laptop"]
    dialer = threading.Thread(target=_dial_through, args=(owner, server.ip4, listener.port))
    dialer.start()
    try:
        assert listener.accepted.wait(30), "the tailnet connection never arrived"
        host, port = listener.peers[0]
        assert host == "127.0.0.1"
        who = await client.whois(f"{host}:{port}")
        assert who is not None
        assert who.login == owner.login
        # a local process on another loopback port is not a node
        assert await client.whois(f"127.0.0.1:{listener.port}") is None
    finally:
        listener.release.set()
        dialer.join(30)


def _dial_through(node: Node, host: str, port: int) -> None:
    """Open a TCP connection to host:port through ``node``'s HTTP proxy (CONNECT)."""
    proxy_host, proxy_port = node.http_proxy.rsplit(":", 1)
    with socket.create_connection((proxy_host, int(proxy_port)), timeout=30) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        reply = sock.recv(1024)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        sock.recv(1)  # held until the listener lets go
