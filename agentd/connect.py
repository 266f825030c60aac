"""``agentd connect <provider>``: the authorization flow from a terminal.

The command talks to the running daemon over its unix socket in the state dir
(agentd/local_client.py): the daemon starts the flow with its own redirect URI, receives
the callback, exchanges the code and reports the outcome. Nothing goes over the network.
"""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from agentd import terminal
from agentd.context import Context
from agentd.local_client import local_daemon
from flowengine.catalog import Catalog
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.errors import BrokerError, ConfigError, CredentialsMissingError

__all__ = ["connect", "ensure_credentials"]

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


async def connect(ctx: Context, args: argparse.Namespace) -> int:
    """Ask the daemon (over its local socket) for a link, show it, wait for the outcome.

    The daemon exchanges the code as soon as the browser comes back, so the connection is
    made even if this command dies meanwhile; Ctrl-C (or the timeout) cancels the flow.
    """
    from agentd.cli import EXIT
    from agentd.commands import scope_text

    spec = ctx.catalog.get(args.provider)
    ensure_credentials(ctx.catalog, ctx.credentials, spec.id, interactive=False)
    async with local_daemon(ctx.config.state_dir) as daemon:
        start = await daemon.begin(spec.id, scopes=args.scopes)
        flow_id = str(start["flow_id"])
        try:
            url = str(start["authorize_url"])
            terminal.show_link(spec.name, url, force_qr=args.qr, no_qr=args.no_qr)
            deadline = start.get("deadline")
            async with terminal.waiting(
                sys.stderr,
                deadline_ms=int(deadline) if deadline is not None else None,
                now_ms=ctx.engine.now_ms,
            ):
                result = await daemon.outcome(flow_id, timeout=args.timeout)
        except BaseException:
            # Ctrl-C or an error while waiting: the link must stop working, nothing left open
            with anyio.CancelScope(shield=True):
                await _cancel_quietly(ctx, flow_id)
            raise
    outcome = result.get("outcome")
    if outcome == "pending":
        await _cancel_quietly(ctx, flow_id)
        print(f"⌛ no answer within {int(args.timeout)} s; run agentd connect {spec.id} again")
        return EXIT["flow_failed"]
    if outcome == "connected":
        expiry = "unknown expiry"
        if result.get("token_expires_at") is not None:
            from agentd.commands import _when

            expiry = f"token expires {_when(int(result['token_expires_at']))}"
        scopes = scope_text(result.get("scopes") or (), result.get("scope_source"))
        print(f"✅ {spec.name} connected (scopes: {scopes}; {expiry})")
        return EXIT["ok"]
    if outcome == "denied":
        print(f"❌ {spec.name} authorization was denied")
    else:
        detail = result.get("error_description") or result.get("error")
        print(f"❌ {spec.name} authorization {outcome}" + (f": {detail}" if detail else ""))
    return EXIT["flow_failed"]
