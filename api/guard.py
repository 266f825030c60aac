"""Who may talk to the daemon: tailnet and loopback sources only, never Funnel.

:class:`TailnetGuard` is ASGI middleware in front of the Quart app. For every HTTP request:

0. A request on the local listener (the state dir's unix socket; the serving loop admitted
   only our own uid or root, by ``SO_PEERCRED``) is a same-host client: let in as such.
1. A malformed ``Host`` header is answered 400 (before Quart would fail on it), and a
   request carrying ``Tailscale-Funnel-Request`` 403: Funnel traffic is public internet
   traffic.
2. The peer (``scope["client"]``) must be loopback, in ``100.64.0.0/10`` but not the ChromeOS
   range ``100.115.92.0/23``, or in ``fd7a:115c:a1e0::/48``; anything else gets 403. In
   ``serve`` mode the peer is ``tailscale serve`` on loopback and the real client is the single
   ``X-Forwarded-For`` value serve sets, which must be a tailnet address too.
3. Optional owner check (``allowed_logins`` set):

   - ``tls`` mode: LocalAPI whois of the peer ``ip:port``. The daemon's own node (its own
     Tailscale address) is the local host, before any tagged check. Not a node (404) -> 403,
     except a loopback peer in kernel-TUN mode (a local process; under userspace networking
     a subnet-routed source looks the same, so it is refused there). A tagged node -> 403,
     a login not allowed -> 403. whois failing otherwise fails closed (403).
   - ``serve`` mode: every loopback TCP peer is first looked up with whois ``ip:port``. A
     hit can only be a tailnet peer that tailscaled's userspace networking forwarded
     straight to the backend port (serve's own proxy never registers there), so it is
     judged like a tls-mode caller and its forwarded headers are ignored. Otherwise the
     peer is ``tailscale serve``: ``Tailscale-User-Login`` (RFC 2047 Q-decoded) must name
     an allowed user; missing (tagged node, unknown source) -> 403. A loopback request
     without ``X-Forwarded-For`` is a local process: allowed in kernel-TUN mode only. A
     ``unix:`` backend cannot be reached by peers at all, so its headers are trusted.

4. Paths that hand out tokens (``identify_prefixes``: ``/v1/tokens/``) are judged by the
   ``[[access]]`` policy, not by ``allowed_logins``: the guard only names the caller there,
   always with whois (tls mode: the TCP peer ``ip:port``; serve mode: a loopback peer
   userspace networking forwarded, else, on a ``unix:`` backend only, the single
   ``X-Forwarded-For`` address ``tailscale serve`` set). Behind serve on a loopback *port*
   the forwarded address is refused there: any local process could claim to be anyone.
   A caller whois cannot name gets an identity without a login or tags (a local process)
   or 403 (not a node); whois failing answers 503 with ``Retry-After``.

whois answers about a connection's own peer are kept for the connection (at most
``WHOIS_CACHE_SECONDS``): a keep-alive caller is looked up once, not per request. The
connection's peer cannot change, and tags or users that change are seen on its next
connection or a minute later.

Every response leaving the app (error pages included, whoever made them) carries the
security headers. A request that passed is reported to the connection limiter (its
connection is no longer idle), and its identity put in ``scope["agentd.identity"]``.
"""

from __future__ import annotations

import email.errors
import email.header
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from flowengine.errors import RequestError, TailscaleError

from .tailscale import WhoIs

