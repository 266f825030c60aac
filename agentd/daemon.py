"""``agentd serve``: the API, the refresh timer and the bot in one anyio task group.

Start-up order: open the ledger and stores, plan the listener (bind address, redirect URI,
TLS mode; asks tailscaled when reachable), bind (the tailnet listener, and the local
socket ``<state dir>/agentd.sock`` for same-host commands), recover crashed flows and
start the timer, then the bot (it never delays start-up: Telegram logs in in the
background). The API completes the flows it owns as their callbacks arrive; the bot, in
this process, waits for their outcomes through the engine, never over the network.

SIGHUP reloads the configuration file: the ``[[access]]`` policy, the ``[remote]`` rate
limit and audit retention take effect at once (one log line says what changed, never a
value of another section); changes elsewhere are named and wait for a restart. A file
with problems is refused whole and the running configuration stays.

Shutdown on SIGINT/SIGTERM: Hypercorn stops accepting and finishes in-flight requests,
then the timer and the bot are cancelled. Ledger transitions are shielded transactions,
so one that has begun commits; a token answer is in the vault before anything else
happens and auth.json writes are atomic renames, and the timer's start-up finishes
whatever a kill interrupted (see flowengine/broker.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
from quart import Quart

from agentd import systemd
from agentd.config import Config, check_access, check_files, load_config
from agentd.context import (
    Context,
    api_settings,
    api_token,
    handout_rate,
    open_context,
    retention,
    timer_policy,
)
from agentd.exits import EXIT
from agentd.local_client import socket_path
from api.app import create_app, stop_waiters
from api.serve import ServePlan, plan_serving
from api.serve import serve as serve_api
from api.settings import ApiSettings
from api.tailscale import LocalAPI, TailscaleCLI, TailscaleClient
from api.tokens import configure_access
from flowengine.errors import BrokerError
from flowengine.timer import RefreshTimer

__all__ = ["reload_changes", "run_daemon", "serve", "tailscale_client", "timer_policy"]

log = logging.getLogger("agentd.daemon")

_BIND_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}


def configure_logging(verbose: bool = False) -> None:
    # libraries that log SQL parameters, headers or request lines stay at WARNING (agentd.logs)
    from agentd.logs import configure_logging as configure

    configure(verbose=verbose, default=logging.INFO, force=True)


def tailscale_client(settings: ApiSettings) -> TailscaleClient | None:
    """LocalAPI when tailscaled's socket is there, else the CLI when installed, else None."""
    if os.path.exists(settings.localapi_socket):
        return LocalAPI(settings.localapi_socket, whois_timeout=settings.whois_timeout)
    if shutil.which("tailscale"):
        return TailscaleCLI()
    return None


async def _watch_signals(stop: anyio.Event) -> None:
    """Set ``stop`` on SIGINT/SIGTERM; return as soon as ``stop`` is set by anyone."""
    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    stop.set()
                    return

        tg.start_soon(listen)
        await stop.wait()
        tg.cancel_scope.cancel()


