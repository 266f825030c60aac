"""Talking to tailscaled: the LocalAPI over its unix socket, and the ``tailscale`` CLI.

Three calls are all the daemon needs (see shared/tailscale.md §2-§4):

- ``status``: own MagicDNS name (``CertDomains[0]``, else ``Self.DNSName`` minus the dot),
  Tailscale IPs, backend state, TUN mode, whether HTTPS certificates are enabled;
- ``whois``: who is behind a peer ``ip:port`` (404 = not a tailnet node);
- ``cert_pair``: the Let's Encrypt key and certificate chain for the node's name.

:class:`LocalAPI` uses httpx over the unix socket; :class:`TailscaleCLI` runs the
``tailscale`` executable as a fallback (``status --json``, ``whois --json``,
``cert --cert-file --key-file``). Neither ever logs key material.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import anyio
import httpx

from flowengine.errors import TailscaleError
from flowengine.oauth_http import parse_retry_after

__all__ = [
    "CertPair",
    "LocalAPI",
    "TailscaleCLI",
    "TailscaleClient",
    "TailscaleError",
    "TailscaleStatus",
    "WhoIs",
    "split_pair",
]

log = logging.getLogger("api.tailscale")

_T = TypeVar("_T")

LOCALAPI_HOST = "local-tailscaled.sock"
TAGGED_LOGIN = "tagged-devices"
_CERT_MARK = "-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True, slots=True)
class TailscaleStatus:
    """The fields of ``ipnstate.Status`` the daemon uses."""

    backend_state: str
    dns_name: str  # Self.DNSName without the trailing dot ("" when unknown)
    cert_domains: tuple[str, ...]
    tailscale_ips: tuple[str, ...]
    tun: bool
    https_capable: bool
    self_tags: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def running(self) -> bool:
        return self.backend_state == "Running"

    @property
    def magicdns_name(self) -> str:
        """The name to build URLs from: ``CertDomains[0]``, else ``Self.DNSName``."""
        return self.cert_domains[0] if self.cert_domains else self.dns_name

    @property
    def ipv4(self) -> str | None:
        return next((ip for ip in self.tailscale_ips if ":" not in ip), None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TailscaleStatus:
        me = data.get("Self") or {}
        caps = set(me.get("Capabilities") or ()) | set((me.get("CapMap") or {}).keys())
        cert_domains = tuple(d.rstrip(".") for d in data.get("CertDomains") or () if d)
        return cls(
            backend_state=str(data.get("BackendState") or ""),
            dns_name=str(me.get("DNSName") or "").rstrip("."),
            cert_domains=cert_domains,
            tailscale_ips=tuple(data.get("TailscaleIPs") or me.get("TailscaleIPs") or ()),
            tun=bool(data.get("TUN", True)),
            https_capable="https" in caps and bool(cert_domains),
            self_tags=tuple(me.get("Tags") or ()),
            raw=data,
        )


@dataclass(frozen=True, slots=True)
class WhoIs:
    """The peer behind an address, from ``/localapi/v0/whois``."""

    login: str
    display_name: str
    node_name: str
    tags: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        """Tagged nodes have no user: Node.Tags set and the literal login "tagged-devices"."""
        return bool(self.tags) or self.login == TAGGED_LOGIN

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WhoIs:
        node = data.get("Node") or {}
        profile = data.get("UserProfile") or {}
        return cls(
            login=str(profile.get("LoginName") or ""),
            display_name=str(profile.get("DisplayName") or ""),
            node_name=str(node.get("Name") or "").rstrip("."),
            tags=tuple(node.get("Tags") or ()),
            addresses=tuple(node.get("Addresses") or ()),
        )


@dataclass(frozen=True, slots=True)
class CertPair:
    """A PEM key and certificate chain. ``repr`` hides the key."""

    key_pem: bytes = field(repr=False)
    cert_pem: bytes


def split_pair(body: bytes) -> CertPair:
    """Split a ``?type=pair`` body (key PEM first, then certificates) into its two parts."""
    text = body.decode("ascii", errors="strict")
    at = text.find(_CERT_MARK)
    if at <= 0 or "PRIVATE KEY-----" not in text[:at]:
        raise TailscaleError("tailscaled sent a certificate pair in an unexpected format")
    return CertPair(key_pem=text[:at].encode("ascii"), cert_pem=text[at:].encode("ascii"))


class TailscaleClient(Protocol):
    """What the daemon asks tailscaled; LocalAPI and TailscaleCLI both provide it."""

    async def status(self) -> TailscaleStatus: ...

    async def whois(self, addr: str) -> WhoIs | None: ...

    async def cert_pair(self, domain: str) -> CertPair: ...


class LocalAPI:
    """Async client of tailscaled's LocalAPI on its unix socket."""

    def __init__(
        self,
        socket_path: str | Path = "/var/run/tailscale/tailscaled.sock",
        *,
        timeout: float = 60.0,
        whois_timeout: float = 10.0,
        cert_timeout: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``cert_timeout``: tailscaled runs the first ACME order in the request's context
        (dns-01 can take tens of seconds; a client that gives up cancels the order), so the
        certificate call waits much longer than the others; ``whois_timeout`` bounds the
        guard's per-request lookups."""
        self.socket_path = str(socket_path)
        self.whois_timeout = whois_timeout
        self.cert_timeout = max(cert_timeout, 180.0)
        self._http = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=self.socket_path),
            base_url=f"http://{LOCALAPI_HOST}",
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> LocalAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _get(
        self, path: str, params: dict[str, str] | None = None, *, timeout: float | None = None
    ) -> httpx.Response:
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=5.0)
        try:
            return await self._http.get(f"/localapi/v0/{path}", params=params, **extra)
        except httpx.TimeoutException as err:
            raise TailscaleError(
                f"tailscaled's LocalAPI did not answer {path.split('/')[0]} in time"
            ) from err
        except httpx.HTTPError as err:
            raise TailscaleError(
                f"tailscaled's LocalAPI at {self.socket_path} could not be reached"
                f" ({type(err).__name__})"
            ) from err

    @staticmethod
    def _fail(what: str, response: httpx.Response) -> TailscaleError:
        # Go's http.Error: a short text/plain message; it never holds key material
        message = response.text.strip()[:200]
        return TailscaleError(
            f"tailscaled refused {what}: HTTP {response.status_code} {message}",
            local_api_status=response.status_code,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )

    @classmethod
    def _parsed(
        cls, response: httpx.Response, parse: Callable[[Any], _T], what: str, answer: str
    ) -> _T:
        """``parse`` of a 200 answer's JSON; another status (``what`` was refused) or an
        ``answer`` that is no JSON (or not what ``parse`` takes) is a TailscaleError."""
        if response.status_code != 200:
            raise cls._fail(what, response)
        try:
            return parse(response.json())
        except ValueError as err:
            raise TailscaleError(f"tailscaled sent {answer} that is not JSON") from err

    async def status(self) -> TailscaleStatus:
        response = await self._get("status", {"peers": "false"})
        return self._parsed(response, TailscaleStatus.from_json, "status", "a status")

    async def whois(self, addr: str) -> WhoIs | None:
        """The peer at ``ip[:port]``, or None when it is not a tailnet node (404)."""
        response = await self._get("whois", {"addr": addr}, timeout=self.whois_timeout)
        if response.status_code == 404:
            return None
        return self._parsed(response, WhoIs.from_json, "whois", "a whois answer")

    async def cert_pair(self, domain: str) -> CertPair:
        response = await self._get(
            f"cert/{quote(domain, safe='')}", {"type": "pair"}, timeout=self.cert_timeout
        )
        if response.status_code != 200:
            raise self._fail(f"the certificate for {domain}", response)
        return split_pair(response.content)

    async def serve_config(self) -> dict[str, Any]:
        response = await self._get("serve-config")
        data = self._parsed(response, lambda x: x, "serve-config", "a serve config")
        return data if isinstance(data, dict) else {}


