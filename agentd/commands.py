"""The ``agentd`` subcommands. Imported only after argument parsing (see cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TextIO

import anyio

from agentd.cli import EXIT
from agentd.config import Config, check_files, load_config
from flowengine.diagrams import DotUnavailableError
from flowengine.errors import (
    BrokerError,
    ConfigError,
    CredentialsMissingError,
    FlowError,
    FlowNotFound,
    NotConnectedError,
    ProviderTransientError,
    ReauthorizationRequired,
    UnknownProviderError,
)

__all__ = ["dispatch", "exit_code_for"]

log = logging.getLogger("agentd")


def exit_code_for(err: BaseException) -> int:
    """One place that maps the engine's errors to documented exit codes."""
    if isinstance(err, NotConnectedError):
        return EXIT["not_connected"]
    if isinstance(err, ReauthorizationRequired):
        return EXIT["reauthorize"]
    if isinstance(err, ProviderTransientError):
        return EXIT["unavailable"]
    if isinstance(err, FlowError):
        return EXIT["flow_failed"]
    if isinstance(err, (ConfigError, CredentialsMissingError)):
        return EXIT["usage"]
    return EXIT["error"]


def _when(ms: int | None) -> str:
    if ms is None:
        return "unknown"
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC)
    delta = ms / 1000 - time.time()
    rel = f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
    return f"{stamp:%Y-%m-%d %H:%M:%S}Z ({rel})"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def scope_text(scopes: Sequence[str], source: object) -> str:
    """Scopes as shown to the owner; marked when the provider did not say what it granted."""
    text = " ".join(scopes) or "-"
    if source == "requested":
        text += " (requested; the provider did not say what it granted)"
    return text


def _table(rows: list[list[str]], header: list[str], out: TextIO) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))
    out.write(line.rstrip() + "\n")
    for row in rows:
        out.write(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() + "\n"
        )


def _run(config: Config, body: Callable[[Any], Awaitable[int]]) -> int:
    from agentd.context import open_context

    async def main() -> int:
        async with open_context(config) as ctx:
            return await body(ctx)

    return anyio.run(main)


# ---------------------------------------------------------------------- commands


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    if args.action == "path":
        print(config.file)
        return EXIT["ok"]
    if args.action == "show":
        print(f"# {config.file}{'' if config.file_exists else ' (not present: defaults)'}")
        print(json.dumps(config.redacted(), indent=2, sort_keys=True))
        return EXIT["ok"] if not config.problems else EXIT["usage"]
    if not config.problems:
        where = config.file if config.file_exists else f"{config.file} (absent, defaults used)"
        print(f"configuration OK: {where}")
        return EXIT["ok"]
    for problem in config.problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(config.problems)} problem(s)", file=sys.stderr)
    return EXIT["usage"]


def cmd_providers(args: argparse.Namespace, config: Config) -> int:
    from flowengine.catalog import load_catalog
    from flowengine.credentials import CredentialStore

    catalog = load_catalog()
    stored = set(CredentialStore(config.credentials_path).providers())
    if args.provider:
        spec = catalog.get(args.provider)
        _provider_detail(spec, spec.id in stored, sys.stdout)
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
    _table(rows, ["PROVIDER", "NAME", "PKCE", "CLIENT AUTH", "SCOPES", "CREDENTIALS"], sys.stdout)
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


def _provider_detail(spec: Any, has_credentials: bool, out: TextIO) -> None:
    """``agentd providers <id>``: every field, where it was checked, what is unverified."""
    from flowengine.catalog import CLAIM_FIELDS

    out.write(f"{spec.name} ({spec.id})\n")
    out.write(f"documentation: {spec.docs_url or 'none named'}\n")
    for source in spec.sources:
        out.write(f"               {source}\n")
    out.write(f"credentials:   {'stored' if has_credentials else 'not stored'}\n")
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
            shown = value.describe() if value is not None else "unknown"
        elif name == "revocation_url" and value is None:
            shown = "none (no RFC 7009 endpoint)"
        elif name == "scope_separator":
            shown = "space" if value == " " else repr(value)
        else:
            shown = _value(value)
        mark = "UNVERIFIED" if name in unverified else ("verified" if name in spec.verified else "")
        rows.append([name, shown, mark])
    out.write("\n")
    _table(rows, ["FIELD", "VALUE", "CHECKED"], out)
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

    spec = load_catalog().get(args.provider)
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
    async def body(ctx: Any) -> int:
        token = await ctx.broker.get_token(args.provider, actor="cli")
        sys.stdout.write(token + "\n")
        return EXIT["ok"]

    return _run(config, body)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        statuses = await ctx.broker.status()
        if not statuses:
            print("no connections yet: agentd connect <provider>")
            return EXIT["ok"]
        rows = [
            [
                s.provider,
                s.state,
                _when(s.expires),
                _when(s.last_refresh) if s.last_refresh else "never",
                _when(s.reconnect_by) if s.reconnect_by else "-",
                scope_text(s.scopes, s.scope_source),
            ]
            for s in statuses
        ]
        header = ["PROVIDER", "STATE", "TOKEN EXPIRES", "LAST REFRESH", "RECONNECT BY", "SCOPES"]
        _table(rows, header, sys.stdout)
        return EXIT["ok"]

    return _run(config, body)


