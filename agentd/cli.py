"""The ``agentd`` command.

Exit codes (documented in README):

==  ==========================================================
0   success
1   unexpected error (bug, storage trouble)
2   usage or configuration error
3   not connected (no tokens for the provider)
4   re-authorization required (grant revoked/expired): connect again
5   provider unavailable (network, 5xx, 429): try again later
6   the authorization flow failed, was denied or expired
==  ==========================================================

``agentd token`` has a fast path: it reads auth.json and prints a still-valid token
without importing the async stack (httpx, anyio, aiosqlite).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["EXIT", "main"]

EXIT = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "not_connected": 3,
    "reauthorize": 4,
    "unavailable": 5,
    "flow_failed": 6,
}


def _token_fast_path(argv: Sequence[str]) -> int | None:
    """Print a fresh token from auth.json without the async stack; None = take the slow path."""
    if len(argv) != 2 or argv[0] != "token" or argv[1].startswith("-"):
        return None
    import time

    from agentd.config import load_config
    from flowengine.tokens import TokenStore

    config = load_config()
    if config.problems:
        return None
    try:
        entry = TokenStore(config.auth_file).read(argv[1])
    except Exception:  # noqa: BLE001 - the slow path reports errors properly
        return None
    if entry is None or not entry.access or entry.expires is None:
        return None
    if entry.expires - 60_000 <= time.time() * 1000:
        return None
    sys.stdout.write(entry.access + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentd",
        description="Self-hosted OAuth 2.0 connection broker for a personal AI agent.",
    )
    parser.add_argument("--config", help="path to agentd.toml (default: $AGENTD_CONFIG or XDG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("serve", help="run the daemon: HTTPS API, refresh timer and Telegram bot")

    p = sub.add_parser("connect", help="connect a provider from this terminal")
    p.add_argument("provider")
    p.add_argument("--scope", action="append", dest="scopes", help="override the scopes")
    p.add_argument("--no-qr", action="store_true", help="do not print a QR code")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the browser")

    p = sub.add_parser("token", help="print a fresh access token (refreshing if needed)")
    p.add_argument("provider")

    sub.add_parser("status", help="table of connections")

    from flowengine.states import FlowState

    p = sub.add_parser("flows", help="recent authorization flows")
    p.add_argument("--provider")
    p.add_argument(
        "--state",
        action="append",
        dest="states",
        choices=[state.value for state in FlowState],
        metavar="STATE",
        help="only flows in this state (repeatable): "
        + ", ".join(state.value for state in FlowState),
    )
    p.add_argument("--limit", type=int, default=20)

    p = sub.add_parser("flow", help="one flow with its ledger")
    p.add_argument("flow_id")

    p = sub.add_parser("diagram", help="state diagram of the machine or of one flow")
    p.add_argument("--flow", dest="flow_id")
    p.add_argument("--format", choices=("mermaid", "svg", "dot"), default="mermaid")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")

    p = sub.add_parser("providers", help="the provider catalog, or one provider in detail")
    p.add_argument("provider", nargs="?", help="show this provider's fields and their sources")

    p = sub.add_parser("disconnect", help="revoke and forget a provider's tokens")
    p.add_argument("provider")

    p = sub.add_parser("credentials", help="store a provider's client id and secret")
    p.add_argument("provider")
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


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
