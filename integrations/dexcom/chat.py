"""The bot's ``glucose`` command: the latest Dexcom reading with its trend, and a chart.

The readings of the asked window come from the Dexcom API v3 (client.py) on a token from
the broker (refreshed as needed, as the bot's actor); the chart (chart.py, matplotlib) is
drawn in a worker thread so the bot keeps answering meanwhile.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial

import anyio

from .. import Reply, Services
from .chart import render_chart
from .client import DexcomClient, Unit, format_reading

__all__ = ["caption", "glucose"]


def caption(reading: str | None, hours: int) -> str:
    """``reading`` is one formatted line (value, unit, trend arrow, age) or None."""
    window = f"{hours // 24} d" if hours % 24 == 0 and hours >= 48 else f"{hours} h"
    if reading is None:
        return f"🩸 No glucose readings in the last {window}."
    return f"🩸 {reading}\nLast {window}"


async def glucose(services: Services, provider: str, hours: int, *, unit: Unit = "mg/dL") -> Reply:
    """The reply to ``glucose <hours>h`` for ``provider`` (dexcom, dexcom-eu, ...)."""
    client = DexcomClient.for_services(services, provider)
    end = client.now()
    readings = await client.egvs(end - timedelta(hours=hours), end + timedelta(seconds=1))
    latest = next((r for r in reversed(readings) if r.value_mgdl is not None), None)
    line = format_reading(latest, unit, now=end) if latest is not None else None
    chart = partial(render_chart, readings, tz=services.zone, unit=unit, now=end)
    image = await anyio.to_thread.run_sync(chart)
    return Reply(caption(line, hours), image)
