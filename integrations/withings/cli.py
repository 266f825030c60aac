"""``agentd withings latest|range``: weight and blood pressure with tokens from the broker.

The arguments are declared in the package (argparse only, so ``agentd --help`` stays cheap).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from flowengine import ConfigError

from .. import Services
from ..durations import parse_since
from .client import (
    WithingsClient,
    format_measurement,
    measurements_to_csv,
    measurements_to_json,
)

__all__ = ["run"]


async def run(args: argparse.Namespace, services: Services, provider: str) -> int:
    out = services.out
    spec = services.broker.catalog.get(provider)
    client = WithingsClient.from_spec(
        spec, services.broker, http=services.http, clock=services.clock, actor=services.actor
    )
    now = datetime.fromtimestamp(services.clock.now(), UTC)
    if args.withings_command == "latest":
        weight, pressure = await client.latest()
        if weight is None and pressure is None:
            out.write("no weigh-in or blood-pressure reading in the last year\n")
            return 0
        if weight is not None:
            out.write(f"weight          {format_measurement(weight, now=now)}\n")
        if pressure is not None:
            out.write(f"blood pressure  {format_measurement(pressure, now=now)}\n")
        return 0
    try:
        since = parse_since(args.since)
    except ValueError as err:
        raise ConfigError(str(err), key="--since", hint="e.g. 7d, 30d, 1y") from err
    items = await client.measurements(now - since, now)
    if args.json:
        out.write(measurements_to_json(items, indent=2) + "\n")
    elif args.csv:
        out.write(measurements_to_csv(items))
    else:
        for m in items:
            local = m.taken_at.astimezone()
            weight_text = f"{m.weight_kg:6.1f} kg" if m.weight_kg is not None else " " * 9
            bp = f"{m.systolic:.0f}/{m.diastolic:.0f} mmHg" if m.has_blood_pressure else ""
            pulse = f"{m.pulse:3.0f} bpm" if m.pulse is not None else ""
            flag = "  (uncertain)" if m.uncertain else ""
            line = f"{local:%Y-%m-%d %H:%M}  {weight_text}  {bp:<12}  {pulse}{flag}"
            out.write(line.rstrip() + "\n")
        services.err.write(f"{len(items)} measurements\n")
    return 0
