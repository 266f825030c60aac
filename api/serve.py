"""Serving the API with Hypercorn in-process (the only module that imports hypercorn).

:func:`plan_serving` decides and validates where to listen and which redirect URI the
daemon answers to; :func:`serve` runs Hypercorn with that plan inside the caller's anyio
task group until ``shutdown_trigger`` returns::

    async with anyio.create_task_group() as tg:
        plan = await tg.start(partial(serve, app, settings, shutdown_trigger=stop.wait,
                                      tailscale=localapi))

``task_status.started(plan)`` fires once the listening sockets are bound (``plan.port``
is the real port, also when 0 was asked for).

Modes: ``tls`` binds every Tailscale IP (loopback in userspace-networking mode) with the
node's own certificate in an SSLContext we keep and reload; ``serve`` binds loopback or a
unix socket, plain HTTP, behind ``tailscale serve --https=<public port> <backend>``;
``plain-test`` is loopback plain HTTP for tests and the demo. With
``settings.local_socket`` the same app also listens on that unix socket for same-host
clients (``agentd connect``): mode 0600, and a peer whose uid (``SO_PEERCRED``) is neither
ours nor root is closed before it is read.

Connections are accepted by our own loop around Hypercorn's per-connection server (the
same pieces Hypercorn's ``worker_serve`` uses), so every connection passes the
:class:`~api.limits.ConnectionLimiter` before its TLS handshake; TLS is started on the
accepted stream with a handshake timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus
from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.statsd import StatsdLogger
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.typing import AppWrapper
from hypercorn.utils import wrap_app

from flowengine.errors import ConfigError

from .guard import is_tailnet_address, parse_ip
from .limits import (
    AcceptErrorLog,
    Caps,
    Conn,
    ConnectionLimiter,
    default_caps,
    peer_uid,
    raise_nofile_limit,
)
from .settings import ApiSettings
from .tailscale import TailscaleClient, TailscaleError, TailscaleStatus
from .tls import CertManager, TailscaleCertSource

__all__ = [
    "Listener",
    "OwnContextConfig",
    "ServePlan",
    "build_config",
    "check_serve_config",
    "plan_serving",
    "redirect_uri_for",
    "serve",
    "validate_bind",
]

log = logging.getLogger("api.serve")

_WILDCARDS = {"", "0.0.0.0", "::", "*", "[::]"}


class OwnContextConfig(Config):
    """Hypercorn Config whose SSL context is one we own and reload in place."""

    own_ssl_context: ssl.SSLContext | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        if self.own_ssl_context is not None:
            return self.own_ssl_context
        return super().create_ssl_context()


@dataclass(frozen=True, slots=True)
class ServePlan:
    """Where and how the daemon listens, and the redirect URI it answers to."""

    mode: str
    host: str
    port: int
    redirect_uri: str
    public_name: str
    warnings: tuple[str, ...] = ()
    #: further addresses on the same port (tls mode: every Tailscale IP, v4 and v6)
    extra_hosts: tuple[str, ...] = ()
    #: the unix socket same-host clients use (``agentd connect``), if any
    local_socket: str = ""
    #: the daemon's own Tailscale addresses and whether tailscaled runs in userspace
    own_addresses: tuple[str, ...] = field(default=(), compare=False)
    userspace: bool = field(default=False, compare=False)

    @property
    def bind(self) -> str:
        return self._bind(self.host)

    @property
    def binds(self) -> tuple[str, ...]:
        return tuple(self._bind(host) for host in (self.host, *self.extra_hosts))

    def _bind(self, host: str) -> str:
        if host.startswith("unix:"):
            return host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("unix:")

    @property
    def base_url(self) -> str:
        """Where a local client reaches the API (for a unix socket: use httpx ``uds=``)."""
        scheme = "https" if self.mode == "tls" else "http"
        return "http://localhost" if self.is_unix else f"{scheme}://{self.bind}"


def validate_bind(host: str, *, mode: str, allow_public: bool) -> list[str]:
    """Refuse a wildcard or public bind address unless ``allow_public``; return warnings.

    tls: loopback or a Tailscale address. serve / plain-test: loopback only (plain HTTP).
    """
    text = host.strip()
    if text.startswith("unix:"):
        if mode == "tls":
            raise ConfigError(
                "tls mode listens on the Tailscale address, not a unix socket",
                key="server.host",
                hint='use mode = "serve" with `tailscale serve ... unix:<path>`',
            )
        return []
    ip = parse_ip(text)
    if text.lower() == "localhost":
        return []
    if text in _WILDCARDS or (ip is not None and ip.is_unspecified):
        what = f"the wildcard address {text or '(empty)'!r} listens on every interface"
    elif ip is None:
        what = f"{text!r} is a host name, not an address this daemon can vouch for"
    elif ip.is_loopback:
        return []
    elif mode == "tls" and is_tailnet_address(ip):
        return []
    elif mode == "tls":
        what = f"{text} is not a Tailscale address"
    else:
        what = f"{text} is not loopback, but {mode} mode speaks plain HTTP"
    if not allow_public:
        raise ConfigError(
            f"refusing to listen on {text or '(empty)'}: {what}",
            key="server.host",
            hint="leave server.host empty, or set server.allow_public_bind = true if you mean it",
        )
    warning = f"listening on {text or '(empty)'} although {what} (allow_public_bind is set)"
    return [warning]


def merged_serve_config(serve_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``TCP``, ``Web`` and ``AllowFunnel`` of the top level and of every foreground session.

    ``tailscale serve``/``funnel`` without ``--bg`` live in ``Foreground[<session>]`` for as
    long as the CLI runs, and tailscaled honours them first (``ipn/serve.go`` ``FindTCP``).
    """
    merged: dict[str, dict[str, Any]] = {"TCP": {}, "Web": {}, "AllowFunnel": {}}
    sessions = [serve_config, *((serve_config.get("Foreground") or {}).values())]
    for config in sessions:
        if not isinstance(config, dict):
            continue
        for key in merged:
            merged[key].update(config.get(key) or {})
    return merged


