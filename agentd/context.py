"""Wiring: open the engine, catalog, stores and broker from a Config (composition root)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from agentd.config import Config
from flowengine import oauth_http
from flowengine.audit import Retention
from flowengine.broker import Broker
from flowengine.catalog import Catalog, load_catalog
from flowengine.clock import Clock
from flowengine.credentials import CredentialStore
from flowengine.discovery import DiscoveredStore
from flowengine.engine import FlowEngine
from flowengine.errors import ConfigError
from flowengine.ratelimit import Rate
from flowengine.schedule import TimerPolicy
from flowengine.tokens import TokenStore
from flowengine.vault import Vault, vault_root

if TYPE_CHECKING:  # pragma: no cover
    from api.settings import ApiSettings

__all__ = [
    "Context",
    "api_settings",
    "api_token",
    "client_ssl_context",
    "open_context",
    "handout_rate",
    "redirect_uri",
    "retention",
    "timer_policy",
    "vault_dir",
]


def timer_policy(config: Config) -> TimerPolicy:
    """The refresh timer's policy from the ``[timer]`` section."""
    timer = config.timer
    return TimerPolicy(
        interval=timer.interval,
        refresh_fraction=timer.refresh_fraction,
        refresh_floor=timer.refresh_floor,
        unknown_expiry_check=timer.unknown_expiry_check,
    )


def retention(config: Config) -> Retention:
    """How long the audit keeps token hand-outs (``[remote] audit_days``/``audit_max_rows``)."""
    return Retention(days=config.remote.audit_days, max_rows=config.remote.audit_max_rows)


def handout_rate(config: Config) -> Rate:
    """Each identity's token bucket (``[remote] rate``/``burst``)."""
    return Rate(per_second=config.remote.rate, burst=float(config.remote.burst))


def vault_dir(config: Config) -> Path:
    """The token vault: ``<state dir>/vault`` (the source of truth behind auth.json)."""
    return vault_root(config.state_dir)


@dataclass
class Context:
    config: Config
    engine: FlowEngine
    catalog: Catalog
    credentials: CredentialStore
    tokens: TokenStore
    broker: Broker
    http: httpx.AsyncClient


@asynccontextmanager
async def open_context(
    config: Config,
    *,
    clock: Clock | None = None,
    catalog: Catalog | None = None,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[Context]:
    """Everything a command needs, closed again on exit."""
    engine = await FlowEngine.open(
        config.ledger_path,
        clock=clock,
        awaiting_ttl=config.timer.awaiting_ttl,
        code_ttl=config.timer.code_ttl,
    )
    own_http = http is None
    try:
        client = http or httpx.AsyncClient(
            verify=client_ssl_context(config), timeout=httpx.Timeout(20.0, connect=10.0)
        )
    except BaseException:
        await engine.close()
        raise
    try:
        cat = catalog or load_catalog(discovered=config.discovered_path)
        credentials = CredentialStore(config.credentials_path)
        tokens = TokenStore(config.auth_file)
        broker = Broker(
            engine,
            catalog=cat,
            credentials=credentials,
            tokens=tokens,
            vault=Vault(vault_dir(config)),
            http=client,
            policy=timer_policy(config),
            discovered=DiscoveredStore(config.discovered_path),
        )
        broker.retention = retention(config)
        yield Context(config, engine, cat, credentials, tokens, broker, client)
    finally:
        if own_http:
            await client.aclose()
        await engine.close()


def client_ssl_context(config: Config) -> ssl.SSLContext:
    """The trust of every HTTPS call (providers, the daemon): system CAs + ``client.ca_file``."""
    return oauth_http.client_ssl_context(config.client.ca_file or None)


def api_token(config: Config) -> str:
    """The API bearer token: ``server.api_token``, else the state dir's file (made 0600)."""
    # imported here: the api package loads Quart and Hypercorn, which most commands never use
    from api.settings import load_api_token

    return load_api_token(config.api_token_path, config.server.api_token)


def api_settings(config: Config, **overrides: Any) -> ApiSettings:
    """The HTTP side's settings from ``[server]`` (``overrides``: ApiSettings fields the
    daemon adds, e.g. its token and local socket). Makes no file."""
    from api.settings import DEFAULT_SOCKET, ApiSettings

    server = config.server
    values: dict[str, Any] = {
        "mode": server.mode,
        "host": server.host,
        "port": server.port,
        "public_port": server.public_port,
        "public_name": server.public_name,
        "redirect_uri": server.redirect_uri,
        "cert_file": Path(server.cert_file).expanduser() if server.cert_file else None,
        "key_file": Path(server.key_file).expanduser() if server.key_file else None,
        "tls_dir": config.state_dir / "tls",
        "api_token": server.api_token,
        "allowed_logins": server.allowed_logins,
        "allow_public_bind": server.allow_public_bind,
        "localapi_socket": server.localapi_socket or DEFAULT_SOCKET,
    }
    return ApiSettings(**(values | overrides))


def redirect_uri(config: Config, public_name: str | None = None) -> str:
    """The exact redirect URI registered at providers."""
    server = config.server
    if server.redirect_uri:
        return server.redirect_uri
    name = public_name or server.public_name
    if not name:
        raise ConfigError(
            "the daemon's MagicDNS name is unknown",
            key="server.public_name",
            hint="set server.public_name (e.g. host.tailnet.ts.net) or server.redirect_uri",
        )
    # as api.serve plans it: behind `tailscale serve` the public port is 8400 unless set
    port = server.public_port or (8400 if server.mode == "serve" else server.port)
    return (
        f"https://{name}:{port}/oauth/callback" if port != 443 else f"https://{name}/oauth/callback"
    )
