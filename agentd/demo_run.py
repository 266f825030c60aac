"""``agentd demo``: the whole connection flow on the real stack, against SIMULATED providers.

Real parts: Hypercorn over TLS (a throwaway CA made with trustme), the Quart API with its
tailnet guard, the SQLite flow ledger, auth.json (in a temp dir), the broker, the refresh
timer, and every integration found by ``integrations.discover()`` with its API client, CLI
and chart. Simulated: each integration's provider (agentd/simoauth.py, the OAuth server in
the provider's dialect, plus the integration's own simulated data API) and the browser
(httpx following the redirect). No network, no account, nothing outside the temp dir is
touched. The first integration is walked through step by step; the others connect the
same way, then every integration runs its own demo commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import io
import re
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import trustme
from quart import Quart

from agentd.config import load_config
from agentd.context import open_context
from agentd.formatting import EVENT_HEADER, event_rows, lifetime_text, table_lines
from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from api.app import create_app
from api.oauth import settled
from api.serve import serve
from api.settings import ApiSettings
from bot.dialogue import ConversationState, NotificationDue, Send, step
from flowengine.broker import Broker
from flowengine.catalog import Catalog, ProviderSpec, RefreshLifetime, load_catalog
from flowengine.clock import Clock, ManualClock, SystemClock
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.diagrams import DotUnavailableError, flow_diagram
from flowengine.engine import FlowEngine
from flowengine.protocol import parse_callback
from flowengine.schedule import TimerPolicy
from flowengine.states import FlowState
from flowengine.timer import RefreshTimer
from flowengine.tokens import TokenStore
from integrations import Integration, Services, Simulator, discover

__all__ = ["run_demo"]

CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret-not-a-real-one"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mask(secret: str | None) -> str:
    """What the demo shows of a secret: a short prefix and a fingerprint, never the value."""
    if not secret:
        return "-"
    digest = hashlib.sha256(secret.encode()).hexdigest()[:8]
    return f"{secret[:4]}… (sha256 {digest})"


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.step = 0
        self.started = time.perf_counter()

    def banner(self, text: str) -> None:
        line = "=" * len(text)
        self.out.write(f"{line}\n{text}\n{line}\n")

    def section(self, title: str) -> None:
        self.step += 1
        elapsed = time.perf_counter() - self.started
        self.out.write(f"\n[{self.step}] {title}  (+{elapsed:.2f} s)\n")

    def say(self, text: str = "") -> None:
        self.out.write(f"    {text}\n" if text else "\n")

    def table(self, header: Sequence[str], rows: list[list[str]]) -> None:
        for line in table_lines(header, rows):
            self.say(line)


def _visible_text(page: str) -> str:
    match = re.search(r"<h1[^>]*>(.*?)</h1>", page, re.S)
    text = match.group(1) if match else page
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip()


@dataclasses.dataclass
class _Simulated:
    """One integration's simulated provider, served on its own port."""

    integration: Integration
    api: Simulator
    spec: ProviderSpec
    sim: SimOAuth
    app: Any
    settings: ApiSettings


def _sim_app(api: Simulator, clock: Clock, redirect: str, *, require_pkce: bool = False) -> Quart:
    """The simulated provider the demo connects to: the demo's client, ``redirect`` as its
    only redirect URI, consent given without asking."""
    return create_sim_app(
        api=api,
        clock=clock,
        clients={CLIENT_ID: CLIENT_SECRET},
        redirect_uris=[redirect],
        consent="allow",
        require_pkce=require_pkce,
    )


def _simulated_spec(base: ProviderSpec, api: Simulator, url: str) -> ProviderSpec:
    """The catalog entry, pointed at the simulator (its real paths, on localhost)."""
    d = api.dialect
    return dataclasses.replace(
        base,
        name=f"{base.name} (simulated)",
        authorize_url=url + d.authorize_path,
        token_url=url + d.token_path,
        revocation_url=url + d.revoke_path if d.revoke_path else None,
        api_base_url=url,
        use_pkce=True,  # the simulated server checks S256 whenever a challenge is sent
    )


