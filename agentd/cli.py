"""The ``agentd`` command.

Exit codes: agentd/exits.py (the README has the same table).

No input gives a traceback: :func:`main` turns anything unexpected into one line naming the
exception's type (never its text, which could hold a secret) and exit code 1.

``agentd token`` has a fast path: it reads the provider's two vault slots and prints a
still-valid token without importing the async stack (httpx, anyio, aiosqlite). Its cost
does not grow with the number of connections. It takes the slow path (which refreshes,
finishes an interrupted refresh or re-publishes auth.json) when the token is inside its
margin, a refresh is in flight or was interrupted, or auth.json is not known to hold the
vault's latest pair. ``agentd token <p> --from URL`` (or with ``$AGENTD_URL`` set) asks a
daemon on another machine instead (agentd/remote.py); the fast path never looks there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from agentd.exits import ALWAYS, EXIT, EXIT_MEANINGS

__all__ = ["build_parser", "main"]

#: ``flows --limit`` range
MAX_LIMIT = 10_000
#: ``connect --timeout`` range, seconds (a day)
MAX_TIMEOUT = 86_400.0


def _token_fast_path(argv: Sequence[str]) -> int | None:
    """Print a fresh token from the vault without the async stack; None = take the slow path."""
    if len(argv) != 2 or argv[0] != "token" or argv[1].startswith("-"):
        return None
    import os

    if os.environ.get("AGENTD_URL"):
        return None  # a remote daemon's token was asked for (agentd/remote.py)
    import time

    from agentd.config import load_config
    from flowengine.schedule import TokenTimes, use_margin, valid_for
    from flowengine.tokens import signature_of
    from flowengine.vault import Vault, vault_root

    config = load_config()
    if config.problems:
        return None
    try:
        vault = Vault(vault_root(config.state_dir))
        pv = vault.provider(argv[1])
        record = pv.read()
        if record is None or not record.settled or record.tokens is None:
            return None
        # auth.json must be known to hold this pair, else the slow path re-publishes it
        if pv.published_seq() != record.seq:
            return None
        if signature_of(config.auth_file) != vault.published_signature():
            return None
    except Exception:  # noqa: BLE001 - the slow path reports errors properly
        return None
    tokens = record.tokens
    if tokens.expires is None:
        return None
    times = TokenTimes(tokens.expires, tokens.obtained_at, bool(tokens.refresh))
    if not valid_for(times, time.time(), use_margin(times)):
        return None
    sys.stdout.write(tokens.access + "\n")
    return 0


def _limit(text: str) -> int:
    """``--limit``: a whole number 1..MAX_LIMIT."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LIMIT}")
    return value


def _seconds(text: str) -> float:
    """``--timeout``: seconds, a finite number above 0 and at most MAX_TIMEOUT."""
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_TIMEOUT:g} seconds")
    return value


def _printable(text: str, *, limit: int = 200) -> bool:
    return 0 < len(text) <= limit and all(0x20 < ord(ch) < 0x7F for ch in text)


def _provider(text: str) -> str:
    """A provider id as typed: printable ASCII (the catalog suggests close matches)."""
    if not _printable(text, limit=64):
        raise argparse.ArgumentTypeError(
            "a provider id is lowercase letters, digits, '-' or '_' (see `agentd providers`)"
        )
    return text


def _target(text: str) -> str:
    """``connect``'s argument: a provider id, or the https URL of a server to discover."""
    if "://" not in text:
        return _provider(text)
    if not _printable(text, limit=2048):
        raise argparse.ArgumentTypeError("a URL is printable ASCII without spaces")
    return text


def _flow_id(text: str) -> str:
    if not _printable(text, limit=64):
        raise argparse.ArgumentTypeError("a flow id is letters and digits (see `agentd flows`)")
    return text


def _who(text: str) -> str:
    """``audit --who``: a login or a tag as the audit names it."""
    if not 0 < len(text) <= 254 or not all(0x20 < ord(ch) < 0x7F for ch in text):
        raise argparse.ArgumentTypeError(
            "an identity is a login (user@example.com) or a tag (tag:name), as `agentd audit`"
            " shows it"
        )
    return text


