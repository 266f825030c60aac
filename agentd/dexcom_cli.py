"""``agentd dexcom latest|egvs|range``: Dexcom CGM data with tokens from the broker."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from agentd.context import Context
from flowengine.dexcom import (
    DexcomClient,
    format_reading,
    parse_since,
    readings_to_csv,
    readings_to_json,
)
from flowengine.errors import ConfigError

__all__ = ["run"]


def _client(ctx: Context, provider: str) -> DexcomClient:
    spec = ctx.catalog.get(provider)
    if not spec.id.startswith("dexcom"):
        raise ConfigError(f"{spec.id} is not a Dexcom provider", key="--provider")
    return DexcomClient.from_spec(spec, ctx.broker, http=ctx.http, actor="cli")


async def run(ctx: Context, args: argparse.Namespace) -> int:
    from agentd.cli import EXIT

    client = _client(ctx, args.provider)
    now = datetime.now(UTC)
    if args.dexcom_command == "latest":
        reading = await client.latest()
        if reading is None:
            print("no reading in the last 3 hours (Dexcom delays data for third-party apps)")
            return EXIT["ok"]
        print(format_reading(reading, args.unit, now=now))
        return EXIT["ok"]
    if args.dexcom_command == "egvs":
        try:
            since = parse_since(args.since)
        except ValueError as err:
            raise ConfigError(str(err), key="--since", hint="e.g. 6h, 24h, 7d") from err
        readings = await client.egvs(now - since, now)
        if args.json:
            sys.stdout.write(readings_to_json(readings, indent=2) + "\n")
        elif args.csv:
            sys.stdout.write(readings_to_csv(readings))
        else:
            for reading in readings:
                local = reading.system_time.astimezone()
                value = reading.value_in(args.unit)
                print(f"{local:%Y-%m-%d %H:%M}  {value:>5} {args.unit}  {reading.arrow}")
            print(f"{len(readings)} readings", file=sys.stderr)
        return EXIT["ok"]
    data_range = await client.data_range()
    for name in ("egvs", "events", "calibrations"):
        span = getattr(data_range, name)
        print(
            f"{name:<13} "
            + (f"{span[0]:%Y-%m-%d %H:%M} .. {span[1]:%Y-%m-%d %H:%M} UTC" if span else "none")
        )
    return EXIT["ok"]
