"""``agentd connect <provider>``: the authorization flow from a terminal."""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import ssl
import sys
from typing import Any

import anyio
import httpx

from agentd.config import Config
from agentd.context import Context, api_token, client_ssl_context, daemon_base_url, redirect_uri
from flowengine.catalog import Catalog
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.daemon_client import wait_for_code
from flowengine.errors import (
    BrokerError,
    ConfigError,
    CredentialsMissingError,
    FlowExpiredError,
    FlowNotFound,
    ProviderTransientError,
)
from flowengine.oauth_http import tls_error

__all__ = [
    "check_daemon",
    "connect",
    "daemon_ssl_context",
    "ensure_credentials",
    "magicdns_name",
    "print_qr",
    "resolve_urls",
]

log = logging.getLogger("agentd.connect")


async def _cancel_quietly(ctx: Context, flow_id: str) -> None:
    try:
        await ctx.engine.cancel(flow_id, actor="cli")
    except BrokerError as err:  # already ended (e.g. the timer expired it)
        log.debug("flow %s not cancelled: %s", flow_id, err.code)


def ensure_credentials(
    catalog: Catalog, credentials: CredentialStore, provider: str, *, interactive: bool
) -> None:
    """Ask for the client id (and secret) when none are stored.

    Called before the event loop starts: a blocking prompt inside it would leave Ctrl-C
    waiting for the answer (asyncio turns SIGINT into a cancellation, not an exception).
    """
    spec = catalog.get(provider)
    if credentials.get(spec.id) is not None:
        return
    if not interactive:
        raise CredentialsMissingError(spec.id, needs_secret=spec.needs_secret)
    from agentd.prompts import ask

    print(f"No client credentials stored for {spec.name} yet.")
    try:
        what = f"{spec.name} client id"
        client_id = ask(f"{what}: ", key=spec.id, what=what)
        secret = None
        if spec.needs_secret:
            what = f"{spec.name} client secret"
            secret = ask(f"{what} (not echoed): ", key=spec.id, what=what, secret=True)
    except ConfigError as err:  # EOF (Ctrl-D), an empty or an unprintable answer
        hint = f"or store them first: agentd credentials {spec.id}"
        raise ConfigError(err.message, hint=hint) from None
    credentials.put(spec.id, ClientCredentials(client_id, secret))


def daemon_ssl_context(config: Config) -> ssl.SSLContext:
    """System CAs plus ``client.ca_file`` (an extra CA, e.g. for a self-signed daemon)."""
    return client_ssl_context(config)


def print_qr(url: str, out: Any = sys.stdout) -> None:
    import segno

    segno.make(url, error="l").terminal(out=out, compact=True, border=2)


class _Spinner:
    def __init__(self, out: Any) -> None:
        self._out = out
        self._frames = itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
        self._live = bool(getattr(out, "isatty", lambda: False)())

    def tick(self) -> None:
        if self._live:
            self._out.write(f"\r{next(self._frames)} waiting for the browser ...")
            self._out.flush()

    def clear(self) -> None:
        if self._live:
            self._out.write("\r" + " " * 40 + "\r")
            self._out.flush()


async def magicdns_name(config: Config) -> str | None:
    """This machine's MagicDNS name from tailscaled (LocalAPI socket, else the CLI), or None."""
    from api.tailscale import LocalAPI, TailscaleCLI, TailscaleClient, TailscaleError

    socket_path = str(config.values["server"]["localapi_socket"])
    client: TailscaleClient
    if await anyio.Path(socket_path).exists():
        client = LocalAPI(socket_path, timeout=10.0)
    elif shutil.which("tailscale"):
        client = TailscaleCLI(timeout=10.0)
    else:
        return None
    try:
        status = await client.status()
    except TailscaleError:
        return None
    finally:
        if isinstance(client, LocalAPI):
            await client.aclose()
    return status.magicdns_name or None


