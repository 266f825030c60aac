"""Fakes of tailscaled for tests, faithful to the wire formats in shared/tailscale.md.

- :class:`FakeTailnet`: the data both fakes serve (status, whois table, certificate pair,
  serve config) and switches for the certificate endpoint's failure modes.
- :func:`localapi_app`: a Quart app speaking the LocalAPI (``/localapi/v0/status``,
  ``whois``, ``cert/<domain>``, ``serve-config``); :func:`run_localapi` serves it with
  Hypercorn on a unix socket; :class:`LocalAPIThread` does so from a thread of its own
  (for tests that are not async, e.g. with a daemon subprocess asking it).
- :func:`install_fake_cli`: writes a ``tailscale`` executable into a directory (put it on
  PATH) that answers ``status --json``, ``whois --json``, ``cert --cert-file --key-file``
  and ``ip`` from a JSON file, and logs its argv.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import stat
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import trustme
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from quart import Quart, Response, request

DOMAIN = "host.tailnet-name.ts.net"
SELF_V4 = "100.101.102.103"
SELF_V6 = "fd7a:115c:a1e0::1234:5678"
OWNER = "owner@example.com"


def status_json(
    *,
    domain: str = DOMAIN,
    backend_state: str = "Running",
    tun: bool = True,
    https: bool = True,
    cert_domains: bool = True,
    ips: tuple[str, ...] = (SELF_V4, SELF_V6),
) -> dict[str, Any]:
    """``ipnstate.Status`` as in §3 (``peers=false``: no Peer key)."""
    running = backend_state == "Running"
    return {
        "Version": "1.102.3-tabcdef-gabcdef",
        "TUN": tun,
        "BackendState": backend_state,
        "HaveNodeKey": True,
        "AuthURL": "",
        "TailscaleIPs": list(ips) if running else [],
        "Self": {
            "ID": "nAbCdEf1CNTRL",
            "HostName": domain.split(".")[0],
            "DNSName": domain + ".",
            "OS": "linux",
            "UserID": 12345,
            "TailscaleIPs": list(ips) if running else [],
            "Capabilities": ["https"] if https else [],
            "CapMap": {"https": None} if https else {},
            "Online": running,
        },
        "Health": [],
        "MagicDNSSuffix": domain.split(".", 1)[1],
        "CurrentTailnet": {
            "Name": OWNER,
            "MagicDNSSuffix": domain.split(".", 1)[1],
            "MagicDNSEnabled": True,
        },
        "CertDomains": [domain] if cert_domains and https else None,
        "ExtraRecords": None,
        "Peer": None,
        "User": {
            "12345": {
                "ID": 12345,
                "LoginName": OWNER,
                "DisplayName": "Owner",
                "ProfilePicURL": "https://example.com/p.png",
            }
        },
        "ClientVersion": None,
    }


def whois_json(ip: str, login: str, *, tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """``apitype.WhoIsResponse`` as in §4; tagged nodes get the literal "tagged-devices"."""
    node: dict[str, Any] = {
        "ID": 987654,
        "StableID": "nXyZ123CNTRL",
        "Name": f"peer-{ip.replace(':', '-').replace('.', '-')}.tailnet-name.ts.net.",
        "User": 12345,
        "Key": "nodekey:0000",
        "Machine": "mkey:0000",
        "DiscoKey": "discokey:0000",
        "Addresses": [f"{ip}/32" if ":" not in ip else f"{ip}/128"],
        "AllowedIPs": [f"{ip}/32" if ":" not in ip else f"{ip}/128"],
        "Hostinfo": {"OS": "iOS", "Hostname": "peer"},
        "Online": True,
        "MachineAuthorized": True,
        "ComputedName": "peer",
        "ComputedNameWithHost": "peer",
    }
    if tags:
        node["Tags"] = list(tags)
        login = "tagged-devices"
    return {
        "Node": node,
        "UserProfile": {
            "ID": 12345,
            "LoginName": login,
            "DisplayName": login.split("@")[0],
            "ProfilePicURL": "",
        },
        "CapMap": None,
    }


@dataclass
class FakeTailnet:
    """What the fake tailscaled knows, and how its certificate endpoint behaves."""

    ca: trustme.CA = field(default_factory=trustme.CA)
    status: dict[str, Any] = field(default_factory=status_json)
    whois: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: "ok", "denied" (403), "rate-limited" (429), "broken" (500 invalid domain)
    cert_mode: str = "ok"
    #: None: never configured (the real one answers `null`); {} after `tailscale serve reset`
    serve_config: dict[str, Any] | None = None
    requests: list[str] = field(default_factory=list)
    cert: trustme.LeafCert | None = None

    def __post_init__(self) -> None:
        if self.cert is None:
            self.cert = self.issue()

    def issue(self) -> trustme.LeafCert:
        return self.ca.issue_cert(DOMAIN, "127.0.0.1", "::1")

    #: userspace networking's ProxyMapper: "127.0.0.1:<port>" -> the tailnet peer's IP that
    #: netstack forwarded there (wgengine/netstack RegisterIPPortIdentity)
    forwarded: dict[str, str] = field(default_factory=dict)

    #: a peer every loopback connection not in ``forwarded`` comes from (userspace
    #: networking when one peer is all that calls; for clients whose port is not known)
    loopback_peer: str | None = None

    def add_peer(self, ip: str, login: str, *, tags: tuple[str, ...] = ()) -> None:
        self.whois[ip] = whois_json(ip, login, tags=tags)

    def forward(self, local_port: int, peer_ip: str) -> None:
        """A peer's connection forwarded to 127.0.0.1:<local_port> (userspace networking)."""
        self.forwarded[f"127.0.0.1:{local_port}"] = peer_ip

    @property
    def domain(self) -> str:
        return str(self.status["Self"]["DNSName"]).rstrip(".")

    def pair_pem(self) -> tuple[bytes, bytes]:
        assert self.cert is not None
        key = self.cert.private_key_pem.bytes()
        chain = b"".join(blob.bytes() for blob in self.cert.cert_chain_pems)
        return key, chain

    def to_file(self, path: Path) -> None:
        key, chain = self.pair_pem()
        whois = dict(self.whois)
        for local, peer in self.forwarded.items():
            if peer in self.whois:
                whois[local] = self.whois[peer]
        path.write_text(
            json.dumps(
                {
                    "status": self.status,
                    "whois": whois,
                    "cert_mode": self.cert_mode,
                    "key_pem": key.decode(),
                    "cert_pem": chain.decode(),
                }
            )
        )


