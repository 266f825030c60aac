"""The ``agentd`` command.

Exit codes (documented in README):

===  ==========================================================
0    success
1    unexpected error (bug, storage trouble)
2    usage or configuration error
3    not connected (no tokens for the provider)
4    re-authorization required (grant revoked/expired): connect again
5    provider unavailable (network, 5xx, 429, TLS): try again later
6    the authorization flow failed, was denied or expired
130  interrupted (Ctrl-C)
141  standard output closed early (e.g. piped into ``head``)
===  ==========================================================

No input gives a traceback: :func:`main` turns anything unexpected into one line naming the
exception's type (never its text, which could hold a secret) and exit code 1.

``agentd token`` has a fast path: it reads the provider's two vault slots and prints a
still-valid token without importing the async stack (httpx, anyio, aiosqlite). Its cost
does not grow with the number of connections. It takes the slow path (which refreshes,
finishes an interrupted refresh or re-publishes auth.json) when the token is inside its
margin, a refresh is in flight or was interrupted, or auth.json is not known to hold the
vault's latest pair.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["EXIT", "main"]

EXIT = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "not_connected": 3,
    "reauthorize": 4,
    "unavailable": 5,
    "flow_failed": 6,
    "interrupted": 130,
    "broken_pipe": 141,
}

#: ``flows --limit`` range
MAX_LIMIT = 10_000
#: ``connect --timeout`` range, seconds (a day)
MAX_TIMEOUT = 86_400.0


def _token_fast_path(argv: Sequence[str]) -> int | None:
    """Print a fresh token from the vault without the async stack; None = take the slow path."""
    if len(argv) != 2 or argv[0] != "token" or argv[1].startswith("-"):
        return None
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


def _flow_id(text: str) -> str:
    if not _printable(text, limit=64):
        raise argparse.ArgumentTypeError("a flow id is letters and digits (see `agentd flows`)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agentd",
        description="Self-hosted OAuth 2.0 connection broker for a personal AI agent.",
    )
    parser.add_argument("--config", help="path to agentd.toml (default: $AGENTD_CONFIG or XDG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("serve", help="run the daemon: HTTPS API, refresh timer and Telegram bot")

    p = sub.add_parser("connect", help="connect a provider from this terminal")
    p.add_argument("provider", type=_provider)
    p.add_argument(
        "--scope", action="append", dest="scopes", type=_scope, help="override the scopes"
    )
    p.add_argument("--no-qr", action="store_true", help="do not print a QR code")
    p.add_argument(
        "--timeout", type=_seconds, default=600.0, help="seconds to wait for the browser"
    )

    p = sub.add_parser("token", help="print a fresh access token (refreshing if needed)")
    p.add_argument("provider", type=_provider)

    sub.add_parser("status", help="table of connections")

    from flowengine.states import FlowState

    p = sub.add_parser("flows", help="recent authorization flows")
    p.add_argument("--provider", type=_provider)
    p.add_argument(
        "--state",
        action="append",
        dest="states",
        choices=[state.value for state in FlowState],
        metavar="STATE",
        help="only flows in this state (repeatable): "
        + ", ".join(state.value for state in FlowState),
    )
    p.add_argument("--limit", type=_limit, default=20, help=f"at most this many (1-{MAX_LIMIT})")

    p = sub.add_parser("flow", help="one flow with its ledger")
    p.add_argument("flow_id", type=_flow_id)

    p = sub.add_parser("diagram", help="state diagram of the machine or of one flow")
    p.add_argument("--flow", dest="flow_id", type=_flow_id)
    p.add_argument("--format", choices=("mermaid", "svg", "dot"), default="mermaid")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")

    p = sub.add_parser("providers", help="the provider catalog, or one provider in detail")
    p.add_argument(
        "provider", nargs="?", type=_provider, help="show this provider's fields and their sources"
    )

    p = sub.add_parser("disconnect", help="revoke and forget a provider's tokens")
    p.add_argument("provider", type=_provider)

    p = sub.add_parser("credentials", help="store a provider's client id and secret")
    p.add_argument("provider", type=_provider)
    p.add_argument("--client-id", help="client id (asked for when omitted)")
    p.add_argument(
        "--secret-stdin", action="store_true", help="read the client secret from standard input"
    )

    p = sub.add_parser("config", help="configuration")
    p.add_argument("action", choices=("check", "show", "path"))

    p = sub.add_parser("demo", help="run the whole flow against a simulated provider")
    p.add_argument("--keep", action="store_true", help="keep the demo's temp directory")

    _add_integrations(sub)
    return parser


def _add_integrations(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``agentd <integration> …`` for every integration the package finds (none named here)."""
    from integrations import discover

    taken = set(sub.choices)
    for integration in discover():
        if integration.name in taken:
            print(f"warning: integration {integration.name!r} shadows a command", file=sys.stderr)
            continue
        p = sub.add_parser(integration.name, help=integration.summary or integration.title)
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