__all__ = [
    "Identity",
    "TailnetGuard",
    "decode_login",
    "host_header_ok",
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

#: how long a connection keeps the whois answer about its own peer
WHOIS_CACHE_SECONDS = 60.0
#: Retry-After of a 503 when tailscaled could not be asked
WHOIS_RETRY_AFTER = 5

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
    via: str = "direct"  # direct | serve | whois | loopback | own-node | local
    #: the device's tags (a tagged device has no user) and its MagicDNS name, when whois
    #: named it (token hand-outs)
    tags: tuple[str, ...] = ()
    node: str = ""

    @property
    def named(self) -> bool:
        """Whether whois named a tailnet node (a login or tags) for this caller."""
        return self.via in ("whois", "own-node") and bool(self.tags or self.login)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def host_header_ok(value: str) -> bool:
    """RFC 9110 ``Host``: a DNS name (labels <= 63, total <= 253), IPv4 or ``[IPv6]``,
    optionally ``:port``. Anything else would make Quart fail, so it is refused first."""
    host, port = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return False
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return False
        port = rest[1:] if rest else ""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
    else:
        if value.count(":") > 1:
            return False
        host, _, port = value.partition(":")
        if ":" in value and not port:
            return False
        name = host[:-1] if host.endswith(".") else host
        if not name or len(name) > 253:
            return False
        if not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
            return False
    return not port or (port.isdigit() and len(port) <= 5 and int(port) <= 65535)


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


class _Refused(RequestError):
    """The guard refuses a request; the message is safe to show (it holds no input)."""

    code = "refused"
    #: the status we answer with
    answer_status: int = 403
    retry_after: int | None = None


def _with_security_headers(send: Send) -> Send:
    """``send`` that adds the security headers to every response that lacks them."""

    async def wrapped(message: Message) -> None:
        if message.get("type") == "http.response.start":
            headers = list(message.get("headers") or ())
            present = {bytes(name).lower() for name, _ in headers}
            headers += [(n, v) for n, v in SECURITY_HEADERS if n not in present]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


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
        own_addresses: Iterable[str] = (),
        userspace: bool = False,
        identify_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.mode = mode
        self.allowed_logins = frozenset(allowed_logins)
        self.whois = whois
        self.html_paths = html_paths
        #: the daemon's own Tailscale addresses: whois naming them is the local host
        self.own_addresses = frozenset(own_addresses)
        #: tailscaled in userspace-networking mode: loopback peers may be tailnet peers
        self.userspace = userspace
        #: paths whose callers are always named by whois and judged by the app (tokens)
        self.identify_prefixes = identify_prefixes
        if self.allowed_logins and mode in ("tls", "serve") and whois is None:
            raise ValueError(f"the owner check in {mode} mode needs a whois function")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        try:
            identity = await self.check(scope)
        except _Refused as refused:
            client = scope.get("client")
            log.warning(
                "refused %s from %s: %s",
                loggable_path(str(scope.get("path", "?"))),
                client[0] if client else "unix",
                refused.message,
            )
            await self._refuse(
                scope, send, refused.message, refused.answer_status, refused.retry_after
            )
            return
        scope["agentd.identity"] = identity
        activate = scope.get("agentd.activate")
        if activate is not None:
            activate()
        await self.app(scope, receive, send)

    async def check(self, scope: Scope) -> Identity:
        """The caller's identity, or _Refused with a reason that is safe to show."""
        if scope.get("agentd.listener") == "local":
            uid = scope.get("agentd.peer_uid")
            return Identity(address=f"uid:{uid}" if uid is not None else "unix", via="local")
        hosts = _header(scope, b"host")
        if len(hosts) > 1 or (hosts and not host_header_ok(hosts[0])):
            raise _Refused("the Host header is not valid", answer_status=400)
        if _header(scope, b"tailscale-funnel-request"):
            raise _Refused("requests through Tailscale Funnel are not accepted")
        client = scope.get("client")
        identify = self._identifies(scope)
        if client is None and identify:
            return await self._identify_unix_backend(scope)
        if client is None:
            # a unix-socket backend: only tailscaled (`tailscale serve ... unix:<path>`) and
            # local processes reach it, never a tailnet peer directly
            if self.mode == "serve":
                identity = self._check_serve(scope, _LOOPBACK, local_ok=True)
                return identity if identity.via == "serve" else Identity("unix", via="loopback")
            return Identity(address="unix", via="loopback")
        ip = parse_ip(str(client[0]))
        if not source_allowed(ip):
            raise _Refused("only devices on this tailnet may connect")
        assert ip is not None
        port = int(client[1] or 0)
        if identify:
            return await self._identify(scope, ip, port)
        if self.mode == "serve":
            if is_loopback(ip) and self.allowed_logins:
                # userspace networking forwards tailnet peers to 127.0.0.1:<port> too
                who = await self._whois(ip, port, scope)
                if who is not None:
                    return self._judge(who, ip)
            return self._check_serve(scope, ip, local_ok=not self.userspace)
        if self.mode == "tls" and self.allowed_logins:
            return await self._check_whois(ip, port, scope)
        return Identity(address=str(ip), via="loopback" if is_loopback(ip) else "direct")

    def _check_serve(self, scope: Scope, peer: IPAddress, *, local_ok: bool) -> Identity:
        forwarded = _header(scope, b"x-forwarded-for")
        if not is_loopback(peer):
            # behind serve only loopback peers are expected; identity headers are not trusted
            if self.allowed_logins:
                raise _Refused("identity headers are only trusted from tailscale serve")
            return Identity(address=str(peer))
        if not forwarded:
            if self.allowed_logins and not local_ok:
                raise _Refused(
                    "the caller could not be identified (same-host clients use the daemon's"
                    " unix socket)"
                )
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

    def _identifies(self, scope: Scope) -> bool:
        path = str(scope.get("path", ""))
        return any(path.startswith(prefix) for prefix in self.identify_prefixes)

    async def _whois(
        self, ip: IPAddress, port: int | None, scope: Scope | None = None, *, status: int = 403
    ) -> WhoIs | None:
        """whois ``ip:port`` (``ip`` alone when ``port`` is None). With ``scope`` the
        answer is about the connection's own peer and kept on the connection for a while."""
        if self.whois is None:
            raise _Refused(
                "the caller could not be identified (tailscaled is not reachable)",
                answer_status=status,
                retry_after=WHOIS_RETRY_AFTER if status == 503 else None,
            )
        if port is None:
            addr = str(ip)
        else:
            addr = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        cache = scope.get("agentd.whois_cache") if scope is not None else None
        if cache is not None:
            hit = cache.get(addr)
            if hit is not None and time.monotonic() - hit[0] < WHOIS_CACHE_SECONDS:
                return hit[1]  # type: ignore[no-any-return]
        try:
            who = await self.whois(addr)
        except TailscaleError as err:
            log.warning("whois failed: %s", err.message)
            raise _Refused(
                "the caller could not be identified",
                answer_status=status,
                retry_after=WHOIS_RETRY_AFTER if status == 503 else None,
            ) from err
        if cache is not None:
            cache[addr] = (time.monotonic(), who)
        return who

    def _named(self, who: WhoIs, ip: IPAddress) -> Identity:
        """A caller whois named, for the app to judge (no allowed_logins check)."""
        own = [address.split("/", 1)[0] for address in who.addresses]
        # a peer userspace networking forwarded arrives from loopback: name its node's address
        address = str(ip) if is_tailnet_address(ip) or not own else own[0]
        return Identity(
            address=address,
            login=who.login or None,
            via="own-node" if set(own) & self.own_addresses else "whois",
            tags=who.tags,
            node=who.node_name,
        )

    async def _identify(self, scope: Scope, ip: IPAddress, port: int) -> Identity:
        """The caller of a token path, named by whois (see the module docstring, 4.)."""
        who = await self._whois(ip, port, scope, status=503)
        if who is not None:
            return self._named(who, ip)
        if self.mode == "serve" and is_loopback(ip) and _header(scope, b"x-forwarded-for"):
            raise _Refused(
                "token hand-outs behind `tailscale serve` need its unix: backend"
                ' (server.host = "unix:/path"); on a loopback port any local process could'
                " claim a tailnet identity"
            )
        if is_loopback(ip):
            return Identity(address=str(ip), via="loopback")  # no tailnet identity
        raise _Refused("the caller is not a tailnet node")

    async def _identify_unix_backend(self, scope: Scope) -> Identity:
        """A token path on a ``unix:`` backend: only tailscaled (serve) and local processes
        of the daemon's uid or root reach it; serve's X-Forwarded-For names the peer."""
        forwarded = _header(scope, b"x-forwarded-for")
        if self.mode != "serve" or not forwarded:
            return Identity(address="unix", via="loopback")  # no tailnet identity
        if len(forwarded) > 1 or "," in forwarded[0]:
            raise _Refused("unexpected X-Forwarded-For chain")
        origin = parse_ip(forwarded[0])
        if origin is None or not is_tailnet_address(origin):
            raise _Refused("only devices on this tailnet may connect")
        who = await self._whois(origin, None, status=503)
        if who is None:
            raise _Refused("the caller is not a tailnet node")
        return self._named(who, origin)

    def _judge(self, who: WhoIs, ip: IPAddress) -> Identity:
        """A tailnet node named by whois: own node, tagged, allowed login?"""
        own = {address.split("/", 1)[0] for address in who.addresses}
        if own & self.own_addresses:
            # the daemon's own node (e.g. a same-host client over the 100.x address): it
            # may well be tagged, yet it is this machine
            return Identity(address=str(ip), login=who.login or None, via="own-node")
        if who.tagged:
            raise _Refused("tagged devices are not allowed here")
        if who.login not in self.allowed_logins:
            raise _Refused("this tailnet user is not allowed here")
        return Identity(address=str(ip), login=who.login, via="whois")

    async def _check_whois(self, ip: IPAddress, port: int, scope: Scope) -> Identity:
        who = await self._whois(ip, port, scope)
        if who is None:
            if is_loopback(ip) and not self.userspace:
                return Identity(address=str(ip), via="loopback")
            if is_loopback(ip):
                raise _Refused(
                    "the caller could not be identified (same-host clients use the daemon's"
                    " unix socket)"
                )
            raise _Refused("the caller is not a tailnet node")
        return self._judge(who, ip)

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        reason: str,
        status: int = 403,
        retry_after: int | None = None,
    ) -> None:
        path = str(scope.get("path", ""))
        title, code = {
            400: ("Bad request", "bad_request"),
            503: ("Unavailable", "unavailable"),
        }.get(status, ("Not allowed", "forbidden"))
        if path in self.html_paths:
            from html import escape

            body = (
                "<!doctype html><html lang=en><head><meta charset=utf-8>"
                f"<title>{title}</title></head><body><h1>{title}</h1>"
                f"<p>{escape(reason)}</p></body></html>"
            ).encode()
            ctype = b"text/html; charset=utf-8"
        else:
            body = json.dumps({"error": code, "message": reason}).encode()
            ctype = b"application/json"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                    *SECURITY_HEADERS,
                    *([(b"retry-after", str(retry_after).encode())] if retry_after else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
