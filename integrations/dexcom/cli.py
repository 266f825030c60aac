"""``agentd dexcom latest|egvs|range``: Dexcom CGM data with tokens from the broker.

The arguments are declared in the package (argparse only, so ``agentd --help`` stays cheap).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from flowengine import ConfigError

from .. import Services
from ..durations import parse_since
from .client import DexcomClient, format_reading, readings_to_csv, readings_to_json

__all__ = ["run"]


async def run(args: argparse.Namespace, services: Services, provider: str) -> int:
    out = services.out
    spec = services.broker.catalog.get(provider)
    client = DexcomClient.from_spec(
        spec, services.broker, http=services.http, clock=services.clock, actor=services.actor
    )
    now = datetime.fromtimestamp(services.clock.now(), UTC)
    if args.dexcom_command == "latest":
        reading = await client.latest()
        if reading is None:
            out.write("no reading in the last 6 hours (Dexcom delays data for third-party apps)\n")
            return 0
        out.write(format_reading(reading, args.unit, now=now) + "\n")
        return 0
    if args.dexcom_command == "egvs":
        try:
            since = parse_since(args.since)
        except ValueError as err:
            raise ConfigError(str(err), key="--since", hint="e.g. 6h, 24h, 7d") from err
        readings = await client.egvs(now - since, now)
        if args.json:
            out.write(readings_to_json(readings, indent=2) + "\n")
        elif args.csv:
            out.write(readings_to_csv(readings))
        else:
            for reading in readings:
                local = reading.system_time.astimezone()
                value = reading.value_in(args.unit)
                out.write(f"{local:%Y-%m-%d %H:%M}  {value:>5} {args.unit}  {reading.arrow}\n")
            services.err.write(f"{len(readings)} readings\n")
        return 0
    data_range = await client.data_range()
    for name in ("egvs", "events", "calibrations"):
        span = getattr(data_range, name)
        text = f"{span[0]:%Y-%m-%d %H:%M} .. {span[1]:%Y-%m-%d %H:%M} UTC" if span else "none"
        out.write(f"{name:<13} {text}\n")
    return 0