async def run_daemon(
    config: Config,
    *,
    stop: anyio.Event | None = None,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until ``stop`` is set (or a signal arrives); ``task_status.started(plan)``."""
    stop = stop or anyio.Event()
    settings = api_settings(
        config, api_token=api_token(config), local_socket=socket_path(config.state_dir)
    )
    tailscale = tailscale_client(settings)
    async with open_context(config) as ctx:
        plan = await plan_serving(settings, tailscale=tailscale)
        app = create_app(
            ctx.engine,
            settings=settings,
            catalog=ctx.catalog,
            tailscale=tailscale,
            broker=ctx.broker,
            redirect_uri=plan.redirect_uri,
            own_addresses=plan.own_addresses,
            userspace=plan.userspace,
        )
        configure_access(app, policy=config.access, rate=handout_rate(config))
        log.info("token hand-outs (/v1/tokens): %s", _grants(config))
        await ctx.engine.ledger.prune_handouts(ctx.broker.retention, ctx.engine.now_ms())
        timer = RefreshTimer(ctx.broker, policy=timer_policy(config))
        requests = _track_requests(app)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop)
            plan = await tg.start(
                partial(
                    serve_api,
                    app,
                    settings,
                    shutdown_trigger=stop.wait,
                    tailscale=tailscale,
                    plan=plan,
                )
            )
            components = ["api"]
            async with anyio.create_task_group() as workers:
                # wakes waiters (bot, long-polls) on commits of other processes (the CLI)
                workers.start_soon(ctx.engine.watch_external)
                await workers.start(timer.run)
                components.append(f"timer (every {timer.policy.interval:g} s)")
                await workers.start(partial(_watch_reload, config, app, ctx))
                if config.telegram_enabled:
                    await _start_bot(workers, ctx, config, plan)
                    components.append("telegram bot")
                    off = ""
                else:
                    off = f"; telegram bot off: no telegram.bot_token in {config.file}"
                _log_start(plan, settings, components, off)
                _service_ready(workers, plan, components)
                task_status.started(plan)
                await stop.wait()
                systemd.notify("STOPPING=1\nSTATUS=stopping: finishing in-flight requests")
                log.info("stopping: finishing in-flight requests")
                stop_waiters(app)
                workers.cancel_scope.cancel()
            # leaving tg waits for serve_api: Hypercorn drains in-flight requests first
        # ... but a request still running at its graceful timeout (a long-poll) is left
        # behind by Quart: end it while the ledger is still open
        await _drain_requests(requests)
    if isinstance(tailscale, LocalAPI):
        await tailscale.aclose()
    log.info("stopped")


async def _watch_reload(
    config: Config, app: Quart, ctx: Context, *, task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    """SIGHUP: read the configuration again and apply what can change while running."""
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            config = _reload(config, app, ctx)


def _reload(current: Config, app: Quart, ctx: Context) -> Config:
    new = load_config(current.file if current.file_exists else None)
    if not new.problems:
        new = replace(new, problems=tuple(check_files(new) + check_access(new)))
    if new.problems:
        log.error(
            "reload of %s refused (%d problem(s); the first: %s); the running configuration"
            " stays (see `agentd config check`)",
            new.file,
            len(new.problems),
            new.problems[0],
        )
        return current
    configure_access(app, policy=new.access, rate=handout_rate(new))
    ctx.broker.retention = retention(new)
    log.info("reloaded %s: %s", new.file, "; ".join(reload_changes(current, new)) or "no change")
    return new


def _grants(config: Config) -> str:
    rules = config.access.rules
    if not rules:
        return "nobody (no [[access]] in the configuration)"
    return "; ".join(f"{', '.join(r.who)}: {', '.join(r.providers)}" for r in rules)


def reload_changes(old: Config, new: Config) -> list[str]:
    """What a reload changed, as short phrases: grants by identity, ``[remote]`` values, and
    the names (never the values) of other keys that wait for a restart."""
    out: list[str] = []
    before, after = old.access.pairs(), new.access.pairs()
    for verb, pairs in (("granted", after - before), ("withdrawn", before - after)):
        by_who: dict[str, list[str]] = {}
        for who, provider in sorted(pairs):
            by_who.setdefault(who, []).append(provider)
        out += [f"{verb} {who}: {', '.join(providers)}" for who, providers in by_who.items()]
    before_values, after_values = dict(old.items()), dict(new.items())
    changed = [key for key, value in after_values.items() if before_values[key] != value]
    out += [
        f"{key} {before_values[key]:g} -> {after_values[key]:g}"
        for key in changed
        if key.startswith("remote.")
    ]
    pending = [key for key in changed if not key.startswith("remote.")]
    if pending:
        out.append(f"restart to apply {', '.join(pending)}")
    return out


def _track_requests(app: Quart) -> set[asyncio.Task[Any]]:
    """The tasks running the app's requests right now (filled by a before_request hook)."""
    tasks: set[asyncio.Task[Any]] = set()

    @app.before_request
    async def track() -> None:
        task = asyncio.current_task()
        if task is not None and task not in tasks:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return tasks


async def _drain_requests(tasks: set[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel requests that outlived Hypercorn and wait for them (ledger writes are shielded)."""
    pending = [task for task in tasks if not task.done()]
    if not pending:
        return
    log.info("ending %d request(s) still open after the graceful timeout", len(pending))
    for task in pending:
        task.cancel()
    await asyncio.wait(pending, timeout=timeout)


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's stream callback reports a connection task cancelled at Hypercorn's
    graceful timeout as an error; a cancellation at shutdown is expected."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        log.debug("cancelled at shutdown: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


async def _main(config: Config) -> None:
    asyncio.get_running_loop().set_exception_handler(_ignore_cancelled)
    await run_daemon(config)


async def _start_bot(workers: Any, ctx: Context, config: Config, plan: ServePlan) -> None:
    from bot import BotSettings, run_bot
    from integrations import Services, bind_commands, discover

    bot_settings = BotSettings.from_config(
        config.telegram, redirect_uri=plan.redirect_uri, state_dir=config.state_dir
    )
    services = Services(
        broker=ctx.broker,
        http=ctx.http,
        clock=ctx.engine.clock,
        actor="bot",
        tz=bot_settings.timezone,
    )
    commands = bind_commands(discover(), services)
    await workers.start(
        partial(run_bot, bot_settings, broker=ctx.broker, engine=ctx.engine, commands=commands)
    )


def _service_ready(workers: Any, plan: ServePlan, components: list[str]) -> None:
    """Tell systemd (Type=notify) that we serve, and ping its watchdog from the event loop:
    a loop that hangs stops the pings, and systemd restarts the service."""
    status = f"serving {plan.redirect_uri}; running: {', '.join(components)}"
    if systemd.notify(f"READY=1\nSTATUS={status}"):
        log.debug("told systemd: ready")
    interval = systemd.watchdog_interval()
    if interval is not None:
        workers.start_soon(_watchdog, interval)


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await anyio.sleep(interval)


def _log_start(
    plan: ServePlan, settings: ApiSettings, components: list[str], off: str = ""
) -> None:
    tls = {
        "tls": "TLS terminated here (certificate from tailscaled or cert_file)",
        "serve": "plain HTTP on loopback behind `tailscale serve` (TLS at tailscaled)",
        "plain-test": "plain HTTP (tests only)",
    }[plan.mode]
    log.info("redirect URI: %s", plan.redirect_uri)
    log.info("listening on: %s", ", ".join(plan.binds) if len(plan.binds) > 1 else plan.base_url)
    if plan.local_socket:
        log.info("local socket: %s (same-host commands)", plan.local_socket)
    log.info("TLS mode: %s", tls)
    log.info(
        "owner check: %s",
        ", ".join(settings.allowed_logins) if settings.allowed_logins else "any tailnet user",
    )
    # one line: what runs, and why a component that could run does not
    log.info("running: %s%s", ", ".join(components), off)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def serve(config: Config, *, verbose: bool = False) -> int:
    """``agentd serve``: 0 after a clean shutdown, 2 when the listener cannot bind.

    Errors raised inside the task group arrive as exception groups; a single
    :class:`BrokerError` is re-raised as itself so the CLI maps it to its exit code.
    """
    configure_logging(verbose)
    try:
        anyio.run(_main, config, backend="asyncio")
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1 or not isinstance(leaves[0], BrokerError | OSError):
            raise
        error: BaseException = leaves[0]
    except (BrokerError, OSError) as err:
        error = err
    else:
        return EXIT["ok"]
    if isinstance(error, OSError) and error.errno in _BIND_ERRNOS:
        log.error(
            "cannot listen on %s:%s: %s (hint: is another agentd serve running? see server.host"
            " and server.port in %s)",
            config.server.host or "the Tailscale address",
            config.server.port,
            error.strerror or error,
            config.file,
        )
        return EXIT["usage"]
    raise error