def _go_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """Go's http.Error: text/plain, the message and a newline."""
    response = Response(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _addr_ip(addr: str) -> str | None:
    """The IP of ``ip`` or ``ip:port`` / ``[v6]:port`` (Go: ParseAddr, then ParseAddrPort)."""
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        pass
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def localapi_app(tailnet: FakeTailnet) -> Quart:
    app = Quart("fake_localapi")

    @app.before_request
    async def localapi_checks() -> Response | None:
        tailnet.requests.append(f"{request.method} {request.full_path.rstrip('?')}")
        host = request.headers.get("Host", "")
        if host not in ("", "local-tailscaled.sock"):
            return _go_error("invalid localapi request", 403)
        if request.headers.get("Referer") or request.headers.get("Origin"):
            return _go_error("invalid localapi request", 403)
        return None

    @app.get("/localapi/v0/status")
    async def status() -> Response:
        data = dict(tailnet.status)
        # the real one always has the key: null with peers=false (tailscaled v1.102.5)
        data["Peer"] = None if request.args.get("peers", "true") == "false" else {}
        return Response(json.dumps(data, indent="  "), content_type="application/json")

    @app.get("/localapi/v0/whois")
    async def whois() -> Response:
        addr = request.args.get("addr")
        if not addr:
            return _go_error("missing 'addr' parameter", 400)
        ip = _addr_ip(addr)
        if ip is None:
            return _go_error("invalid 'addr' parameter", 400)
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        # node addresses first (self included), then the ProxyMapper (LocalBackend.WhoIs)
        found = tailnet.whois.get(ip)
        if found is None and addr in tailnet.forwarded:
            found = tailnet.whois.get(tailnet.forwarded[addr])
        if found is None and tailnet.loopback_peer and ip == "127.0.0.1" and addr != ip:
            found = tailnet.whois.get(tailnet.loopback_peer)
        if found is None:
            return _go_error("no match for IP:port", 404)
        return Response(json.dumps(found, indent="\t"), content_type="application/json")

    @app.get("/localapi/v0/cert/<domain>")
    async def cert(domain: str) -> Response:
        kind = request.args.get("type", "")
        if kind not in ("", "crt", "cert", "key", "pair"):
            return _go_error('invalid type; want "cert" (default), "key", or "pair"', 400)
        if tailnet.cert_mode == "denied":
            return _go_error("cert access denied", 403)
        if tailnet.cert_mode == "rate-limited":
            return _go_error("rate limited", 429, {"Retry-After": "120"})
        domains = tailnet.status.get("CertDomains") or []
        if tailnet.cert_mode == "broken" or domain not in domains:
            return _go_error(f"invalid domain {domain!r}; must be one of {domains}", 500)
        key, chain = tailnet.pair_pem()
        body = {"key": key, "pair": key + chain}.get(kind, chain)
        return Response(body, content_type="text/plain")

    @app.get("/localapi/v0/serve-config")
    async def serve_config() -> Response:
        body = json.dumps(tailnet.serve_config)
        response = Response(body, content_type="application/json")
        response.headers["Etag"] = '"fake-etag"'
        return response

    return app


@asynccontextmanager
async def run_localapi(tailnet: FakeTailnet, socket_path: Path) -> AsyncIterator[Path]:
    """Serve the fake LocalAPI on ``unix:<socket_path>`` for the duration of the block."""
    config = Config()
    config.bind = [f"unix:{socket_path}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: hypercorn_serve(localapi_app(tailnet), config, shutdown_trigger=stop.wait)
        )
        with anyio.fail_after(10):
            while not await anyio.Path(socket_path).exists():
                await anyio.sleep(0.01)
        try:
            yield socket_path
        finally:
            stop.set()


class LocalAPIThread:
    """:func:`run_localapi` on its own event loop in a thread: ``start()``, ``stop()``."""

    def __init__(self, tailnet: FakeTailnet, socket_path: Path) -> None:
        self.tailnet = tailnet
        self.socket_path = socket_path
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="fake-localapi", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with run_localapi(self.tailnet, self.socket_path):
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    def start(self) -> LocalAPIThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fake LocalAPI did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


_CLI = r'''#!{python}
"""Fake `tailscale` CLI for tests.

Reads $FAKE_TAILSCALE_STATE, logs argv to $FAKE_TAILSCALE_LOG.
"""
import json, os, sys

state = json.load(open(os.environ["FAKE_TAILSCALE_STATE"]))
with open(os.environ["FAKE_TAILSCALE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args and args[0].startswith("--socket="):  # the CLI's global flag goes first
    args = args[1:]
cmd = args[0] if args else ""

def flag(name):
    if name in args:
        return args[args.index(name) + 1]
    return None

def write_if_changed(path, data, mode):
    try:
        if open(path).read() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return True

if cmd == "status":
    status = dict(state["status"])
    status["Peer"] = None if "--peers=false" in args else {{}}
    print(json.dumps(status, indent="  "))
elif cmd == "ip":
    ips = state["status"]["TailscaleIPs"]
    if "-4" in args:
        ips = [ip for ip in ips if ":" not in ip]
    elif "-6" in args:
        ips = [ip for ip in ips if ":" in ip]
    print("\n".join(ips))
elif cmd == "whois":
    addr = args[-1]
    if addr in state["whois"]:  # a forwarded 127.0.0.1:<port> (the ProxyMapper)
        print(json.dumps(state["whois"][addr], indent="\t"))
        sys.exit(0)
    if addr.startswith("["):
        ip = addr[1:addr.index("]")]
    elif addr.count(":") == 1:
        ip = addr.rsplit(":", 1)[0]
    else:
        ip = addr
    found = state["whois"].get(ip)
    if found is None:
        # client/local's ErrPeerNotFound, printed by cmd/tailscale (verified against v1.102.5)
        print("peer not found", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(found, indent="\t"))
elif cmd == "cert":
    domain = args[-1]
    domains = state["status"].get("CertDomains") or []
    if state["cert_mode"] == "denied":
        print("Access denied: cert access denied", file=sys.stderr)
        sys.exit(1)
    if domain not in domains:
        print(f"invalid domain {{domain!r}}; must be one of {{domains}}", file=sys.stderr)
        sys.exit(1)
    cert_file = flag("--cert-file") or domain + ".crt"
    key_file = flag("--key-file") or domain + ".key"
    if write_if_changed(cert_file, state["cert_pem"], 0o644):
        print(f"Wrote public cert to {{cert_file}}")
    else:
        print(f"Public cert unchanged at {{cert_file}}")
    if write_if_changed(key_file, state["key_pem"], 0o600):
        print(f"Wrote private key to {{key_file}}")
    else:
        print(f"Private key unchanged at {{key_file}}")
else:
    print(f"tailscale: unknown command {{cmd!r}}", file=sys.stderr)
    sys.exit(2)
'''


def install_fake_cli(bin_dir: Path, tailnet: FakeTailnet, monkeypatch: Any) -> Path:
    """Put a fake ``tailscale`` on PATH; returns the argv log file (one JSON list a line)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "tailscale"
    exe.write_text(_CLI.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    state_file = bin_dir / "state.json"
    tailnet.to_file(state_file)
    log_file = bin_dir / "argv.log"
    log_file.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_TAILSCALE_STATE", str(state_file))
    monkeypatch.setenv("FAKE_TAILSCALE_LOG", str(log_file))
    return log_file
