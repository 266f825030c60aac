"""``agentd connect <provider>``: the authorization flow from a terminal.

The command talks to the running daemon over its unix socket in the state dir
(agentd/local_client.py): the daemon starts the flow with its own redirect URI, receives
the callback, exchanges the code and reports the outcome. Nothing goes over the network.
A URL instead of a provider id is handed to the daemon as it is: the daemon discovers it
and registers its own callback (Broker.provider_for).

``--device`` uses the device authorization grant (RFC 8628) and needs no daemon: this
command asks the provider for a code, shows it with the page to enter it on (and a QR code
of the page with the code filled in, where it fits), and polls the provider until the
owner approved or refused or the code expired. Ctrl-C (or ``--timeout``) cancels the flow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

import anyio

from agentd import terminal
from agentd.context import Context
from agentd.exits import EXIT
from agentd.formatting import scope_text, when
from agentd.local_client import local_daemon
from flowengine.broker import DeviceOutcome, DeviceStart
from flowengine.catalog import Catalog
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.errors import BrokerError, ConfigError, CredentialsMissingError

__all__ = ["connect", "connect_device", "ensure_credentials", "show_code"]

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
        raise CredentialsMissingError(provider=spec.id, needs_secret=spec.needs_secret)
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

    if getattr(args, "device", False):
        return await connect_device(ctx, args)
    target = args.provider
    if "://" not in target:
        target = ctx.catalog.get(args.provider).id
        ensure_credentials(ctx.catalog, ctx.credentials, target, interactive=False)
    async with local_daemon(ctx.config.state_dir) as daemon:
        start = await daemon.begin(target, scopes=args.scopes)
        flow_id = str(start["flow_id"])
        # a URL was discovered by the daemon just now: its entry is in discovered.json
        spec = ctx.broker.spec(str(start["provider"]))
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
            expiry = f"token expires {when(int(result['token_expires_at']))}"
        scopes = scope_text(result.get("scopes") or (), result.get("scope_source"))
        print(f"✅ {spec.name} connected (scopes: {scopes}; {expiry})")
        return EXIT["ok"]
    if outcome == "denied":
        print(f"❌ {spec.name} authorization was denied")
    else:
        detail = result.get("error_description") or result.get("error")
        print(f"❌ {spec.name} authorization {outcome}" + (f": {detail}" if detail else ""))
    return EXIT["flow_failed"]


def _callback_if_known(ctx: Context) -> str | None:
    """The daemon's redirect URI when the configuration names it (no tailscaled query)."""
    from agentd.context import redirect_uri

    try:
        return redirect_uri(ctx.config)
    except ConfigError:
        return None


def show_code(start: DeviceStart, *, force_qr: bool, no_qr: bool, out: TextIO) -> None:
    """The page, the code, and the QR code of the page with the code filled in where it fits
    (the rules of the link's QR code: ``--qr`` prints it anyway, ``--no-qr`` never)."""
    name = start.spec.name
    out.write(
        f"To connect {name}, open this page on any device:\n\n{start.verification_uri}\n\n"
        f"and enter the code  {start.user_code}  (valid until {when(start.expires_at)})\n\n"
    )
    complete = start.verification_uri_complete
    if complete and not no_qr:
        size = terminal.terminal_size(out)
        rows = terminal.qr_rows(complete)
        fits = size is not None and len(rows[0]) <= size[0] and len(rows) + 10 <= size[1]
        if force_qr or fits:
            out.write("or scan this QR code (the code is filled in):\n\n")
            out.write("".join(f"{row}\n" for row in rows) + "\n")
        else:
            why = "the output is no terminal" if size is None else "it does not fit the terminal"
            out.write(f"(QR code left out: {why}; --qr shows it anyway)\n\n")
    out.flush()


async def connect_device(ctx: Context, args: argparse.Namespace) -> int:
    """The device grant (RFC 8628) from this terminal: a code to enter, the provider polled."""
    provider = await ctx.broker.provider_for(
        args.provider, redirect_uri=_callback_if_known(ctx), actor="cli", device=True
    )
    start = await ctx.broker.begin_device(provider, actor="cli", scopes=args.scopes)
    name = start.spec.name
    outcome: DeviceOutcome | None = None
    try:
        show_code(start, force_qr=args.qr, no_qr=args.no_qr, out=sys.stdout)
        with anyio.move_on_after(args.timeout):
            async with terminal.waiting(
                sys.stderr,
                deadline_ms=start.expires_at,
                now_ms=ctx.engine.now_ms,
                wait=terminal.DEVICE,
            ):
                outcome = await ctx.broker.complete_device(start.flow.id, actor="cli")
    except BaseException:
        # Ctrl-C or an error while polling: the code must stop working here
        with anyio.CancelScope(shield=True):
            await _cancel_quietly(ctx, start.flow.id)
        raise
    if outcome is None:
        await _cancel_quietly(ctx, start.flow.id)
        again = f"agentd connect {provider} --device"
        print(f"⌛ no answer within {int(args.timeout)} s; run {again} again")
        return EXIT["flow_failed"]
    if outcome.ok:
        tokens = outcome.tokens
        expiry = "unknown expiry"
        if tokens is not None and tokens.expires is not None:
            expiry = f"token expires {when(tokens.expires)}"
        granted = tokens.scope.split() if tokens is not None and tokens.scope else start.flow.scopes
        source = tokens.extra.get("scope_source") if tokens is not None else "requested"
        print(f"✅ {name} connected (scopes: {scope_text(granted, source)}; {expiry})")
        return EXIT["ok"]
    if outcome.status == "denied":
        print(f"❌ {name} authorization was denied")
    elif outcome.status == "expired":
        print(f"⌛ the code expired; run agentd connect {provider} --device again")
    else:
        detail = outcome.description or outcome.error
        print(f"❌ {name} authorization {outcome.status}" + (f": {detail}" if detail else ""))
    return EXIT["flow_failed"]