def _scope(text: str) -> str:
    """One scope token (RFC 6749 §3.3: printable ASCII without space, '"' or '\\')."""
    if not _printable(text) or '"' in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a scope (RFC 6749 §3.3)")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with one line per usage error (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT["usage"], f"error: {message} (see `{self.prog} --help`)\n")


def _epilog(examples: Sequence[str], codes: Sequence[int]) -> str:
    lines = ["examples:", *(f"  {e}" for e in examples), "", "exit codes:"]
    lines += [f"  {code:<3}  {EXIT_MEANINGS[code]}" for code in codes]
    lines.append(f"  {', '.join(map(str, ALWAYS))}: as for every command (see `agentd --help`)")
    return "\n".join(lines)


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help="show the version"
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("agentd-oauth")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed)"
        sys.stdout.write(f"agentd {number} (Python {sys.version.split()[0]})\n")
        parser.exit(0)


def _command(
    sub: argparse._SubParsersAction[_Parser],
    name: str,
    summary: str,
    description: str,
    *,
    examples: Sequence[str],
    codes: Sequence[int],
) -> _Parser:
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=_epilog(examples, codes),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _json_flag(parser: argparse.ArgumentParser, shape: str) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print JSON instead of a table (stable shape: docs/json/{shape}.schema.json)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agentd",
        description="Self-hosted OAuth 2.0 connection broker for a personal AI agent.\n\n"
        "Connect a provider once (`agentd connect oura` or `connect oura` in Telegram);\n"
        "from then on `agentd token oura` prints an access token that is always fresh.",
        epilog="exit codes:\n"
        + "\n".join(f"  {code:<3}  {text}" for code, text in EXIT_MEANINGS.items())
        + "\n\nevery command has its own help: agentd <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="agentd.toml to use (default: $AGENTD_CONFIG, else"
        " $XDG_CONFIG_HOME/agent/agentd.toml)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG (secrets never logged)"
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _command(
        sub,
        "serve",
        "run the daemon: HTTPS API, refresh timer and Telegram bot",
        "Run the daemon until SIGINT/SIGTERM: the OAuth callback over HTTPS on the tailnet,\n"
        "the refresh timer and, when [telegram] is configured, the bot. Under systemd it\n"
        "reports readiness and watchdog pings (Type=notify) and logs without timestamps\n"
        "when journald reads its output (packaging/systemd/agentd.service).",
        examples=["agentd serve", "sudo systemctl enable --now agentd"],
        codes=(0, 2),
    )

    p = _command(
        sub,
        "connect",
        "connect a provider (or an MCP server by its URL) from this terminal",
        "Start an authorization: prints the link (and a QR code when it fits the terminal),\n"
        "waits for the browser to come back to the daemon's callback, stores the tokens.\n"
        "Asks for the client id and secret first if none are stored. Needs `agentd serve`\n"
        "running (it receives the callback). Ctrl-C cancels the link.\n\n"
        "A URL (an MCP server, any OAuth protected resource or authorization server) is\n"
        "discovered and the agent registers itself as its client (RFC 9728, 8414, 7591).\n"
        "--device uses a code entered on any device instead of a link (RFC 8628): no\n"
        "daemon needed, for when the browser cannot reach this machine.",
        examples=[
            "agentd connect oura",
            "agentd connect google --scope openid --scope email",
            "agentd connect https://mcp.example.com/mcp",
            "agentd connect github --device",
        ],
        codes=(0, 2, 5, 6),
    )
    p.add_argument(
        "provider",
        type=_target,
        help="provider id (see `agentd providers`), or the URL of a server to discover",
    )
    p.add_argument(
        "--device",
        action="store_true",
        help="a code to enter on any device instead of a link back here (RFC 8628)",
    )
    p.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        type=_scope,
        metavar="SCOPE",
        help="ask for this scope instead of the catalog's (repeatable)",
    )
    qr = p.add_mutually_exclusive_group()
    qr.add_argument("--no-qr", action="store_true", help="never print the QR code")
    qr.add_argument(
        "--qr",
        action="store_true",
        help="print the QR code even when it does not fit the terminal (default: only if it fits)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="give up waiting for the browser after this long (default: %(default)g)",
    )

    p = _command(
        sub,
        "token",
        "print a fresh access token (refreshing if needed)",
        "Print the provider's access token on standard output, refreshed first when it\n"
        "expires within a minute (exactly one refresh across processes). Nothing else is\n"
        "printed on standard output, so it fits in $(...). With --from (or $AGENTD_URL) it\n"
        "asks the daemon on another machine of the tailnet, whose [[access]] policy must\n"
        "grant this machine the provider; nothing is written to this machine's disk.",
        examples=[
            'curl -H "Authorization: Bearer $(agentd token oura)" https://...',
            "agentd token oura --from https://host.tailnet.ts.net:8400",
        ],
        codes=(0, 2, 3, 4, 5),
    )
    p.add_argument("provider", type=_provider, help="provider id")
    p.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="ask the daemon at this address on the tailnet instead"
        " (https://<host>.<tailnet>.ts.net:8400; default: $AGENTD_URL)",
    )

    p = _command(
        sub,
        "audit",
        "tokens handed to other machines: when, to whom, from where",
        "Every access token the daemon handed to another machine of the tailnet\n"
        "(GET /v1/tokens/<provider>), newest first: when, the identity ([[access]] names\n"
        "it: a login, or the device's tags), its node and address, the provider, and the\n"
        "first 8 hex digits of the token's SHA-256. Kept [remote] audit_days.",
        examples=["agentd audit --provider oura", "agentd audit --who tag:agent --json"],
        codes=(0, 2),
    )
    p.add_argument("--provider", type=_provider, help="only this provider's hand-outs")
    p.add_argument("--who", type=_who, help="only this identity's (a login or a tag)")
    p.add_argument(
        "--limit", type=_limit, default=50, help=f"at most this many (1-{MAX_LIMIT}; default 50)"
    )
    _json_flag(p, "audit")

    p = _command(
        sub,
        "status",
        "connections with their health; whether the daemon runs",
        "One row per connection: its state, its health (ok, refresh due, refresh failing\n"
        "since ...: reason, needs reconnect, expires soon without refresh), token expiry,\n"
        "last refresh, the date by which the provider makes you reconnect, the scopes and\n"
        "the last error. The last line says whether the daemon answers.",
        examples=[
            "agentd status",
            "agentd status --json | jq '.connections[] | select(.health.status != \"ok\")'",
        ],
        codes=(0, 2),
    )
    _json_flag(p, "status")

    from flowengine.states import FlowState

    states = ", ".join(state.value for state in FlowState)
    p = _command(
        sub,
        "flows",
        "recent authorization flows",
        "The newest flows first, each with its state, when and by whom it was started, and\n"
        f"its error. States: {states}.",
        examples=["agentd flows --provider oura --state failed", "agentd flows --json"],
        codes=(0, 2),
    )
    p.add_argument("--provider", type=_provider, help="only this provider's flows")
    p.add_argument(
        "--state",
        action="append",
        dest="states",
        choices=[state.value for state in FlowState],
        metavar="STATE",
        help="only flows in this state (repeatable)",
    )
    p.add_argument(
        "--limit",
        type=_limit,
        default=20,
        help=f"at most this many, 1-{MAX_LIMIT} (default: %(default)s)",
    )
    _json_flag(p, "flows")

    p = _command(
        sub,
        "flow",
        "one flow with its ledger",
        "One flow: redirect URI, requested and granted scopes, who started it, its error,\n"
        "and every transition the ledger recorded (never a secret).",
        examples=["agentd flow 4f2a9c", "agentd flow 4f2a9c --json"],
        codes=(0, 2),
    )
    p.add_argument("flow_id", type=_flow_id, help="a flow id from `agentd flows`")
    _json_flag(p, "flow")

    p = _command(
        sub,
        "diagram",
        "state diagram of the machine or of one flow",
        "The flow state machine as Mermaid, Graphviz dot or SVG; with --flow, the path\n"
        "that flow took through it.",
        examples=["agentd diagram --format svg -o machine.svg", "agentd diagram --flow 4f2a9c"],
        codes=(0, 2),
    )
    p.add_argument("--flow", dest="flow_id", type=_flow_id, help="highlight this flow's path")
    p.add_argument(
        "--format",
        choices=("mermaid", "svg", "dot"),
        default="mermaid",
        help="output format (default: %(default)s; svg needs Graphviz)",
    )
    p.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")

    p = _command(
        sub,
        "providers",
        "the provider catalog, or one provider in detail",
        "The built-in catalog merged with $XDG_CONFIG_HOME/agent/providers.toml. With an\n"
        "id: every field, the documentation it was checked against, the unverified ones.\n"
        "A broken providers.toml: every problem is listed (file, key, hint).",
        examples=["agentd providers", "agentd providers strava --json"],
        codes=(0, 2),
    )
    p.add_argument(
        "provider", nargs="?", type=_provider, help="show this provider's fields and their sources"
    )
    _json_flag(p, "providers")

    p = _command(
        sub,
        "disconnect",
        "revoke and forget a provider's tokens",
        "Revoke the grant at the provider where it has an endpoint for that (RFC 7009),\n"
        "then remove the tokens from auth.json.",
        examples=["agentd disconnect oura"],
        codes=(0, 2, 3, 5),
    )
    p.add_argument("provider", type=_provider, help="provider id")

    p = _command(
        sub,
        "credentials",
        "store a provider's client id and secret",
        "Store the client id and secret of your app at the provider (0600 in the state\n"
        "dir). Asked for on the terminal (the secret is not echoed) unless given; the\n"
        "safer way than sending them to the bot, whose chats are not end-to-end encrypted.",
        examples=[
            "agentd credentials oura",
            "pass oura/secret | agentd credentials oura --client-id abc --secret-stdin",
        ],
        codes=(0, 2),
    )
    p.add_argument("provider", type=_provider, help="provider id")
    p.add_argument("--client-id", help="the client id (default: asked for)")
    p.add_argument(
        "--secret-stdin", action="store_true", help="read the client secret from standard input"
    )

    p = _command(
        sub,
        "config",
        "show or check the configuration",
        "check: every problem of agentd.toml, the environment overrides and providers.toml\n"
        "       (file, key, hint).\n"
        "show:  the configuration in use as TOML, the redirect URI to register first, derived\n"
        "       values resolved and marked; on a broken file the values as written.\n"
        "path:  the configuration file's path.",
        examples=["agentd config check", "agentd config show"],
        codes=(0, 2),
    )
    p.add_argument("action", choices=("check", "show", "path"), help="check, show or path")

    p = _command(
        sub,
        "demo",
        "run the whole flow against a simulated provider",
        "The whole story on throwaway state: a simulated provider, the daemon over TLS, a\n"
        "connection, a refresh, a revoked grant. No account, no network. Needs the demo\n"
        "extra (trustme).",
        examples=["agentd demo", "make demo"],
        codes=(0, 2),
    )
    p.add_argument("--keep", action="store_true", help="keep the demo's temp directory")

    _add_integrations(sub)
    return parser