def check_serve_config(
    serve_config: dict[str, Any],
    *,
    mode: str,
    name: str,
    public_port: int,
    backend: str = "",
) -> list[str]:
    """Startup self-check against ``tailscale serve status --json`` (LocalAPI serve-config).

    Refuses when Funnel is on for our host:port (public internet) or, in tls mode, when
    serve claims our port (it would intercept tailnet traffic before Hypercorn). In serve
    mode, warns when no serve handler exists for our host:port yet, or when it proxies
    somewhere else than ``backend``. Foreground sessions count as much as ``--bg`` ones.
    """
    key = f"{name}:{public_port}"
    merged = merged_serve_config(serve_config)
    if merged["AllowFunnel"].get(key):
        raise ConfigError(
            f"Tailscale Funnel is enabled for {key}: the daemon would be on the public internet",
            key="server.mode",
            hint=f"run `tailscale funnel --https={public_port} off`",
        )
    if mode == "tls" and str(public_port) in merged["TCP"]:
        raise ConfigError(
            f"`tailscale serve` already handles port {public_port}; it would intercept the"
            " daemon's connections",
            key="server.port",
            hint=f'run `tailscale serve --https={public_port} off`, or use mode = "serve"',
        )
    if mode != "serve":
        return []
    target = backend or "http://127.0.0.1:<port>"
    web = merged["Web"].get(key)
    if not web:
        return [
            f"no `tailscale serve` handler for {key} yet; run: tailscale serve --bg"
            f" --https={public_port} {target}"
        ]
    proxies = {
        str(handler.get("Proxy") or "")
        for handler in (web.get("Handlers") or {}).values()
        if isinstance(handler, dict)
    }
    if backend and backend not in proxies:
        return [
            f"`tailscale serve` sends {key} to {', '.join(sorted(proxies)) or 'nothing'}, not to"
            f" this daemon ({backend})"
        ]
    return []


def backend_target(plan: ServePlan) -> str:
    """What ``tailscale serve`` must proxy to for ``plan`` (serve mode)."""
    if plan.host.startswith("unix:"):
        return plan.host
    return f"http://{plan.bind}"


def redirect_uri_for(name: str, port: int) -> str:
    if port == 443:
        return f"https://{name}/oauth/callback"
    return f"https://{name}:{port}/oauth/callback"


