"""``agentd dexcom latest|egvs|range``: Dexcom CGM data with tokens from the broker.

The arguments are declared in the package (argparse only, so ``agentd --help`` stays cheap).
"""

from __future__ import annotations

import argparse

from .. import Services
from ..durations import since_option
from ..export import write_listing
from .client import READING_ROWS, DexcomClient, Reading, format_reading

__all__ = ["run"]


async def run(args: argparse.Namespace, services: Services, provider: str) -> int:
    out = services.out
    client = DexcomClient.for_services(services, provider)
    now = client.now()
    if args.dexcom_command == "latest":
        reading = await client.latest()
        if reading is None:
            out.write("no reading in the last 6 hours (Dexcom delays data for third-party apps)\n")
            return 0
        out.write(format_reading(reading, args.unit, now=now) + "\n")
        return 0
    if args.dexcom_command == "egvs":
        since = since_option(args.since, hint="e.g. 6h, 24h, 7d")
        readings = await client.egvs(now - since, now)

        def line(reading: Reading) -> str:
            local = reading.system_time.astimezone()
            value = reading.value_in(args.unit)
            return f"{local:%Y-%m-%d %H:%M}  {value:>5} {args.unit}  {reading.arrow}"

        write_listing(args, services, readings, READING_ROWS, line=line, noun="readings")
        return 0
    data_range = await client.data_range()
    for name in ("egvs", "events", "calibrations"):
        span = getattr(data_range, name)
        text = f"{span[0]:%Y-%m-%d %H:%M} .. {span[1]:%Y-%m-%d %H:%M} UTC" if span else "none"
        out.write(f"{name:<13} {text}\n")
    return 0
