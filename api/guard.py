"""Who may talk to the daemon: tailnet and loopback sources only, never Funnel.

:class:`TailnetGuard` is ASGI middleware in front of the Quart app. For every HTTP request:

1. A request carrying ``Tailscale-Funnel-Request`` is refused (403): Funnel traffic is
   public internet traffic.
2. The peer (``scope["client"]``) must be loopback, in ``100.64.0.0/10`` but not the ChromeOS
   range ``100.115.92.0/23``, or in ``fd7a:115c:a1e0::/48``; anything else gets 403. In
   ``serve`` mode the peer is ``tailscale serve`` on loopback and the real client is the single
   ``X-Forwarded-For`` value serve sets, which must be a tailnet address too.
3. Optional owner check (``allowed_logins`` set):

   - ``tls`` mode: LocalAPI whois of the peer ``ip:port``; not a node (404) -> 403 unless the
     peer is loopback (the daemon's own host), tagged node -> 403, login not allowed -> 403.
     whois failing for another reason fails closed (403).
   - ``serve`` mode: ``Tailscale-User-Login`` (RFC 2047 Q-decoded), trusted only when the
     peer is loopback; missing for a proxied request (tagged node, unknown source) -> 403.
     A direct loopback request (no ``X-Forwarded-For``) is the daemon's own host: allowed.

The identity found is put in ``scope["agentd.identity"]`` for handlers and logs.
"""

from __future__ import annotations

import email.errors
import email.header
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .tailscale import TailscaleError, WhoIs

__all__ = [
    "Identity",
    "TailnetGuard",
    "decode_login",
    "is_loopback",
    "is_tailnet_address",
    "loggable_path",
    "parse_ip",
    "source_allowed",
]

log = logging.getLogger("api.guard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WhoisFn = Callable[[str], Awaitable[WhoIs | None]]

TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
CHROMEOS_V4 = ipaddress.ip_network("100.115.92.0/23")
TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none';"
        b" form-action 'none'; frame-ancestors 'none'",
    ),
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the guard let in: the source address and, when known, the tailnet login."""

    address: str
    login: str | None = None
    via: str = "direct"  # direct | serve | whois | loopback


def loggable_path(path: str) -> str:
    """A request path safe for logs: the OAuth state in /oauth/pending/<state> is cut off."""
    if path.startswith("/oauth/pending/"):
        return "/oauth/pending/…"
    return path[:200]


def parse_ip(host: str | None) -> IPAddress | None:
    """An IP from a scope client host; IPv4-mapped IPv6 becomes IPv4; None if not an IP."""
    if not host:
        return None
    text = host.strip().strip("[]")
    if "%" in text:  # zone index of a link-local address
        text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(ip: IPAddress) -> bool:
    return ip.is_loopback


def is_tailnet_address(ip: IPAddress) -> bool:
    """In Tailscale's ranges (CGNAT minus ChromeOS, or the ULA /48)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in TAILNET_V4 and ip not in CHROMEOS_V4
    return ip in TAILNET_V6


def source_allowed(ip: IPAddress | None) -> bool:
    return ip is not None and (is_loopback(ip) or is_tailnet_address(ip))


def decode_login(value: str) -> str:
    """``Tailscale-User-Login`` is RFC 2047 Q-encoded when it is not ASCII (since v1.64)."""
    if "=?" not in value:
        return value
    try:
        parts = email.header.decode_header(value)
    except (ValueError, email.errors.HeaderParseError):
        return ""
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            try:
                out.append(chunk.decode(charset or "ascii"))
            except (LookupError, UnicodeDecodeError):
                return ""
        else:
            out.append(chunk)
    return "".join(out)


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _header(scope: Scope, name: bytes) -> list[str]:
    return [
        value.decode("latin-1") for key, value in scope.get("headers") or () if key.lower() == name
    ]


