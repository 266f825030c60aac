"""``agentd withings latest|range``: weight and blood pressure with tokens from the broker.

The arguments are declared in the package (argparse only, so ``agentd --help`` stays cheap).
"""

from __future__ import annotations

import argparse

from .. import Services
from ..durations import since_option
from ..export import write_listing
from .client import MEASUREMENT_ROWS, Measurement, WithingsClient, format_measurement

__all__ = ["run"]


def _line(m: Measurement) -> str:
    local = m.taken_at.astimezone()
    weight_text = f"{m.weight_kg:6.1f} kg" if m.weight_kg is not None else " " * 9
    bp = f"{m.systolic:.0f}/{m.diastolic:.0f} mmHg" if m.has_blood_pressure else ""
    pulse = f"{m.pulse:3.0f} bpm" if m.pulse is not None else ""
    flag = "  (uncertain)" if m.uncertain else ""
    return f"{local:%Y-%m-%d %H:%M}  {weight_text}  {bp:<12}  {pulse}{flag}".rstrip()


async def run(args: argparse.Namespace, services: Services, provider: str) -> int:
    out = services.out
    client = WithingsClient.for_services(services, provider)
    now = client.now()
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
    since = since_option(args.since, hint="e.g. 7d, 30d, 1y")
    items = await client.measurements(now - since, now)
    write_listing(args, services, items, MEASUREMENT_ROWS, line=_line, noun="measurements")
    return 0
