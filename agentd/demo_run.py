"""``agentd demo``: the whole connection flow on the real stack, against a SIMULATED provider.

Real parts: Hypercorn over TLS (a throwaway CA made with trustme), the Quart API with its
tailnet guard, the SQLite flow ledger, auth.json (in a temp dir), the broker, the refresh
timer, the Dexcom API v3 client. Simulated: the provider (agentd/simprovider.py: OAuth
authorize/token/revoke with PKCE and rotating refresh tokens, Dexcom-shaped CGM data) and
the browser (httpx following the redirect). No network, no account, nothing outside the
temp dir is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import re
import shutil
import socket
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx
import trustme

from agentd.config import load_config
from agentd.context import open_context
from agentd.simprovider import create_sim_app, get_sim
from api.app import create_app
from api.serve import serve
from api.settings import ApiSettings
from flowengine.catalog import load_catalog
from flowengine.credentials import ClientCredentials
from flowengine.daemon_client import wait_for_code
from flowengine.dexcom import DexcomClient, format_reading
from flowengine.diagrams import DotUnavailableError, flow_diagram
from flowengine.refresh import RefreshTimer, TimerPolicy

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

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]
        for row in [header, *rows]:
            self.say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _visible_text(page: str) -> str:
    match = re.search(r"<h1[^>]*>(.*?)</h1>", page, re.S)
    text = match.group(1) if match else page
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip()


async def _demo(root: Path, out: TextIO) -> int:
    p = _Printer(out)
    p.banner("agentd demo — the provider is SIMULATED (no network, no account)")
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

    daemon_port, sim_port = _free_port(), _free_port()
    redirect = f"https://localhost:{daemon_port}/oauth/callback"
    sim_url = f"https://localhost:{sim_port}"
    env = {
        "HOME": str(root),
        "AGENTD_PATHS_STATE_DIR": str(root / "state"),
        "AGENTD_PATHS_AUTH_FILE": str(root / "auth.json"),
    }
    config = load_config(env=env)
    common = {
        "mode": "tls",
        "host": "127.0.0.1",
        "public_name": "localhost",
        "cert_file": tls / "cert.pem",
        "key_file": tls / "key.pem",
    }
    api_token = "demo-" + hashlib.sha256(str(root).encode()).hexdigest()[:24]
    daemon_settings = ApiSettings(port=daemon_port, api_token=api_token, **common)
    sim_settings = ApiSettings(port=sim_port, api_token="unused", **common)
    sim_app = create_sim_app(
        clients={CLIENT_ID: CLIENT_SECRET},
        redirect_uris=[redirect],
        consent="allow",
        require_pkce=True,
        access_ttl=7200,
    )
    sim = get_sim(sim_app)
    catalog = load_catalog(user_file=root / "providers.toml")
    spec = dataclasses.replace(
        catalog.get("dexcom"),
        name="Dexcom (simulated)",
        authorize_url=f"{sim_url}/v2/oauth2/login",
        token_url=f"{sim_url}/v2/oauth2/token",
        revocation_url=f"{sim_url}/v2/oauth2/revoke",
        api_base_url=sim_url,
        use_pkce=True,
    )
    catalog.register(spec)

    async with (
        httpx.AsyncClient(verify=client_ssl, timeout=10.0) as http,
        open_context(config, catalog=catalog, http=http) as ctx,
    ):
        ctx.credentials.put(spec.id, ClientCredentials(CLIENT_ID, CLIENT_SECRET))
        app = create_app(ctx.engine, settings=daemon_settings, catalog=ctx.catalog)
        stop = anyio.Event()
        timer = RefreshTimer(ctx.engine, ctx.broker, policy=TimerPolicy(interval=1.0))
        async with anyio.create_task_group() as tg:
            plan = await tg.start(partial(serve, app, daemon_settings, shutdown_trigger=stop.wait))
            await tg.start(partial(serve, sim_app, sim_settings, shutdown_trigger=stop.wait))
            timer_scope = anyio.CancelScope()

            async def run_timer(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                with timer_scope:
                    await timer.run(task_status=task_status)

            await tg.start(run_timer)
            p.section("The stack is up")
            p.say(f"daemon API (Hypercorn, TLS, throwaway CA): {plan.base_url}")
            p.say(f"redirect URI:                              {plan.redirect_uri}")
            p.say(f"simulated provider (TLS):                  {sim_url}")
            p.say(f"ledger:    {config.ledger_path}")
            p.say(f"auth.json: {config.auth_file}")
            try:
                code = await _story(
                    p, ctx, http, client_ssl, spec, sim, plan.redirect_uri, api_token
                )
            finally:
                # close our keep-alive connections first so Hypercorn drains at once
                timer_scope.cancel()
                await http.aclose()
                stop.set()
    p.out.write(f"\nDone in {time.perf_counter() - p.started:.1f} s.\n")
    return code


async def _story(
    p: _Printer,
    ctx: Any,
    http: httpx.AsyncClient,
    client_ssl: ssl.SSLContext,
    spec: Any,
    sim: Any,
    redirect_uri: str,
    api_token: str,
) -> int:
    daemon_url = redirect_uri.removesuffix("/oauth/callback")
    sim_url = spec.api_base_url
    # ---------------------------------------------------------- 1. the link
    start = await ctx.broker.begin(spec.id, redirect_uri=redirect_uri, actor="demo")
    p.section("connect dexcom: a flow starts and the owner gets an authorization link")
    p.say(f"flow {start.flow.id}: state 256 bits, PKCE S256")
    shown = re.sub(r"(state=)[^&]+", r"\1…", start.authorize_url)
    p.say(f"authorization URL: {shown}")

    # --------------------------------------------------------- 2. the browser
    p.section("The browser: the provider asks for consent and redirects to the callback")
    async with httpx.AsyncClient(verify=client_ssl) as browser:
        answer = await browser.get(start.authorize_url)
        location = answer.headers.get("location", "")
        p.say(f"provider answered {answer.status_code}, redirect to {location.split('?')[0]}")
        if answer.status_code != 302 or not location.startswith(daemon_url):
            p.say("the simulated provider did not redirect back: stopping")
            return 1
        page = await browser.get(location)
    p.say(f'callback answered {page.status_code}: "{_visible_text(page.text)}"')
    p.say(
        "headers: "
        + ", ".join(
            f"{h}: {page.headers.get(h)}"
            for h in ("cache-control", "referrer-policy", "x-content-type-options")
        )
    )

    # ---------------------------------------- 3. the bot side: pending + exchange
    p.section("The bot long-polls /oauth/pending/<state>, exchanges the code with the verifier")
    result = await wait_for_code(http, daemon_url, start.state, api_token, timeout=10)
    if result.status != "ready" or result.code is None:
        p.say(f"no code: {result.status} {result.reason or ''}")
        return 1
    p.say("pending answered: code received (handed out once; a second read gets 410)")
    tokens = await ctx.broker.complete(start.flow.id, result.code, actor="demo")
    expires = datetime.fromtimestamp((tokens.expires or 0) / 1000, tz=UTC)
    p.say(
        f"✅ {spec.name} connected: access {_mask(tokens.access)}, refresh {_mask(tokens.refresh)}"
    )
    p.say(f"   expires {expires:%Y-%m-%d %H:%M:%S}Z, stored in auth.json (mode 0600)")

    # -------------------------------------------------------------- 4. ledger
    await _print_ledger(p, ctx, start.flow.id, "The flow ledger (one row per transition)")

    # ------------------------------------------------------------- 5. diagram
    p.section("The flow's path through the state machine")
    mermaid = await ctx.engine.flow_diagram(start.flow.id, fmt="mermaid")
    target = ctx.config.state_dir / f"flow-{start.flow.id}.md"
    target.write_text(f"```mermaid\n{mermaid}```\n", encoding="utf-8")
    p.say(f"Mermaid: {target}")
    try:
        record = await ctx.engine.inspect(start.flow.id)
        svg = await anyio.to_thread.run_sync(partial(flow_diagram, record, fmt="svg"))
        svg_file = target.with_suffix(".svg")
        svg_file.write_text(svg, encoding="utf-8")
        p.say(f"SVG:     {svg_file}")
    except DotUnavailableError:
        p.say("SVG:     skipped (Graphviz `dot` is not installed)")

    # ----------------------------------------------------------- 6. refresh
    p.section("A forced refresh: the provider rotates the refresh token")
    old = ctx.tokens.read(spec.id)
    new = await ctx.broker.refresh(spec.id, actor="demo", force=True)
    p.say(f"refresh token before: {_mask(old.refresh)}")
    p.say(f"refresh token after:  {_mask(new.refresh)}")
    replay = await http.post(
        f"{sim_url}/v2/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": old.refresh,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    error = replay.json().get("error") if replay.status_code >= 400 else "accepted!"
    p.say(f"replaying the OLD refresh token: HTTP {replay.status_code} {error} (rotation works)")
    counters = sim.counters_snapshot()
    p.say(f"simulated provider counters: {_counter_line(counters)}")
    token = await ctx.broker.get_token(spec.id, actor="demo")
    p.say(f"agentd token dexcom -> {_mask(token)} (fresh, from auth.json, no request)")
    await _print_ledger(p, ctx, start.flow.id, "The ledger after the refresh", last=3)

    # ------------------------------------------------------------ 7. Dexcom
    p.section("Dexcom API v3 with the stored token: the last glucose readings")
    dexcom = DexcomClient.from_spec(spec, ctx.broker, http=http, actor="demo")
    now = datetime.now(UTC)
    readings = await dexcom.egvs(now - timedelta(minutes=30), now)
    for reading in readings[-6:]:
        p.say(format_reading(reading, "mg/dL", now=now))
    if readings:
        last = readings[-1]
        mgdl, mmol = last.value_in("mg/dL"), last.value_in("mmol/L")
        p.say(f"latest: {mgdl} mg/dL = {mmol} mmol/L {last.arrow}")
    else:
        p.say("no readings in the last 30 minutes")
    return 0


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
    rows = [
        [
            str(e.seq),
            datetime.fromtimestamp(e.at / 1000, tz=UTC).strftime("%H:%M:%S.%f")[:-3],
            e.from_state.value if e.from_state else "",
            e.trigger.value if e.trigger else "create",
            e.to_state.value,
            e.actor,
        ]
        for e in events
    ]
    p.table(["SEQ", "AT (UTC)", "FROM", "TRIGGER", "TO", "ACTOR"], rows)


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