def _choose_hosts(settings: ApiSettings, status: TailscaleStatus | None) -> tuple[str, ...]:
    if settings.host:
        return (settings.host,)
    if settings.mode != "tls":
        return ("127.0.0.1",)
    if status is None:
        raise ConfigError(
            "cannot find this machine's Tailscale address",
            key="server.host",
            hint="is tailscaled running? or set server.host to the 100.x address",
        )
    if not status.running:
        raise ConfigError(
            f"tailscale is not running (backend state {status.backend_state or 'unknown'})",
            key="server.host",
            hint="run `tailscale up`, then start the daemon again",
        )
    if not status.tun:
        # userspace networking: tailscaled forwards tailnet connections to 127.0.0.1:<port>
        # (IPv4 loopback for v4 and v6 destinations alike)
        return ("127.0.0.1",)
    if not status.tailscale_ips:
        raise ConfigError("tailscale reports no Tailscale IP for this machine", key="server.host")
    # every address: MagicDNS answers AAAA too, and an IPv6-first client must not get a RST
    v4 = [ip for ip in status.tailscale_ips if ":" not in ip]
    v6 = [ip for ip in status.tailscale_ips if ":" in ip]
    return tuple(v4 + v6)


def _public_port(settings: ApiSettings) -> int:
    if settings.public_port:
        return settings.public_port
    return 8400 if settings.mode == "serve" else settings.port


async def plan_serving(
    settings: ApiSettings, *, tailscale: TailscaleClient | None = None
) -> ServePlan:
    """Pick and validate the bind address and the redirect URI (asks tailscaled if given)."""
    status: TailscaleStatus | None = None
    status_error: TailscaleError | None = None
    if tailscale is not None and settings.mode != "plain-test":
        try:
            status = await tailscale.status()
        except TailscaleError as err:
            status_error = err
    try:
        hosts = _choose_hosts(settings, status)
    except ConfigError as err:
        if status_error is not None:
            raise ConfigError(
                f"{err.message}; tailscaled could not be asked: {status_error.message}",
                key="server.host",
            ) from status_error
        raise
    host = hosts[0]
    warnings: list[str] = []
    for each in hosts:
        warnings += validate_bind(each, mode=settings.mode, allow_public=settings.allow_public_bind)

    names: set[str] = set()
    if status is not None:
        names = {d.lower() for d in status.cert_domains} | (
            {status.dns_name.lower()} if status.dns_name else set()
        )
    public_name = settings.public_name or (status.magicdns_name if status else "")
    if settings.redirect_uri:
        redirect = settings.redirect_uri
        redirect_host = (urlsplit(redirect).hostname or "").lower()
        if names and redirect_host not in names:
            raise ConfigError(
                f"the redirect URI's host {redirect_host!r} is not this machine's MagicDNS"
                f" name ({', '.join(sorted(names))})",
                key="server.redirect_uri",
                hint="was the machine or the tailnet renamed? update the URI here and at the"
                " providers",
            )
        public_name = public_name or redirect_host
    elif public_name:
        if names and public_name.lower() not in names:
            raise ConfigError(
                f"{public_name!r} is not this machine's MagicDNS name ({', '.join(sorted(names))})",
                key="server.public_name",
            )
        redirect = redirect_uri_for(public_name, _public_port(settings))
    elif settings.mode == "plain-test":
        redirect = f"http://{host}:{settings.port}/oauth/callback"
    else:
        raise ConfigError(
            "the daemon's MagicDNS name is unknown",
            key="server.public_name",
            hint="set server.public_name (host.tailnet.ts.net) or make tailscaled reachable"
            + (f" ({status_error.message})" if status_error else ""),
        )
    if settings.mode == "tls" and status is not None and not status.https_capable:
        if settings.cert_file is None:
            raise ConfigError(
                "HTTPS certificates are not enabled for this tailnet",
                key="server.mode",
                hint="enable MagicDNS and HTTPS in the admin console (tailscale.com/kb/1153)",
            )
    userspace = status is not None and not status.tun
    if settings.mode == "serve" and userspace and not host.startswith("unix:"):
        log.info(
            "tailscaled runs in userspace-networking mode: the loopback backend port is also"
            " reachable from the tailnet; every loopback caller is checked with whois, and a"
            " tailnet peer found that way is never trusted for identity headers"
            ' (server.host = "unix:/path" avoids the port altogether)'
        )
    backend = (
        (host if host.startswith("unix:") else f"http://{_bind_of(host, settings.port)}")
        if settings.mode == "serve"
        else ""
    )
    serve_config_of = getattr(tailscale, "serve_config", None)
    if serve_config_of is not None and public_name and settings.mode != "plain-test":
        try:
            serve_config = await serve_config_of()
        except TailscaleError as err:
            warnings.append(f"could not read the serve config: {err.message}")
        else:
            port = int(urlsplit(redirect).port or 443)
            warnings += check_serve_config(
                serve_config,
                mode=settings.mode,
                name=public_name,
                public_port=port,
                backend=backend if settings.port else "",
            )
    return ServePlan(
        mode=settings.mode,
        host=host,
        port=settings.port,
        redirect_uri=redirect,
        public_name=public_name,
        warnings=tuple(warnings),
        extra_hosts=hosts[1:],
        local_socket=str(settings.local_socket) if settings.local_socket else "",
        own_addresses=status.tailscale_ips if status is not None else (),
        userspace=userspace,
    )