def _add_integrations(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``agentd <integration> …`` for every integration the package finds (none named here)."""
    from integrations import discover

    taken = set(sub.choices)
    for integration in discover():
        if integration.name in taken:
            print(f"warning: integration {integration.name!r} shadows a command", file=sys.stderr)
            continue
        summary = integration.summary or integration.title
        p = sub.add_parser(
            integration.name,
            help=summary,
            description=f"{summary} (integration: integrations/{integration.name}).",
            epilog=_epilog([f"agentd {integration.name} --help"], (0, 2, 3, 4, 5)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        integration.configure_cli(p)
        p.set_defaults(integration=integration)


def _run(args_list: list[str]) -> int:
    fast = _token_fast_path(args_list)
    if fast is not None:
        return fast
    parser = build_parser()
    args = parser.parse_args(args_list)
    if not args.command:
        parser.print_help()
        return EXIT["usage"]
    from agentd import commands

    return commands.dispatch(args)


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush is quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (tests): nothing to flush later
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The ``agentd`` entry point: an exit code for every outcome, never a traceback."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _run(args_list)
        sys.stdout.flush()  # here, not at exit: a closed pipe must surface as BrokenPipeError
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT["interrupted"]
    except BrokenPipeError:
        _silence_stdout()
        return EXIT["broken_pipe"]
    except Exception as err:  # noqa: BLE001 - the last resort: one line, never a traceback
        # only the type: an exception's text may quote a secret (a URL with a code, a body)
        print(
            f"error: unexpected internal error ({type(err).__name__}); please report it with"
            " the command that caused it",
            file=sys.stderr,
        )
        return EXIT["error"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