def cmd_flows(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        flows = await ctx.engine.list_flows(
            provider=args.provider, states=args.states, limit=args.limit
        )
        rows = [
            [f.id, f.provider, f.state.value, _when(f.created_at), f.actor, f.error_code or ""]
            for f in flows
        ]
        _table(rows, ["FLOW", "PROVIDER", "STATE", "CREATED", "BY", "ERROR"], sys.stdout)
        return EXIT["ok"]

    return _run(config, body)


def cmd_flow(args: argparse.Namespace, config: Config) -> int:
    async def body(ctx: Any) -> int:
        record = await ctx.engine.inspect(args.flow_id)
        flow = record.flow
        print(f"flow {flow.id}  {flow.provider}  {flow.state.value}")
        print(f"  redirect_uri  {flow.redirect_uri}")
        print(f"  requested     {' '.join(flow.scopes) or '-'}")
        tokens = ctx.tokens.read(flow.provider)
        if tokens is not None and tokens.flow_id == flow.id and tokens.scope is not None:
            granted = scope_text(tokens.scope.split(), tokens.extra.get("scope_source"))
            print(f"  scopes        {granted}")
        print(f"  started by    {flow.actor}" + (f" (chat {flow.chat_id})" if flow.chat_id else ""))
        if flow.error_code:
            print(f"  error         {flow.error_code}: {flow.error_description or ''}")
        rows = [
            [
                str(e.seq),
                datetime.fromtimestamp(e.at / 1000, tz=UTC).strftime("%H:%M:%S.%f")[:-3],
                e.from_state.value if e.from_state else "",
                e.trigger.value if e.trigger else "create",
                e.to_state.value,
                e.actor,
                json.dumps(e.detail, sort_keys=True) if e.detail else "",
            ]
            for e in record.events
        ]
        _table(rows, ["SEQ", "AT (UTC)", "FROM", "TRIGGER", "TO", "ACTOR", "DETAIL"], sys.stdout)
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

    # prompts first, outside the event loop, so that Ctrl-C at them ends the command
    ensure_credentials(
        load_catalog(),
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
    if args.command != "demo" and not config.problems:
        config = replace(config, problems=tuple(check_files(config)))
    if config.problems and args.command not in ("config", "demo"):
        for problem in config.problems:
            print(f"error: {problem}", file=sys.stderr)
        print("run `agentd config check` for the whole list", file=sys.stderr)
        return EXIT["usage"]
    try:
        command = COMMANDS[args.command] if args.command in COMMANDS else cmd_integration
        return command(args, config)
    except UnknownProviderError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.suggestions:
            print(f"did you mean: {', '.join(err.suggestions)}?", file=sys.stderr)
        print("see `agentd providers` for the catalog", file=sys.stderr)
        return EXIT["usage"]
    except FlowNotFound as err:
        # only `flow` and `diagram --flow` look flows up by id: a mistyped id is a usage error
        print(f"error: {err.message}; see `agentd flows`", file=sys.stderr)
        return EXIT["usage"]
    except CredentialsMissingError as err:
        print(f"error: {err.message}; run: agentd credentials {err.provider}", file=sys.stderr)
        return EXIT["usage"]
    except DotUnavailableError:
        print(
            "error: --format svg needs Graphviz's `dot`, which is not installed"
            " (Debian/Ubuntu: sudo apt-get install graphviz; or use --format mermaid or dot)",
            file=sys.stderr,
        )
        return EXIT["usage"]
    except BrokerError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT["interrupted"]