def _bind_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_config(
    plan: ServePlan, *, certs: CertManager | None = None, settings: ApiSettings | None = None
) -> OwnContextConfig:
    """Hypercorn Config for ``plan``; TLS through ``certs``' own SSLContext when given.

    Timeouts: a connection must complete a request head within ``header_timeout`` of being
    accepted (or of its previous response): Hypercorn's idle timer runs until a request is
    parsed, so slow or silent clients are closed then; a TLS handshake gets
    ``handshake_timeout``.
    """
    settings = settings or ApiSettings(mode=plan.mode)  # type: ignore[arg-type]
    config = OwnContextConfig()
    config.bind = list(plan.binds)
    config.accesslog = None  # request paths hold OAuth states: never log them
    config.errorlog = None  # Hypercorn's own error lines; ours say what matters
    config.include_server_header = False
    config.graceful_timeout = 3.0
    config.keep_alive_timeout = settings.header_timeout
    config.ssl_handshake_timeout = settings.handshake_timeout
    config.h11_max_incomplete_size = 16 * 1024
    if certs is not None:
        config.certfile = str(certs.cert_file)
        config.keyfile = str(certs.key_file)
        config.own_ssl_context = certs.context
    return config


async def _cert_manager(
    settings: ApiSettings, plan: ServePlan, tailscale: TailscaleClient | None
) -> tuple[CertManager, list[Callable[[], Coroutine[Any, Any, None]]]]:
    """The certificate manager for tls mode and the loops that keep it current."""
    if settings.cert_file is not None and settings.key_file is not None:
        manager = CertManager(settings.cert_file, settings.key_file)
        return manager, [partial(manager.watch, settings.cert_check_interval)]
    if tailscale is None or settings.tls_dir is None or not plan.public_name:
        raise ConfigError(
            "tls mode needs a certificate: set server.cert_file and server.key_file, or let"
            " the daemon fetch one from tailscaled",
            key="server.cert_file",
        )
    source = TailscaleCertSource(tailscale, plan.public_name, settings.tls_dir)
    try:
        await source.fetch()
    except TailscaleError as err:
        raise ConfigError(
            f"could not get the certificate for {plan.public_name}: {err.message}",
            key="server.cert_file",
            hint="tailscaled must allow this user: `tailscale set --operator=$USER` or "
            "TS_PERMIT_CERT_UID",
        ) from err
    manager = CertManager(source.cert_file, source.key_file)
    return manager, [
        partial(manager.watch, settings.cert_check_interval),
        partial(source.refresh_forever, manager, settings.cert_refetch_interval),
    ]


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening socket: ``kind`` "tailnet" (the public side, TLS in tls mode) or
    "local" (the state dir's unix socket for same-host clients)."""

    sock: socket.socket
    kind: str
    tls: bool = False


#: asyncio's TLS protocol allocates (and zero-fills) a read buffer of this size for every
#: connection: 256 KiB by default, i.e. 256 MB for 1,000 held long-polls. A TLS record
#: carries at most 16 KiB, so larger reads buy nothing for this API's small messages.
TLS_READ_BUFFER = 16 * 1024


def _lean_tls_buffers() -> None:
    """Shrink asyncio's per-connection TLS read buffer for this process (see above)."""
    import asyncio.sslproto

    if asyncio.sslproto.SSLProtocol.max_size > TLS_READ_BUFFER:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _bind_socket(bind: str, backlog: int) -> socket.socket:
    if bind.startswith("unix:"):
        path = bind[5:]
        return _bind_unix(Path(path), backlog)
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when it is given
    # (without it, Nagle + delayed ACKs add ~40 ms to every keep-alive request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(path: Path, backlog: int) -> socket.socket:
    """A unix socket at ``path``, mode 0600 from the start (umask), a stale one replaced."""
    if len(os.fsencode(path)) >= 104:
        raise ConfigError(
            f"the unix socket path {path} is too long (the limit is about 100 bytes)",
            key="paths.state_dir",
            hint="use a shorter state_dir",
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_socket():
        if _socket_is_live(path):
            raise OSError(
                errno.EADDRINUSE, f"{path} is in use (another agentd serve with this state dir?)"
            )
        path.unlink()  # left behind by a daemon that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class _ConnectionApp:
    """The app for one connection: tells the guard which listener and peer it came from."""

    __slots__ = ("_app", "_extra")

    def __init__(self, app: AppWrapper, extra: dict[str, Any]) -> None:
        self._app = app
        self._extra = extra

    async def __call__(
        self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> None:
        scope.update(self._extra)
        await self._app(scope, receive, send, sync_spawn, call_soon)


@dataclass
class _Server:
    """Accepts connections on the listeners and hands each to Hypercorn's TCPServer.

    Per listener one accept loop (``loop.sock_accept``): the peer is admitted or refused
    (uid check, connection caps) before anything else happens; an admitted connection
    waits until it sends its first bytes (an idle one costs a reader registration, no TLS
    state), then TLS is set up on the accepted socket (``connect_accepted_socket``, with a
    handshake timeout) and Hypercorn's TCPServer takes over. Accept failures for lack of
    descriptors (EMFILE & co.) pause that loop briefly and are logged once a minute.
    """

    app: AppWrapper
    config: Config
    limiter: ConnectionLimiter
    allowed_uids: frozenset[int]
    ssl_context: ssl.SSLContext | None
    accept_errors: AcceptErrorLog
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    refused_uids: int = 0

    async def run(
        self, listeners: list[Listener], shutdown_trigger: Callable[[], Awaitable[Any]]
    ) -> None:
        loop = asyncio.get_running_loop()
        self.config.set_statsd_logger_class(StatsdLogger)
        state: dict[str, Any] = {}
        lifespan = Lifespan(self.app, self.config, loop, state)
        lifespan_task = loop.create_task(lifespan.handle_lifespan())
        await lifespan.wait_for_startup()
        if lifespan_task.done() and lifespan_task.exception() is not None:
            raise lifespan_task.exception()  # type: ignore[misc]
        self._context = WorkerContext(None)
        self._state = state
        accepting = [loop.create_task(self._accept(listener)) for listener in listeners]
        try:
            await shutdown_trigger()
        finally:
            for task in accepting:
                task.cancel()
            await asyncio.gather(*accepting, return_exceptions=True)
            await self._context.terminated.set()
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=self.config.graceful_timeout)
            await lifespan.wait_for_shutdown()
            lifespan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lifespan_task

    async def _accept(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener.sock)
            except OSError as err:
                if not self.accept_errors.note(err):
                    log.warning("accept failed on %s: %s", listener.kind, err)
                await asyncio.sleep(0.25)  # descriptors come back as connections close
                continue
            conn = self._admit(listener, sock, address)
            if conn is None:
                sock.close()
                continue
            task = loop.create_task(self._connection(listener, sock, conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _admit(self, listener: Listener, sock: socket.socket, address: Any) -> Conn | None:
        extra: dict[str, Any] = {"agentd.listener": listener.kind}
        if listener.kind == "local":
            uid = peer_uid(sock)
            if uid is None or uid not in self.allowed_uids:
                self.refused_uids += 1
                if self.refused_uids in (1, 10, 100) or self.refused_uids % 1000 == 0:
                    log.warning(
                        "refused a local connection from uid %s (%d so far): only uid %s or"
                        " root may use %s",
                        uid,
                        self.refused_uids,
                        os.getuid(),
                        listener.sock.getsockname(),
                    )
                return None
            extra["agentd.peer_uid"] = uid
            peer = f"uid:{uid}"
        else:
            peer = str(address[0]) if isinstance(address, tuple) and address else "unix"
        conn = Conn(peer, close=sock.close)
        if not self.limiter.admit(conn):
            return None
        extra["agentd.whois_cache"] = {}  # the guard's whois answers about this peer
        extra["agentd.activate"] = partial(self.limiter.activate, conn)
        extra["agentd.park"] = partial(self.limiter.parked, conn)
        conn.extra = extra
        return conn

    async def _connection(self, listener: Listener, sock: socket.socket, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        transported = False
        try:
            if conn.released:
                return  # evicted before this task ran

            # nothing is set up for a peer that never speaks: it waits in the selector
            def cancel() -> None:
                if task is not None:
                    task.cancel()

            conn.close = cancel
            try:
                async with asyncio.timeout(self.config.keep_alive_timeout):
                    await _readable(loop, sock)
            except TimeoutError:
                return
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    return  # the peer left without a word
            except BlockingIOError:
                pass
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            tls = self.ssl_context if listener.tls else None
            transported = True  # from here on asyncio closes the socket
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=tls,
                ssl_handshake_timeout=self.config.ssl_handshake_timeout if tls else None,
            )
            conn.close = transport.abort
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await TCPServer(
                _ConnectionApp(self.app, conn.extra),
                loop,
                self.config,
                self._context,
                self._state,
                reader,
                writer,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            pass  # the peer went away or spoke no TLS: nothing to answer
        except asyncio.CancelledError:
            pass  # evicted, or the daemon is stopping: this task is the root, nobody awaits it
        finally:
            if not transported:
                sock.close()
            self.limiter.release(conn)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` has data (or EOF) to read."""
    ready = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def serve(
    app: Any,
    settings: ApiSettings,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    tailscale: TailscaleClient | None = None,
    plan: ServePlan | None = None,
    certs: CertManager | None = None,
    caps: Caps | None = None,
    task_status: TaskStatus[ServePlan] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run Hypercorn for ``app`` until ``shutdown_trigger`` returns.

    tls mode: ``certs`` (a CertManager the caller keeps) or one made from
    ``settings.cert_file``/``key_file``, else a pair fetched from tailscaled into
    ``settings.tls_dir``; the files are watched (and refetched) and reloaded in place.
    ``caps``: connection caps (default: sized from the open-file limit, raised to its
    hard limit first).
    """
    if plan is None:
        plan = await plan_serving(settings, tailscale=tailscale)
    for warning in plan.warnings:
        log.warning("%s", warning)
    watchers: list[Callable[[], Coroutine[Any, Any, None]]] = []
    if plan.mode != "tls":
        certs = None
    elif certs is not None:
        watchers.append(partial(certs.watch, settings.cert_check_interval))
    else:
        certs, watchers = await _cert_manager(settings, plan, tailscale)
    config = build_config(plan, certs=certs, settings=settings)
    _lean_tls_buffers()
    if caps is None:
        before, after = raise_nofile_limit()
        if after > before:
            log.info("open-file limit raised from %d to %d", before, after)
        caps = default_caps(after)
    listeners: list[Listener] = []
    try:
        for bind in plan.binds:
            sock = _bind_socket(bind, config.backlog)
            listeners.append(Listener(sock, "tailnet", tls=certs is not None))
        if plan.local_socket:
            sock = _bind_unix(Path(plan.local_socket), config.backlog)
            listeners.append(Listener(sock, "local"))
    except BaseException:
        _close_listeners(listeners)
        raise
    port = plan.port
    if listeners and not plan.host.startswith("unix:"):
        port = listeners[0].sock.getsockname()[1]
    plan = replace(plan, port=port)
    if plan.mode == "plain-test" and not (settings.redirect_uri or settings.public_name):
        plan = replace(plan, redirect_uri=f"http://{plan.bind}/oauth/callback")
    log.debug(  # agentd.daemon logs these at start-up (once)
        "API listening on %s (%s mode), redirect URI %s",
        plan.base_url,
        plan.mode,
        plan.redirect_uri,
    )
    server = _Server(
        app=wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config=config,
        limiter=ConnectionLimiter(caps),
        allowed_uids=frozenset({os.getuid(), 0}),
        ssl_context=certs.context if certs is not None else None,
        accept_errors=AcceptErrorLog(),
    )
    try:
        async with anyio.create_task_group() as tg:
            for watcher in watchers:
                tg.start_soon(watcher)
            task_status.started(plan)
            await server.run(listeners, shutdown_trigger)
            tg.cancel_scope.cancel()
    finally:
        _close_listeners(listeners)


def _close_listeners(listeners: list[Listener]) -> None:
    """Close the sockets; unix socket files we bound are removed."""
    for listener in listeners:
        if listener.sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(listener.sock.getsockname())
        listener.sock.close()
