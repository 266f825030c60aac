"""Dexcom CGM (API v3): ``agentd dexcom …``, the bot's ``glucose`` command, a simulated API.

Only the integration object lives here, so discovering it costs nothing: the API client
(client.py), the chart (chart.py, matplotlib), the CLI (cli.py), the chat command (chat.py)
and the simulated Dexcom (sim.py) load when first used.
"""

from __future__ import annotations

import argparse

from .. import ChatCommand, Integration
from ..export import add_listing_options

__all__ = ["GLUCOSE_WINDOWS", "INTEGRATION", "DexcomIntegration"]

#: ``glucose`` argument -> hours
GLUCOSE_WINDOWS: dict[str, int] = {"6h": 6, "24h": 24, "1d": 24, "7d": 168}
_DEFAULT_WINDOW = "24h"


def parse_glucose(args: tuple[str, ...]) -> int | None:
    """``glucose [6h|24h|1d|7d]`` -> hours, None when the words do not fit. [pure]"""
    if len(args) > 1:
        return None
    return GLUCOSE_WINDOWS.get(args[0] if args else _DEFAULT_WINDOW)


class DexcomIntegration(Integration):
    name = "dexcom"
    title = "Dexcom"
    summary = "Dexcom CGM data (API v3)"
    providers = ("dexcom", "dexcom-eu", "dexcom-jp", "dexcom-sandbox")
    demo_commands = (("latest",), ("egvs", "--since", "30m"))
    cli = ".cli:run"
    sim = ".sim:DexcomSim"

    def configure_cli(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="dexcom_command", metavar="WHAT", required=True)
        providers = ", ".join(self.providers)
        p = sub.add_parser("latest", help="the latest glucose reading")
        p.add_argument("--provider", help=f"one of {providers}")
        p.add_argument("--unit", choices=("mg/dL", "mmol/L"), default="mg/dL")
        p = sub.add_parser("egvs", help="estimated glucose values")
        p.add_argument("--provider", help=f"one of {providers}")
        p.add_argument("--since", default="24h", help="e.g. 6h, 24h, 7d")
        p.add_argument("--unit", choices=("mg/dL", "mmol/L"), default="mg/dL")
        add_listing_options(p)
        p = sub.add_parser("range", help="the time range with data")
        p.add_argument("--provider", help=f"one of {providers}")

    def chat_commands(self) -> tuple[ChatCommand, ...]:
        return (
            ChatCommand(
                name="glucose",
                help="glucose [6h|24h|7d] — latest glucose reading and a chart",
                usage="Say glucose, glucose 6h, glucose 24h or glucose 7d.",
                failure="No glucose reading",
                parse=parse_glucose,
                run=self.with_provider(".chat:glucose"),
            ),
        )


INTEGRATION = DexcomIntegration()
