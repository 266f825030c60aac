"""The ``agentd`` subcommands. Imported only after argument parsing (see cli.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TextIO

import anyio

from agentd.config import Config, check_access, check_files, load_config
from agentd.errortable import error_lines, exit_name
from agentd.exits import EXIT
from agentd.formatting import (
    EVENT_HEADER,
    ago,
    event_rows,
    lifetime_text,
    print_json,
    scope_text,
    table,
    when,
)
from flowengine.errors import (
    BrokerError,
    ConfigError,
)

__all__ = ["dispatch", "exit_code_for"]

log = logging.getLogger("agentd")


def exit_code_for(err: BaseException) -> int:
    """The documented exit code of ``err`` (agentd/errortable.py holds the table)."""
    return EXIT[exit_name(err)]


def _run(config: Config, body: Callable[[Any], Awaitable[int]]) -> int:
    from agentd.context import open_context

    async def main() -> int:
        async with open_context(config) as ctx:
            return await body(ctx)

    return anyio.run(main)


# ---------------------------------------------------------------------- commands


def catalog_problems() -> list[ConfigError]:
    """Every problem of the provider catalog (built-in and the user's providers.toml)."""
    from flowengine.catalog import check_catalog

    return check_catalog()


def _print_problems(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    print(f"{len(lines)} problem(s)", file=sys.stderr)


def _catalog_line(err: ConfigError) -> str:
    if err.hint:
        return err.message
    return f"{err.message} (hint: fix it in that file; see `agentd providers <id>` for the fields)"


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    if args.action == "path":
        print(config.file)
        return EXIT["ok"]
    if args.action == "show":
        from agentd.configview import derive, render

        derived = {} if config.problems else anyio.run(derive, config)
        sys.stdout.write(render(config, derived))
        return EXIT["ok"] if not config.problems else EXIT["usage"]
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    lines = [str(problem) for problem in config.problems]
    lines += [_catalog_line(err) for err in catalog_problems()]
    if not lines:
        from flowengine import paths

        where = config.file if config.file_exists else f"{config.file} (absent, defaults used)"
        print(f"configuration OK: {where}")
        catalog = paths.user_catalog_path()
        print(f"providers OK: {catalog if catalog.is_file() else 'built-in catalog only'}")
        return EXIT["ok"]
    _print_problems(lines)
    return EXIT["usage"]


def cmd_providers(args: argparse.Namespace, config: Config) -> int:
    from flowengine.catalog import load_catalog
    from flowengine.credentials import CredentialStore

    try:
        catalog = load_catalog(discovered=config.discovered_path)
    except ConfigError:
        _print_problems([_catalog_line(err) for err in catalog_problems()])
        return EXIT["usage"]
    credentials = CredentialStore(config.credentials_path)
    stored = set(credentials.providers())
    if args.provider:
        spec = catalog.get(args.provider)
        registration = credentials.registration(spec.id)
        if args.json:
            detail = {**spec.public(), "credentials_stored": spec.id in stored}
            if registration is not None:
                detail["registered_by_agent"] = {
                    k: registration.get(k) for k in ("issuer", "registered_at", "redirect_uris")
                }
            print_json({"provider": detail})
            return EXIT["ok"]
        _provider_detail(spec, spec.id in stored, sys.stdout, registration)
        return EXIT["ok"]
    if args.json:
        listing = [
            {
                "id": spec.id,
                "name": spec.name,
                "pkce": spec.use_pkce,
                "client_auth": spec.token_auth_method,
                "scopes": list(spec.scopes),
                "credentials_stored": spec.id in stored,
                "unverified": spec.unverified_fields(),
            }
            for spec in catalog.all()
        ]
        print_json({"providers": listing})
        return EXIT["ok"]
    rows = []
    for spec in catalog.all():
        rows.append(
            [
                spec.id,
                spec.name,
                "yes" if spec.use_pkce else "no",
                spec.token_auth_method,
                " ".join(spec.scopes) or "-",
                "stored" if spec.id in stored else "-",
            ]
        )
    table(rows, ["PROVIDER", "NAME", "PKCE", "CLIENT AUTH", "SCOPES", "CREDENTIALS"], sys.stdout)
    return EXIT["ok"]


def _value(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value) if isinstance(value, frozenset | set) else value
        return ", ".join(str(v) for v in items) or "-"
    return str(value)


def _provider_detail(
    spec: Any, has_credentials: bool, out: TextIO, registration: dict[str, Any] | None = None
) -> None:
    """``agentd providers <id>``: every field, where it was checked, what is unverified."""
    from flowengine.catalog import CLAIM_FIELDS

    out.write(f"{spec.name} ({spec.id})\n")
    out.write(f"documentation: {spec.docs_url or 'none named'}\n")
    for source in spec.sources:
        out.write(f"               {source}\n")
    out.write(f"credentials:   {'stored' if has_credentials else 'not stored'}\n")
    if registration is not None:
        registered = when(registration.get("registered_at"))
        out.write(f"client:        registered by this agent (RFC 7591) {registered}\n")
    unverified = set(spec.unverified_fields())
    always = ("revocation_url", "rotates_refresh_tokens", "refresh_lifetime")
    rows = []
    for name in CLAIM_FIELDS:
        value = getattr(spec, name)
        if name.startswith("envelope_") and not spec.response_envelope:
            continue
        if name not in unverified and name not in spec.verified and name not in always:
            continue  # left at its default: the catalog claims nothing
        if name == "refresh_lifetime":
            shown = lifetime_text(value) if value is not None else "unknown"
        elif name == "revocation_url" and value is None:
            shown = "none (no RFC 7009 endpoint)"
        elif name == "scope_separator":
            shown = "space" if value == " " else repr(value)
        else:
            shown = _value(value)
        mark = "UNVERIFIED" if name in unverified else ("verified" if name in spec.verified else "")
        rows.append([name, shown, mark])
    out.write("\n")
    table(rows, ["FIELD", "VALUE", "CHECKED"], out)
    if spec.notes:
        out.write(f"\nnotes: {spec.notes}\n")
    if unverified:
        out.write(
            f"\n{len(unverified)} unverified field(s): {', '.join(sorted(unverified))}"
            " — not confirmed by the documentation above; check before relying on them\n"
        )


def cmd_credentials(args: argparse.Namespace, config: Config) -> int:
    from agentd.prompts import ask, check_credential, read_secret_line
    from flowengine.catalog import load_catalog
    from flowengine.credentials import ClientCredentials, CredentialStore

    spec = load_catalog(discovered=config.discovered_path).get(args.provider)
    if args.client_id is not None:
        client_id = check_credential(args.client_id, key="--client-id", what="client id")
    elif args.secret_stdin or not sys.stdin.isatty():
        # standard input carries the secret (or is no terminal): never read the id from it
        raise ConfigError(
            "required when standard input carries the secret or is not a terminal",
            key="--client-id",
        )
    else:
        client_id = ask(f"{spec.name} client id: ", key="--client-id", what="client id")
    secret: str | None = None
    if spec.needs_secret:
        what = f"{spec.name} client secret"
        missing = f"{spec.name} needs a client secret"
        if not args.secret_stdin and not sys.stdin.isatty():
            # never prompt on /dev/tty behind a script's back
            raise ConfigError(
                "standard input is not a terminal: pipe the secret in with --secret-stdin",
                key="client_secret",
            )
        if args.secret_stdin:
            secret = read_secret_line(key="client_secret", what=what, missing=missing)
        else:
            secret = ask(
                f"{what} (not echoed): ",
                key="client_secret",
                what=what,
                secret=True,
                missing=missing,
            )
    CredentialStore(config.credentials_path).put(spec.id, ClientCredentials(client_id, secret))
    print(f"stored client credentials for {spec.name} in {config.credentials_path}")
    return EXIT["ok"]


def cmd_token(args: argparse.Namespace, config: Config) -> int:
    import os

    url = args.from_url if args.from_url is not None else os.environ.get("AGENTD_URL", "")
    if args.from_url is not None or url:
        return _remote_token(args.provider, url, config)

    async def body(ctx: Any) -> int:
        token = await ctx.broker.get_token(args.provider, actor="cli")
        sys.stdout.write(token + "\n")
        return EXIT["ok"]

    return _run(config, body)


def _remote_token(provider: str, url: str, config: Config) -> int:
    """``agentd token <p> --from URL``: from the daemon on another machine, nothing on disk."""
    from agentd.remote import RemoteTokens, check_base_url
    from flowengine.trust import client_ssl_context

    base = check_base_url(url)  # a bad URL before any TLS set-up
    trust = client_ssl_context(config.client.ca_file or None)
    sys.stdout.write(RemoteTokens(base, ssl_context=trust).get(provider) + "\n")
    return EXIT["ok"]


def cmd_audit(args: argparse.Namespace, config: Config) -> int:
    """``agentd audit``: the token hand-outs the daemon recorded, newest first."""

    async def body(ctx: Any) -> int:
        rows = await ctx.broker.handouts(provider=args.provider, who=args.who, limit=args.limit)
        if args.json:
            print_json({"handouts": [r.public() for r in rows]})
            return EXIT["ok"]
        if not rows:
            print("no token hand-outs recorded (other machines get tokens through [[access]])")
            return EXIT["ok"]
        cells = [
            [
                datetime.fromtimestamp(r.at / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S"),
                r.who,
                r.node or "-",
                r.address,
                r.provider,
                r.token_sha,
            ]
            for r in rows
        ]
        table(cells, ["AT (UTC)", "WHO", "NODE", "ADDRESS", "PROVIDER", "TOKEN SHA"], sys.stdout)
        return EXIT["ok"]

    return _run(config, body)


async def probe_daemon(ctx: Any) -> dict[str, Any]:
    """Whether ``agentd serve`` answers on its local socket: ``{reachable, socket, error}``."""
    from agentd.local_client import local_daemon, socket_path

    path = socket_path(ctx.config.state_dir)
    if not path.is_socket():
        return {"reachable": False, "socket": str(path), "error": "no socket"}
    try:
        async with local_daemon(ctx.config.state_dir):
            pass
    except BrokerError as err:  # a socket left by a daemon that died, or one that refused
        cause = err.__cause__
        reason = type(cause).__name__ if cause is not None else err.code
        return {"reachable": False, "socket": str(path), "error": reason}
    return {"reachable": True, "socket": str(path), "error": None}


def _health_text(health: Any, now: float) -> str:
    if health.kind == "ok":
        return "ok"
    if health.kind == "refresh_due":
        return "refresh due (on next use)"
    if health.kind == "refresh_failing":
        since = f" since {ago(health.since, now)}" if health.since else ""
        return f"refresh failing{since}: {health.reason}"
    if health.kind == "needs_reconnect":
        return "needs reconnect" + (f": {health.reason}" if health.reason else "")
    if health.kind == "expires_soon":
        return f"expires soon without refresh ({ago(health.since, now)})"
    return str(health.kind)  # pragma: no cover - every kind is named above


async def _connections(ctx: Any) -> list[tuple[dict[str, Any], Any]]:
    """Every connection as ``status --json`` shows it, with its :class:`Health`."""
    from agentd.health import assess, last_error

    now_ms = ctx.engine.now_ms()
    out: list[dict[str, Any]] = []
    healths = []
    for s in await ctx.broker.status():
        events: tuple[Any, ...] = ()
        description = None
        if s.flow_id is not None and s.state != "external":
            record = await ctx.engine.inspect(s.flow_id)
            events, description = record.events, record.flow.error_description
        health = assess(
            state=s.state,
            expires=s.expires,
            has_refresh_token=s.has_refresh_token,
            error_code=s.error_code,
            events=events,
            now_ms=now_ms,
        )
        error = last_error(events, description=description)
        out.append(
            {
                "provider": s.provider,
                "name": s.name,
                "state": s.state,
                "health": health.public(),
                "expires": s.expires,
                "last_refresh": s.last_refresh,
                "reconnect_by": s.reconnect_by,
                "has_refresh_token": s.has_refresh_token,
                "scopes": list(s.scopes),
                "scope_source": getattr(s, "scope_source", "granted"),
                "flow_id": s.flow_id,
                "last_error": error.public() if error else None,
            }
        )
        healths.append(health)
    return list(zip(out, healths, strict=True))


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        connections = await _connections(ctx)
        daemon = await probe_daemon(ctx)
        now = ctx.engine.now_ms() / 1000
        if args.json:
            shown = [c for c, _ in connections]
            print_json(
                {"generated_at": ctx.engine.now_ms(), "daemon": daemon, "connections": shown}
            )
            return EXIT["ok"]
        if not connections:
            print("no connections yet: agentd connect <provider>")
        else:
            rows = [
                [
                    c["provider"],
                    c["state"],
                    _health_text(health, now),
                    when(c["expires"], now),
                    when(c["last_refresh"], now) if c["last_refresh"] else "never",
                    when(c["reconnect_by"], now) if c["reconnect_by"] else "-",
                    scope_text(c["scopes"], c["scope_source"]),
                    _error_text(c["last_error"], now),
                ]
                for c, health in connections
            ]
            header = [
                "PROVIDER",
                "STATE",
                "HEALTH",
                "TOKEN EXPIRES",
                "LAST REFRESH",
                "RECONNECT BY",
                "SCOPES",
                "LAST ERROR",
            ]
            table(rows, header, sys.stdout)
        print()
        if daemon["reachable"]:
            print(f"daemon: running ({daemon['socket']}); it refreshes tokens in the background")
        else:
            print(
                f"daemon: not running ({daemon['error']} at {daemon['socket']}): tokens are"
                " refreshed only when asked for (agentd token); start it with `agentd serve`"
                " or `systemctl start agentd`"
            )
        return EXIT["ok"]

    return _run(config, body)


def _error_text(error: dict[str, Any] | None, now: float) -> str:
    if error is None:
        return "-"
    return f"{error['code']} ({ago(error['at'], now)})"


def _flow_json(flow: Any) -> dict[str, Any]:
    return {
        "id": flow.id,
        "provider": flow.provider,
        "state": flow.state.value,
        "created_at": flow.created_at,
        "updated_at": flow.updated_at,
        "actor": flow.actor,
        "chat_id": flow.chat_id,
        "redirect_uri": flow.redirect_uri,
        "scopes": list(flow.scopes),
        "uses_pkce": flow.uses_pkce,
        "deadline": flow.deadline,
        "token_expires_at": flow.token_expires_at,
        "error_code": flow.error_code,
        "error_description": flow.error_description,
        "grant": flow.grant,
    }


def cmd_flows(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        flows = await ctx.engine.list_flows(
            provider=args.provider, states=args.states, limit=args.limit
        )
        if args.json:
            print_json({"flows": [_flow_json(f) for f in flows]})
            return EXIT["ok"]
        rows = [
            [f.id, f.provider, f.state.value, when(f.created_at), f.actor, f.error_code or ""]
            for f in flows
        ]
        table(rows, ["FLOW", "PROVIDER", "STATE", "CREATED", "BY", "ERROR"], sys.stdout)
        return EXIT["ok"]

    return _run(config, body)


def cmd_flow(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        record = await ctx.engine.inspect(args.flow_id)
        flow = record.flow
        tokens = ctx.tokens.read(flow.provider)
        granted = None
        if tokens is not None and tokens.flow_id == flow.id and tokens.scope is not None:
            source = tokens.extra.get("scope_source")
            granted = {
                "scopes": tokens.scope.split(),
                "source": "requested" if source == "requested" else "granted",
            }
        if args.json:
            events = [
                {
                    "seq": e.seq,
                    "at": e.at,
                    "from": e.from_state.value if e.from_state else None,
                    "trigger": e.trigger.value if e.trigger else "create",
                    "to": e.to_state.value,
                    "actor": e.actor,
                    "detail": e.detail or {},
                }
                for e in record.events
            ]
            print_json({"flow": _flow_json(flow), "granted": granted, "events": events})
            return EXIT["ok"]
        print(f"flow {flow.id}  {flow.provider}  {flow.state.value}")
        print(f"  redirect_uri  {flow.redirect_uri}")
        print(f"  requested     {' '.join(flow.scopes) or '-'}")
        if granted is not None:
            print(f"  scopes        {scope_text(granted['scopes'], granted['source'])}")
        print(f"  started by    {flow.actor}" + (f" (chat {flow.chat_id})" if flow.chat_id else ""))
        if flow.error_code:
            print(f"  error         {flow.error_code}: {flow.error_description or ''}")
        table(event_rows(record.events), EVENT_HEADER, sys.stdout)
        return EXIT["ok"]

    return _run(config, body)


def cmd_diagram(args: argparse.Namespace, config: Config) -> int:
    from flowengine import diagrams

    if args.flow_id:

        async def body(ctx: Any) -> int:
            text = await ctx.engine.flow_diagram(args.flow_id, fmt=args.format)
            _emit(text, args.output)
            return EXIT["ok"]

        return _run(config, body)
    if args.format == "mermaid":
        text = diagrams.machine_mermaid()
    elif args.format == "dot":
        text = diagrams.machine_dot()
    else:
        text = diagrams.render_svg(diagrams.machine_dot())
    _emit(text, args.output)
    return EXIT["ok"]


def _emit(text: str, output: str | None) -> None:
    if not output:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, FileNotFoundError):
            reason = "its folder does not exist"
        elif isinstance(err, IsADirectoryError):
            reason = "it is a directory; give a file name"
        raise ConfigError(f"cannot write {output}: {reason}", key="--output") from None
    print(f"wrote {output}", file=sys.stderr)


def cmd_disconnect(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        spec = ctx.catalog.get(args.provider)
        result = await ctx.broker.disconnect(spec.id, actor="cli")
        if result.revoked_remotely:
            print(f"{spec.name}: revoked at the provider and removed from auth.json")
        elif result.has_revocation_endpoint:
            print(f"{spec.name}: removed from auth.json; the provider's revocation did not confirm")
        else:
            print(
                f"{spec.name}: removed from auth.json; {spec.name} has no revocation endpoint,"
                " revoke the app's access in your account settings there"
            )
        return EXIT["ok"]

    return _run(config, body)


def cmd_connect(args: argparse.Namespace, config: Config) -> int:
    from agentd.connect import connect, ensure_credentials
    from flowengine.catalog import load_catalog
    from flowengine.credentials import CredentialStore

    # prompts first, outside the event loop, so that Ctrl-C at them ends the command;
    # a URL is discovered and registers its own client
    if "://" not in args.provider:
        catalog = load_catalog(discovered=config.discovered_path)
        spec = catalog.get(args.provider)
        if args.device and not spec.device_authorization_url:
            # said before the credentials are asked for
            raise ConfigError(
                f"{spec.name} has no device authorization endpoint",
                key=f"providers.{spec.id}.device_authorization_url",
                hint=f"connect it with the browser link: agentd connect {spec.id}",
            )
        ensure_credentials(
            catalog,
            CredentialStore(config.credentials_path),
            args.provider,
            interactive=sys.stdin.isatty(),
        )
    return _run(config, lambda ctx: connect(ctx, args))


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from agentd.daemon import serve

    return serve(config, verbose=args.verbose)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    import importlib.util

    if importlib.util.find_spec("trustme") is None:
        # the demo's throwaway CA comes from trustme, a demo-only dependency
        print(
            "error: agentd demo needs the demo extra: pip install 'agentd-oauth[demo]'"
            " (or pipx inject agentd-oauth trustme; `make demo` installs it)",
            file=sys.stderr,
        )
        return EXIT["usage"]
    from agentd.demo_run import run_demo

    return run_demo(keep=args.keep)


def cmd_integration(args: argparse.Namespace, config: Config) -> int:
    """``agentd <integration> …``: the integration's own subcommand (see integrations/)."""
    from integrations import Services

    async def body(ctx: Any) -> int:
        services = Services(broker=ctx.broker, http=ctx.http, clock=ctx.engine.clock, actor="cli")
        return int(await args.integration.run_cli(args, services))

    return _run(config, body)


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "config": cmd_config,
    "providers": cmd_providers,
    "credentials": cmd_credentials,
    "token": cmd_token,
    "audit": cmd_audit,
    "status": cmd_status,
    "flows": cmd_flows,
    "flow": cmd_flow,
    "diagram": cmd_diagram,
    "disconnect": cmd_disconnect,
    "connect": cmd_connect,
    "serve": cmd_serve,
    "demo": cmd_demo,
}


def dispatch(args: argparse.Namespace) -> int:
    from agentd.logs import configure_logging

    configure_logging(verbose=args.verbose)
    config = load_config(args.config)
    if args.command != "demo":
        found = (check_files(config) if not config.problems else []) + check_access(config)
        config = replace(config, problems=config.problems + tuple(found))
    if config.problems and args.command not in ("config", "demo"):
        for problem in config.problems:
            print(f"error: {problem}", file=sys.stderr)
        print("run `agentd config check` for the whole list", file=sys.stderr)
        return EXIT["usage"]
    try:
        command = COMMANDS[args.command] if args.command in COMMANDS else cmd_integration
        return command(args, config)
    except BrokerError as err:
        for line in error_lines(err):
            print(line, file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT["interrupted"]