async def resolve_urls(config: Config) -> tuple[str, str]:
    """The redirect URI and the daemon's base URL; asks tailscaled for the name if needed."""
    try:
        return redirect_uri(config), daemon_base_url(config)
    except ConfigError:
        name = await magicdns_name(config)
        if not name:
            raise
        return redirect_uri(config, name), daemon_base_url(config, name)


async def check_daemon(http: httpx.AsyncClient, base_url: str) -> None:
    """Fail fast (before a flow starts) when the daemon that receives the callback is not up."""
    try:
        response = await http.get(f"{base_url}/healthz", timeout=httpx.Timeout(10.0))
    except httpx.HTTPError as err:
        tls = tls_error(err, base_url, provider="agentd", during=f"the daemon at {base_url}")
        if tls is not None:
            raise tls from err
        raise ProviderTransientError(
            f"the daemon is not reachable at {base_url} ({type(err).__name__}: {err});"
            " is `agentd serve` running? (client.api_base_url)",
            provider="agentd",
        ) from err
    if response.status_code != 200:
        raise ProviderTransientError(
            f"the daemon at {base_url} answered /healthz with HTTP {response.status_code}",
            provider="agentd",
            http_status=response.status_code,
        )


async def connect(ctx: Context, args: argparse.Namespace) -> int:
    from agentd.cli import EXIT

    spec = ctx.catalog.get(args.provider)
    ensure_credentials(ctx.catalog, ctx.credentials, spec.id, interactive=False)
    redirect, base_url = await resolve_urls(ctx.config)
    spinner = _Spinner(sys.stderr)
    async with httpx.AsyncClient(verify=daemon_ssl_context(ctx.config)) as http:
        await check_daemon(http, base_url)
        start = await ctx.broker.begin(
            spec.id, redirect_uri=redirect, actor="cli", scopes=args.scopes
        )
        try:
            print(f"Open this link to authorize {spec.name}:\n\n  {start.authorize_url}\n")
            if not args.no_qr:
                print_qr(start.authorize_url)
            sys.stdout.flush()  # the link must show now, also when stdout is a pipe (tee, a log)
            try:
                result = await wait_for_code(
                    http,
                    base_url,
                    start.state,
                    api_token(ctx.config),
                    timeout=args.timeout,
                    on_wait=spinner.tick,
                )
            finally:
                spinner.clear()
        except FlowNotFound as err:
            await _cancel_quietly(ctx, start.flow.id)
            raise ConfigError(
                f"the daemon at {base_url} does not know this authorization",
                key="paths.state_dir",
                hint="the daemon and this command must share the ledger (same state_dir)",
            ) from err
        except BaseException:
            # Ctrl-C or an error while waiting: the link must stop working, nothing left open
            with anyio.CancelScope(shield=True):
                await _cancel_quietly(ctx, start.flow.id)
            raise
    if result.status == "timeout":
        await ctx.engine.cancel(start.flow.id, actor="cli")
        print(f"⌛ no answer within {int(args.timeout)} s; run agentd connect {spec.id} again")
        return EXIT["flow_failed"]
    if result.status == "gone":
        if result.error == "access_denied":
            print(f"❌ {spec.name} authorization was denied")
        else:
            detail = f" ({result.error})" if result.error else ""
            print(f"❌ {spec.name} authorization {result.reason}{detail}")
        return EXIT["flow_failed"]
    if result.code is None or result.flow_id != start.flow.id:
        raise FlowExpiredError("the daemon answered for another flow", flow_id=start.flow.id)
    tokens = await ctx.broker.complete(start.flow.id, result.code, actor="cli")
    expiry = "unknown expiry"
    if tokens.expires is not None:
        from agentd.commands import _when

        expiry = f"token expires {_when(tokens.expires)}"
    from agentd.commands import scope_text

    source = tokens.extra.get("scope_source")
    scopes = scope_text((tokens.scope or "").split() or start.flow.scopes, source)
    print(f"✅ {spec.name} connected (scopes: {scopes}; {expiry})")
    return EXIT["ok"]