def _quirks(spec: ProviderSpec) -> str:
    """What the catalog tells the engine about this provider beyond RFC 6749."""
    parts = [f"client auth {spec.token_auth_method}"]
    if spec.scope_separator != " ":
        parts.append(f"scopes joined with {spec.scope_separator!r}")
    for label, params in (
        ("with every token request", spec.token_params),
        ("with the code exchange", spec.exchange_params),
        ("with refreshes", spec.refresh_params),
    ):
        if params:
            sent = "&".join(f"{k}={v}" for k, v in params.items())
            parts.append(f"{sent} {label}")
    if spec.response_envelope:
        parts.append(
            f"answers inside {{{spec.envelope_status_key!r}, {spec.response_envelope!r}}}"
            " (a non-zero status is an error, even with HTTP 200)"
        )
    return "; ".join(parts)


async def _demo(root: Path, out: TextIO) -> int:
    p = _Printer(out)
    p.banner("agentd demo — the providers are SIMULATED (no network, no account)")
    p.say(f"working directory: {root}")

    # ------------------------------------------------------------------ setup
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    tls = root / "tls"
    tls.mkdir(mode=0o700)
    leaf.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tls / "key.pem"))
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)

    daemon_port = _free_port()
    redirect = f"https://localhost:{daemon_port}/oauth/callback"
    env = {
        "HOME": str(root),
        "AGENTD_PATHS_STATE_DIR": str(root / "state"),
        "AGENTD_PATHS_AUTH_FILE": str(root / "auth.json"),
    }
    config = load_config(env=env)
    common: dict[str, Any] = {
        "mode": "tls",
        "host": "127.0.0.1",
        "public_name": "localhost",
        "cert_file": tls / "cert.pem",
        "key_file": tls / "key.pem",
    }
    api_token = "demo-" + hashlib.sha256(str(root).encode()).hexdigest()[:24]
    daemon_settings = ApiSettings(port=daemon_port, api_token=api_token, **common)
    catalog = load_catalog(user_file=root / "providers.toml")
    clock = SystemClock()
    simulated: list[_Simulated] = []
    for integration in discover():
        api = integration.simulator(clock=clock)
        if api is None:
            continue
        if api.provider not in catalog:
            p.say(f"{integration.title}: skipped, {api.provider!r} is not in the built-in catalog")
            continue
        port = _free_port()
        app = _sim_app(api, clock, redirect, require_pkce=True)
        spec = _simulated_spec(catalog.get(api.provider), api, f"https://localhost:{port}")
        catalog.register(spec)
        settings = ApiSettings(port=port, api_token="unused", **common)
        simulated.append(_Simulated(integration, api, spec, get_sim(app), app, settings))
    if not simulated:
        p.say("no integration offers a simulator: nothing to show")
        return 1

    async with (
        httpx.AsyncClient(verify=client_ssl, timeout=10.0) as http,
        open_context(config, catalog=catalog, http=http) as ctx,
    ):
        for item in simulated:
            ctx.credentials.put(item.spec.id, ClientCredentials(CLIENT_ID, CLIENT_SECRET))
        app = create_app(
            ctx.engine,
            settings=daemon_settings,
            catalog=ctx.catalog,
            broker=ctx.broker,
            redirect_uri=redirect,
        )
        stop = anyio.Event()
        timer = RefreshTimer(ctx.broker, policy=TimerPolicy(interval=1.0))
        async with anyio.create_task_group() as tg:
            plan = await tg.start(partial(serve, app, daemon_settings, shutdown_trigger=stop.wait))
            for item in simulated:
                await tg.start(partial(serve, item.app, item.settings, shutdown_trigger=stop.wait))
            timer_scope = anyio.CancelScope()

            async def run_timer(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                with timer_scope:
                    await timer.run(task_status=task_status)

            await tg.start(run_timer)
            p.section("The stack is up")
            p.say(f"daemon API (Hypercorn, TLS, throwaway CA): {plan.base_url}")
            p.say(f"redirect URI:                              {plan.redirect_uri}")
            for item in simulated:
                p.say(f"{item.spec.name + ' (TLS):':<43}{item.spec.api_base_url}")
            p.say(f"ledger:    {config.ledger_path}")
            p.say(f"auth.json: {config.auth_file}")
            try:
                code = await _story(
                    p, ctx, http, client_ssl, simulated, plan.redirect_uri, api_token
                )
            finally:
                # close our keep-alive connections first so Hypercorn drains at once
                timer_scope.cancel()
                await http.aclose()
                stop.set()
    p.out.write(f"\nDone in {time.perf_counter() - p.started:.1f} s.\n")
    return code


async def _connect(
    p: _Printer,
    ctx: Any,
    http: httpx.AsyncClient,
    client_ssl: ssl.SSLContext,
    spec: ProviderSpec,
    redirect_uri: str,
    api_token: str,
    *,
    verbose: bool,
) -> str | None:
    """connect <provider> from the link to stored tokens; returns the flow id."""
    daemon_url = redirect_uri.removesuffix("/oauth/callback")
    start = await ctx.broker.begin(spec.id, redirect_uri=redirect_uri, actor="demo")
    shown = re.sub(r"(state=)[^&]+", r"\1…", start.authorize_url)
    if verbose:
        p.section(f"connect {spec.id}: a flow starts and the owner gets an authorization link")
        p.say(f"flow {start.flow.id}: state 256 bits, PKCE S256")
    else:
        p.section(f"connect {spec.id}: the same flow, in the provider's own dialect")
        p.say(f"catalog quirks: {_quirks(spec)}")
    p.say(f"authorization URL: {shown}")

    if verbose:
        p.section("The browser: the provider asks for consent and redirects to the callback")
    async with httpx.AsyncClient(verify=client_ssl) as browser:
        answer = await browser.get(start.authorize_url)
        location = answer.headers.get("location", "")
        if verbose:
            p.say(f"provider answered {answer.status_code}, redirect to {location.split('?')[0]}")
        if answer.status_code != 302 or not location.startswith(daemon_url):
            p.say(f"the simulated provider did not redirect back ({location.split('?')[0]})")
            return None
        page = await browser.get(location)
    p.say(f'callback answered {page.status_code}: "{_visible_text(page.text)}"')
    if verbose:
        p.say(
            "headers: "
            + ", ".join(
                f"{h}: {page.headers.get(h)}"
                for h in ("cache-control", "referrer-policy", "x-content-type-options")
            )
        )
        p.section("The daemon exchanged the code with the verifier; the bot hears the outcome")
    flow = await ctx.engine.wait_flow(start.flow.id, until=settled, timeout=10)
    tokens = ctx.tokens.read(spec.id)
    if flow.state is not FlowState.STORED or tokens is None:
        p.say(f"not connected: {flow.state.value} {flow.error_code or ''}")
        return None
    if verbose:
        p.say("the callback's own exchange stored the tokens before the page answered")
    expires = datetime.fromtimestamp((tokens.expires or 0) / 1000, tz=UTC)
    p.say(
        f"✅ {spec.name} connected: access {_mask(tokens.access)}, refresh {_mask(tokens.refresh)}"
    )
    p.say(f"   expires {expires:%Y-%m-%d %H:%M:%S}Z, stored in auth.json (mode 0600)")
    return str(start.flow.id)


async def _replay(http: httpx.AsyncClient, spec: ProviderSpec, refresh: str | None) -> str:
    """Send an old refresh token again, as an attacker with a copy would."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh or "",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        **spec.token_params,
        **spec.refresh_params,
    }
    answer = await http.post(spec.token_url, data=form)
    body = answer.json() if answer.content else {}
    if spec.response_envelope and isinstance(body, dict) and spec.envelope_status_key in body:
        status = body[spec.envelope_status_key]
        verdict = "accepted!" if status == 0 else f"refused ({body.get('error', '')})"
        return f"HTTP {answer.status_code}, {spec.envelope_status_key} {status}: {verdict}"
    error = body.get("error") if answer.status_code >= 400 else "accepted!"
    return f"HTTP {answer.status_code} {error}"


async def _story(
    p: _Printer,
    ctx: Any,
    http: httpx.AsyncClient,
    client_ssl: ssl.SSLContext,
    simulated: list[_Simulated],
    redirect_uri: str,
    api_token: str,
) -> int:
    first = simulated[0]
    spec = first.spec
    flow_id = await _connect(p, ctx, http, client_ssl, spec, redirect_uri, api_token, verbose=True)
    if flow_id is None:
        return 1
    await _print_ledger(p, ctx, flow_id, "The flow ledger (one row per transition)")

    p.section("The flow's path through the state machine")
    mermaid = await ctx.engine.flow_diagram(flow_id, fmt="mermaid")
    target = ctx.config.state_dir / f"flow-{flow_id}.md"
    target.write_text(f"```mermaid\n{mermaid}```\n", encoding="utf-8")
    p.say(f"Mermaid: {target}")
    try:
        record = await ctx.engine.inspect(flow_id)
        svg = await anyio.to_thread.run_sync(partial(flow_diagram, record, fmt="svg"))
        svg_file = target.with_suffix(".svg")
        svg_file.write_text(svg, encoding="utf-8")
        p.say(f"SVG:     {svg_file}")
    except DotUnavailableError:
        p.say("SVG:     skipped (Graphviz `dot` is not installed)")

    p.section("A forced refresh: the provider rotates the refresh token")
    old = ctx.tokens.read(spec.id)
    new = await ctx.broker.refresh(spec.id, actor="demo", force=True)
    p.say(f"refresh token before: {_mask(old.refresh)}")
    p.say(f"refresh token after:  {_mask(new.refresh)}")
    verdict = await _replay(http, spec, old.refresh)
    p.say(f"replaying the OLD refresh token: {verdict} (rotation works)")
    p.say(f"simulated provider counters: {_counter_line(first.sim.counters_snapshot())}")
    token = await ctx.broker.get_token(spec.id, actor="demo")
    p.say(f"agentd token {spec.id} -> {_mask(token)} (fresh, from auth.json, no request)")
    await _print_ledger(p, ctx, flow_id, "The ledger after the refresh", last=3)

    for item in simulated[1:]:
        other = await _connect(
            p, ctx, http, client_ssl, item.spec, redirect_uri, api_token, verbose=False
        )
        if other is None:
            return 1
        rotated = await ctx.broker.refresh(item.spec.id, actor="demo", force=True)
        p.say(f"forced refresh: new refresh token {_mask(rotated.refresh)}")
        p.say(f"simulated provider counters: {_counter_line(item.sim.counters_snapshot())}")

    for item in simulated:
        if not item.integration.demo_commands:
            continue
        p.section(f"{item.integration.title} with the stored token: the integration's commands")
        for args in item.integration.demo_commands:
            if not await _run_command(p, ctx, http, item.integration, args):
                return 1
    return await _short_lived_grant(p, ctx.config.state_dir, first)


async def _short_lived_grant(p: _Printer, state_dir: Path, item: _Simulated) -> int:
    """A grant that ends on its own, on a separate ledger whose clock the demo moves."""
    clock = ManualClock(time.time())
    api = item.integration.simulator(clock=clock)
    if api is None:  # pragma: no cover - the item was chosen for having one
        return 0
    redirect = "https://demo.invalid/oauth/callback"
    app = _sim_app(api, clock, redirect)
    base = "https://short-lived.invalid"
    lifetime = RefreshLifetime("absolute", days=5)
    spec = dataclasses.replace(
        _simulated_spec(item.spec, api, base),
        id=f"{item.spec.id}-short",
        name=f"{item.integration.title} (simulated, 5-day grants)",
        refresh_lifetime=lifetime,
        use_pkce=False,
    )
    p.section("A grant that ends on its own: warned 3 days before and on the last day")
    p.say(f"catalog rule of {spec.id}: the grant ends {lifetime_text(lifetime)}")
    p.say("(a separate ledger and a clock the demo moves forward; the bot's texts as sent)")
    engine = await FlowEngine.open(state_dir / "short-lived.sqlite3", clock=clock)
    try:
        # Quart types its ASGI call with its own TypedDicts, httpx with plain mappings
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport) as http:
            credentials = CredentialStore(state_dir / "short-lived-credentials.json")
            credentials.put(spec.id, ClientCredentials(CLIENT_ID, CLIENT_SECRET))
            broker = Broker(
                engine,
                catalog=Catalog({spec.id: spec}),
                credentials=credentials,
                tokens=TokenStore(state_dir / "short-lived-auth.json"),
                http=http,
            )
            start = await broker.begin(spec.id, redirect_uri=redirect, actor="demo")
            answer = await http.get(start.authorize_url.replace(base, "http://sim"))
            callback = parse_qs(urlsplit(answer.headers["location"]).query)
            await engine.record_callback(parse_callback(callback))
            await broker.complete_state(start.state, actor="demo")
            (status,) = await broker.status()
            when = datetime.fromtimestamp((status.reconnect_by or 0) / 1000, tz=UTC)
            p.say(f"connected; agentd status: RECONNECT BY {when:%Y-%m-%d %H:%M}Z")
            timer = RefreshTimer(broker, policy=TimerPolicy(interval=1.0))
            await timer.start_up()
            deadline = (status.reconnect_by or 0) / 1000
            owners = ConversationState(owners=frozenset({1}))
            recorded: list[list[str]] = []
            for label, at in (
                ("2 days later", deadline - 3 * 86_400 + 60),
                ("4 days later", deadline - 12 * 3600),
            ):
                clock.set(at)
                report = await timer.sweep()
                p.say(f"+ {label}: the timer sweeps ({len(report.lifetime_warned)} warning)")
                for note in await engine.notifications():
                    stamp = datetime.fromtimestamp(note.at / 1000, tz=UTC)
                    recorded.append(
                        [str(note.id), f"{stamp:%Y-%m-%d %H:%M}", note.kind, str(note.flow_id)]
                    )
                    due = NotificationDue(
                        note.id, note.kind, note.provider, spec.name, data=note.data
                    )
                    for effect in step(owners, due)[1]:
                        if isinstance(effect, Send):
                            p.say(f"  bot: {effect.text}")
                            p.say(f"       [{' | '.join(b.text for b in effect.buttons)}]")
                    await engine.mark_delivered(note.id)
            clock.set(deadline - 3600)
            await timer.sweep()  # the same day again: nothing new
            recorded += [
                [str(n.id), "", n.kind, "(repeated!)"] for n in await engine.notifications()
            ]
            p.say("the ledger's notifications (one per warning, never repeated):")
            p.table(["ID", "AT (UTC)", "KIND", "FLOW"], recorded)
    finally:
        await engine.close()
    return 0


async def _run_command(
    p: _Printer, ctx: Any, http: httpx.AsyncClient, integration: Integration, args: tuple[str, ...]
) -> bool:
    """``agentd <integration> <args…>`` in-process, its output shown indented."""
    parser = argparse.ArgumentParser(prog=f"agentd {integration.name}")
    integration.configure_cli(parser)
    namespace = parser.parse_args(args)
    buffer = io.StringIO()
    services = Services(
        broker=ctx.broker,
        http=http,
        clock=ctx.engine.clock,
        actor="demo",
        out=buffer,
        err=buffer,
    )
    p.say(f"$ agentd {integration.name} {' '.join(args)}")
    try:
        code = await integration.run_cli(namespace, services)
    except Exception as err:  # noqa: BLE001 - shown, and the demo fails
        p.say(f"  failed: {type(err).__name__}: {err}")
        return False
    lines = buffer.getvalue().splitlines()
    for line in lines[:8]:
        p.say(f"  {line}")
    if len(lines) > 8:
        p.say(f"  … {len(lines) - 8} more lines")
    return code == 0


def _counter_line(counters: dict[str, Any]) -> str:
    flat: list[str] = []
    for key, value in sorted(counters.items()):
        if isinstance(value, dict):
            flat += [f"{key}.{k}={v}" for k, v in sorted(value.items())]
        else:
            flat.append(f"{key}={value}")
    wanted = [c for c in flat if "refresh" in c or c.startswith("token_requests")]
    return ", ".join(wanted or flat)


async def _print_ledger(p: _Printer, ctx: Any, flow_id: str, title: str, last: int = 0) -> None:
    p.section(title)
    record = await ctx.engine.inspect(flow_id)
    events = record.events[-last:] if last else record.events
    p.table(EVENT_HEADER[:-1], event_rows(events, detail=False))


def run_demo(*, keep: bool = False, out: TextIO | None = None) -> int:
    """Run the demo; returns the process exit code."""
    stream = out or sys.stdout
    root = Path(tempfile.mkdtemp(prefix="agentd-demo-"))
    try:
        code = anyio.run(_demo, root, stream)
    except Exception as err:  # noqa: BLE001 - the demo reports, never dumps a traceback
        stream.write(f"\ndemo failed: {type(err).__name__}: {err}\n")
        code = 1
    finally:
        if keep:
            stream.write(f"kept {root}\n")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return code
