"""The bot's ``weight`` command: the latest weigh-in and blood pressure, and a chart."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

import anyio

from .. import Reply, Services
from .chart import render_chart
from .client import WithingsClient, format_measurement

__all__ = ["caption", "weight"]


def caption(weight_line: str | None, pressure_line: str | None, days: int) -> str:
    """The chart's caption from two formatted lines (either may be missing). [pure]"""
    lines = [f"⚖️ {weight_line}"] if weight_line else []
    lines += [f"❤️ {pressure_line}"] if pressure_line else []
    if not lines:
        return f"⚖️ No weight or blood pressure in the last {days} d."
    return "\n".join([*lines, f"Last {days} d"])


async def weight(services: Services, provider: str, days: int) -> Reply:
    """The reply to ``weight <days>d`` for ``provider``: caption and chart."""
    client = WithingsClient.for_services(services, provider)
    end = client.now()
    items = await client.measurements(end - timedelta(days=days), end)
    certain = [m for m in items if not m.uncertain]
    last_weight = next((m for m in reversed(certain) if m.has_weight), None)
    last_pressure = next((m for m in reversed(certain) if m.has_blood_pressure), None)
    text = caption(
        format_measurement(last_weight, now=end) if last_weight else None,
        format_measurement(last_pressure, now=end) if last_pressure else None,
        days,
    )
    image = await anyio.to_thread.run_sync(partial(render_chart, items, tz=services.zone))
    return Reply(text, image)
