"""``agentd connect <provider>``: the authorization flow from a terminal."""

from __future__ import annotations

import argparse
import getpass
import itertools
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx

from agentd.config import Config
from agentd.context import Context, api_token, daemon_base_url, redirect_uri
from flowengine.credentials import ClientCredentials
from flowengine.daemon_client import wait_for_code
from flowengine.errors import CredentialsMissingError, FlowExpiredError

__all__ = ["connect", "daemon_ssl_context", "ensure_credentials", "print_qr"]


def ensure_credentials(ctx: Context, provider: str, *, interactive: bool) -> None:
    """Ask for the client id (and secret) when none are stored."""
    spec = ctx.catalog.get(provider)
    if ctx.credentials.get(spec.id) is not None:
        return
    if not interactive:
        raise CredentialsMissingError(spec.id, needs_secret=spec.needs_secret)
    print(f"No client credentials stored for {spec.name} yet.")
    client_id = input(f"{spec.name} client id: ").strip()
    secret = None
    if spec.needs_secret:
        secret = getpass.getpass(f"{spec.name} client secret (not echoed): ").strip() or None
    if not client_id or (spec.needs_secret and not secret):
        raise CredentialsMissingError(spec.id, needs_secret=spec.needs_secret)
    ctx.credentials.put(spec.id, ClientCredentials(client_id, secret))


def daemon_ssl_context(config: Config) -> ssl.SSLContext:
    """System CAs plus ``client.ca_file`` (an extra CA, e.g. for a self-signed daemon)."""
    context = ssl.create_default_context()
    ca_file = config.values["client"]["ca_file"]
    if ca_file:
        context.load_verify_locations(cafile=str(Path(ca_file).expanduser()))
    return context


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


async def connect(ctx: Context, args: argparse.Namespace) -> int:
    from agentd.cli import EXIT

    spec = ctx.catalog.get(args.provider)
    ensure_credentials(ctx, spec.id, interactive=sys.stdin.isatty())
    start = await ctx.broker.begin(
        spec.id, redirect_uri=redirect_uri(ctx.config), actor="cli", scopes=args.scopes
    )
    print(f"Open this link to authorize {spec.name}:\n\n  {start.authorize_url}\n")
    if not args.no_qr:
        print_qr(start.authorize_url)
    sys.stdout.flush()  # the link must show now, also when stdout is a pipe (tee, a log)
    spinner = _Spinner(sys.stderr)
    async with httpx.AsyncClient(verify=daemon_ssl_context(ctx.config)) as http:
        try:
            result = await wait_for_code(
                http,
                daemon_base_url(ctx.config),
                start.state,
                api_token(ctx.config),
                timeout=args.timeout,
                on_wait=spinner.tick,
            )
        finally:
            spinner.clear()
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
    scopes = tokens.scope or " ".join(start.flow.scopes) or "-"
    print(f"✅ {spec.name} connected (scopes: {scopes}; {expiry})")
    return EXIT["ok"]