class TailscaleCLI:
    """The same questions through the ``tailscale`` executable (no LocalAPI socket access).

    ``socket``: tailscaled's socket when it is not the CLI's default (``--socket=``).
    """

    #: what ``tailscale whois`` prints when the address is no node: client/local's
    #: ErrPeerNotFound (the LocalAPI's 404 body, "no match for IP:port", never reaches stderr)
    NOT_FOUND = ("peer not found", "no match for IP:port")

    def __init__(
        self,
        executable: str = "tailscale",
        *,
        socket: str | Path | None = None,
        timeout: float = 90.0,
        whois_timeout: float = 10.0,
    ) -> None:
        self.executable = executable
        self.socket = str(socket) if socket else None
        self.timeout = timeout
        self.whois_timeout = whois_timeout

    def _exe(self) -> list[str]:
        found = shutil.which(self.executable)
        if found is None:
            raise TailscaleError(f"the {self.executable!r} command is not on PATH")
        return [found, f"--socket={self.socket}"] if self.socket else [found]

    async def _call(self, *args: str, timeout: float) -> Any:
        exe = self._exe()
        try:
            with anyio.fail_after(timeout):
                return await anyio.run_process([*exe, *args], check=False)
        except TimeoutError as err:
            raise TailscaleError(f"`tailscale {args[0]}` timed out after {timeout:g} s") from err

    async def _run(self, *args: str) -> bytes:
        proc = await self._call(*args, timeout=self.timeout)
        if proc.returncode != 0:
            message = proc.stderr.decode("utf-8", errors="replace").strip()[:300]
            raise TailscaleError(f"`tailscale {args[0]}` failed ({proc.returncode}): {message}")
        return bytes(proc.stdout)

    async def status(self) -> TailscaleStatus:
        out = await self._run("status", "--json", "--peers=false")
        try:
            return TailscaleStatus.from_json(json.loads(out))
        except ValueError as err:
            raise TailscaleError("`tailscale status --json` did not print JSON") from err

    async def whois(self, addr: str) -> WhoIs | None:
        """The peer at ``ip[:port]``, or None when it is no tailnet node."""
        proc = await self._call("whois", "--json", addr, timeout=self.whois_timeout)
        if proc.returncode != 0:
            text = proc.stderr.decode("utf-8", errors="replace").strip()
            if any(marker in text for marker in self.NOT_FOUND):
                return None
            raise TailscaleError(f"`tailscale whois` failed ({proc.returncode}): {text[:300]}")
        try:
            return WhoIs.from_json(json.loads(proc.stdout))
        except ValueError as err:
            raise TailscaleError("`tailscale whois --json` did not print JSON") from err

    async def cert_files(self, domain: str, cert_file: Path, key_file: Path) -> None:
        """Run ``tailscale cert --cert-file --key-file <domain>`` (atomic, only if changed)."""
        await self._run("cert", "--cert-file", str(cert_file), "--key-file", str(key_file), domain)

    async def cert_pair(self, domain: str) -> CertPair:
        async with anyio.TemporaryDirectory() as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            await self.cert_files(domain, cert_file, key_file)
            return CertPair(key_pem=key_file.read_bytes(), cert_pem=cert_file.read_bytes())
