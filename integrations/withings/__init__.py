"""Withings (Measure API): ``agentd withings …``, the bot's ``weight`` command, a simulated
Withings.

Everything Withings-specific about OAuth (``action=requesttoken`` on both token requests,
the ``{"status", "body"}`` envelope and its non-HTTP error codes, comma-separated scopes)
is catalog data (flowengine/providers.toml) read by the engine's generic hooks; this
package only reads data. Only the integration object lives here, so discovering it costs
nothing: the client, chart (matplotlib), CLI, chat command and simulator load when used.
"""

from __future__ import annotations

import argparse
import re

from .. import ChatCommand, Integration
from ..export import add_listing_options

__all__ = ["INTEGRATION", "WithingsIntegration", "parse_weight"]

_DAYS_RE = re.compile(r"^(\d{1,3})d$")
_YEAR = {"1y": 365}
_DEFAULT_DAYS = 30


def parse_weight(args: tuple[str, ...]) -> int | None:
    """``weight [Nd|1y]`` (1 to 730 days) -> days, None when the words do not fit. [pure]"""
    if not args:
        return _DEFAULT_DAYS
    if len(args) > 1:
        return None
    if args[0] in _YEAR:
        return _YEAR[args[0]]
    match = _DAYS_RE.match(args[0])
    if match is None or not 1 <= int(match.group(1)) <= 730:
        return None
    return int(match.group(1))


class WithingsIntegration(Integration):
    name = "withings"
    title = "Withings"
    summary = "Withings weight and blood pressure (Measure API)"
    providers = ("withings",)
    demo_commands = (("latest",), ("range", "--since", "3d"))
    cli = ".cli:run"
    sim = ".sim:WithingsSim"

    def configure_cli(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="withings_command", metavar="WHAT", required=True)
        p = sub.add_parser("latest", help="the latest weigh-in and blood-pressure reading")
        p.add_argument("--provider", help="a Withings provider id of the catalog")
        p = sub.add_parser("range", help="every weigh-in and blood-pressure reading of a period")
        p.add_argument("--provider", help="a Withings provider id of the catalog")
        p.add_argument("--since", default="30d", help="e.g. 7d, 30d, 1y")
        add_listing_options(p)

    def chat_commands(self) -> tuple[ChatCommand, ...]:
        return (
            ChatCommand(
                name="weight",
                help="weight [7d|30d|1y] — latest weight and blood pressure, and a chart",
                usage="Say weight, weight 7d, weight 90d or weight 1y.",
                failure="No Withings data",
                parse=parse_weight,
                run=self.with_provider(".chat:weight"),
                aliases=("bp",),
            ),
        )


INTEGRATION = WithingsIntegration()
