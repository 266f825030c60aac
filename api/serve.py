"""Serving the API with Hypercorn in-process (the only module that imports hypercorn).

:func:`plan_serving` decides and validates where to listen and which redirect URI the
daemon answers to; :func:`serve` runs Hypercorn with that plan inside the caller's anyio
task group until ``shutdown_trigger`` returns::

    async with anyio.create_task_group() as tg:
        plan = await tg.start(partial(serve, app, settings, shutdown_trigger=stop.wait,
                                      tailscale=localapi))

``task_status.started(plan)`` fires once the listening sockets are bound (``plan.port``
is the real port, also when 0 was asked for).

Modes: ``tls`` binds the Tailscale IP (loopback in userspace-networking mode) with the
node's own certificate in an SSLContext we keep and reload; ``serve`` binds loopback, plain
HTTP, behind ``tailscale serve --https=<public port> http://127.0.0.1:<port>``;
``plain-test`` is loopback plain HTTP for tests and the demo.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from flowengine.errors import ConfigError

from .guard import is_tailnet_address, parse_ip
from .settings import ApiSettings
from .tailscale import TailscaleClient, TailscaleError, TailscaleStatus
from .tls import CertManager, TailscaleCertSource

__all__ = [
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

    @property
    def bind(self) -> str:
        if self.is_unix:
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

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


def check_serve_config(
    serve_config: dict[str, Any], *, mode: str, name: str, public_port: int
) -> list[str]:
    """Startup self-check against ``tailscale serve status --json`` (LocalAPI serve-config).

    Refuses when Funnel is on for our host:port (public internet) or, in tls mode, when
    serve claims our port (it would intercept tailnet traffic before Hypercorn). In serve
    mode, warns when no serve handler exists for our host:port yet.
    """
    key = f"{name}:{public_port}"
    funnel = serve_config.get("AllowFunnel") or {}
    if funnel.get(key):
        raise ConfigError(
            f"Tailscale Funnel is enabled for {key}: the daemon would be on the public internet",
            key="server.mode",
            hint=f"run `tailscale funnel --https={public_port} off`",
        )
    tcp = serve_config.get("TCP") or {}
    if mode == "tls" and str(public_port) in tcp:
        raise ConfigError(
            f"`tailscale serve` already handles port {public_port}; it would intercept the"
            " daemon's connections",
            key="server.port",
            hint=f'run `tailscale serve --https={public_port} off`, or use mode = "serve"',
        )
    if mode == "serve" and key not in (serve_config.get("Web") or {}):
        return [
            f"no `tailscale serve` handler for {key} yet; run: tailscale serve --bg"
            f" --https={public_port} http://127.0.0.1:<port>"
        ]
    return []


def redirect_uri_for(name: str, port: int) -> str:
    if port == 443:
        return f"https://{name}/oauth/callback"
    return f"https://{name}:{port}/oauth/callback"


def _choose_host(settings: ApiSettings, status: TailscaleStatus | None) -> str:
    if settings.host:
        return settings.host
    if settings.mode != "tls":
        return "127.0.0.1"
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
        return "127.0.0.1"
    host = status.ipv4 or next(iter(status.tailscale_ips), None)
    if host is None:
        raise ConfigError("tailscale reports no Tailscale IP for this machine", key="server.host")
    return host


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
        host = _choose_host(settings, status)
    except ConfigError as err:
        if status_error is not None:
            raise ConfigError(
                f"{err.message}; tailscaled could not be asked: {status_error.message}",
                key="server.host",
            ) from status_error
        raise
    warnings = validate_bind(host, mode=settings.mode, allow_public=settings.allow_public_bind)

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
    if settings.mode == "serve" and status is not None and not status.tun:
        warnings.append(
            "tailscaled runs in userspace-networking mode: the loopback backend port is also"
            " reachable from the tailnet, where identity headers could be forged"
            " (set allowed_logins only together with a kernel TUN, or keep the bearer token"
            " secret)"
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
                serve_config, mode=settings.mode, name=public_name, public_port=port
            )
    return ServePlan(
        mode=settings.mode,
        host=host,
        port=settings.port,
        redirect_uri=redirect,
        public_name=public_name,
        warnings=tuple(warnings),
    )


def build_config(plan: ServePlan, *, certs: CertManager | None = None) -> OwnContextConfig:
    """Hypercorn Config for ``plan``; TLS through ``certs``' own SSLContext when given."""
    config = OwnContextConfig()
    config.bind = [plan.bind]
    config.accesslog = None  # request paths hold OAuth states: never log them
    config.include_server_header = False
    config.graceful_timeout = 3.0
    config.keep_alive_timeout = 30.0
    if certs is not None:
        config.certfile = str(certs.cert_file)
        config.keyfile = str(certs.key_file)
        config.own_ssl_context = certs.context
    return config


async def _cert_manager(
    settings: ApiSettings, plan: ServePlan, tailscale: TailscaleClient | None
) -> tuple[CertManager, list[Callable[[], Awaitable[None]]]]:
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


async def serve(
    app: Any,
    settings: ApiSettings,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    tailscale: TailscaleClient | None = None,
    plan: ServePlan | None = None,
    certs: CertManager | None = None,
    task_status: TaskStatus[ServePlan] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run Hypercorn for ``app`` until ``shutdown_trigger`` returns.

    tls mode: ``certs`` (a CertManager the caller keeps) or one made from
    ``settings.cert_file``/``key_file``, else a pair fetched from tailscaled into
    ``settings.tls_dir``; the files are watched (and refetched) and reloaded in place.
    """
    if plan is None:
        plan = await plan_serving(settings, tailscale=tailscale)
    for warning in plan.warnings:
        log.warning("%s", warning)
    watchers: list[Callable[[], Awaitable[None]]] = []
    if plan.mode != "tls":
        certs = None
    elif certs is not None:
        watchers.append(partial(certs.watch, settings.cert_check_interval))
    else:
        certs, watchers = await _cert_manager(settings, plan, tailscale)
    config = build_config(plan, certs=certs)
    sockets = config.create_sockets()
    bound = [*sockets.secure_sockets, *sockets.insecure_sockets]
    try:
        for sock in bound:
            sock.listen(config.backlog)
    except OSError:
        for sock in bound:
            sock.close()
        raise
    port = plan.port
    if bound and not plan.is_unix:
        port = bound[0].getsockname()[1]
    plan = replace(plan, port=port)
    if plan.mode == "plain-test" and not (settings.redirect_uri or settings.public_name):
        plan = replace(plan, redirect_uri=f"http://{plan.bind}/oauth/callback")
    log.info(
        "API listening on %s (%s mode), redirect URI %s",
        plan.base_url,
        plan.mode,
        plan.redirect_uri,
    )
    try:
        async with anyio.create_task_group() as tg:
            for watcher in watchers:
                tg.start_soon(watcher)
            task_status.started(plan)
            await worker_serve(
                wrap_app(app, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=sockets,
                shutdown_trigger=shutdown_trigger,
            )
            tg.cancel_scope.cancel()
    finally:
        for sock in bound:
            sock.close()