class TailnetGuard:
    """ASGI middleware: tailnet/loopback sources only, no Funnel, optional owner check."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        mode: str,
        allowed_logins: Iterable[str] = (),
        whois: WhoisFn | None = None,
        html_paths: tuple[str, ...] = ("/oauth/callback",),
    ) -> None:
        self.app = app
        self.mode = mode
        self.allowed_logins = frozenset(allowed_logins)
        self.whois = whois
        self.html_paths = html_paths
        if self.allowed_logins and mode == "tls" and whois is None:
            raise ValueError("the owner check in tls mode needs a whois function")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            identity = await self.check(scope)
        except _Refused as refused:
            client = scope.get("client")
            log.warning(
                "refused %s from %s: %s",
                loggable_path(str(scope.get("path", "?"))),
                client[0] if client else "unix",
                refused.reason,
            )
            await self._refuse(scope, send, refused.reason)
            return
        scope["agentd.identity"] = identity
        await self.app(scope, receive, send)

    async def check(self, scope: Scope) -> Identity:
        """The caller's identity, or _Refused with a reason that is safe to show."""
        if _header(scope, b"tailscale-funnel-request"):
            raise _Refused("requests through Tailscale Funnel are not accepted")
        client = scope.get("client")
        if client is None:
            # a unix-socket listener: whoever can open the socket is on this host, and
            # `tailscale serve` may proxy to it (serve mode checks its headers as for loopback)
            if self.mode == "serve":
                identity = self._check_serve(scope, _LOOPBACK)
                return identity if identity.via == "serve" else Identity("unix", via="loopback")
            return Identity(address="unix", via="loopback")
        ip = parse_ip(str(client[0]))
        if not source_allowed(ip):
            raise _Refused("only devices on this tailnet may connect")
        assert ip is not None
        if self.mode == "serve":
            return self._check_serve(scope, ip)
        if self.mode == "tls" and self.allowed_logins:
            return await self._check_whois(ip, int(client[1] or 0))
        return Identity(address=str(ip), via="loopback" if is_loopback(ip) else "direct")

    def _check_serve(self, scope: Scope, peer: IPAddress) -> Identity:
        forwarded = _header(scope, b"x-forwarded-for")
        if not is_loopback(peer):
            # behind serve only loopback peers are expected; identity headers are not trusted
            if self.allowed_logins:
                raise _Refused("identity headers are only trusted from tailscale serve")
            return Identity(address=str(peer))
        if not forwarded:
            return Identity(address=str(peer), via="loopback")
        if len(forwarded) > 1 or "," in forwarded[0]:
            raise _Refused("unexpected X-Forwarded-For chain")
        origin = parse_ip(forwarded[0])
        if origin is None or not is_tailnet_address(origin):
            raise _Refused("only devices on this tailnet may connect")
        logins = _header(scope, b"tailscale-user-login")
        login = decode_login(logins[0]).strip() if len(logins) == 1 else ""
        if self.allowed_logins:
            if not login:
                raise _Refused("the device has no tailnet user (tagged or unknown)")
            if login not in self.allowed_logins:
                raise _Refused("this tailnet user is not allowed here")
        return Identity(address=str(origin), login=login or None, via="serve")

    async def _check_whois(self, ip: IPAddress, port: int) -> Identity:
        assert self.whois is not None
        addr = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        try:
            who = await self.whois(addr)
        except TailscaleError as err:
            log.warning("whois failed: %s", err.message)
            raise _Refused("the caller could not be identified") from err
        if who is None:
            if is_loopback(ip):
                return Identity(address=str(ip), via="loopback")
            raise _Refused("the caller is not a tailnet node")
        if who.tagged:
            raise _Refused("tagged devices are not allowed here")
        if who.login not in self.allowed_logins:
            raise _Refused("this tailnet user is not allowed here")
        return Identity(address=str(ip), login=who.login, via="whois")

    async def _refuse(self, scope: Scope, send: Send, reason: str) -> None:
        path = str(scope.get("path", ""))
        if path in self.html_paths:
            from html import escape

            body = (
                "<!doctype html><html lang=en><head><meta charset=utf-8>"
                "<title>Not allowed</title></head><body><h1>Not allowed</h1>"
                f"<p>{escape(reason)}</p></body></html>"
            ).encode()
            ctype = b"text/html; charset=utf-8"
        else:
            body = json.dumps({"error": "forbidden", "message": reason}).encode()
            ctype = b"application/json"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                    *SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
