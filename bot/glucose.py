"""The ``glucose`` command's data: the latest Dexcom reading and a chart, as a GlucoseSource.

:class:`DexcomGlucose` asks the Dexcom API v3 (flowengine/dexcom.py) for the readings of
the requested window, through the broker for tokens (refreshing as needed, as actor
``bot``), and renders them with flowengine/glucose_chart.py in a worker thread.
:func:`dexcom_glucose` builds one from the catalog entry of the provider (its
``api_base_url`` picks the Dexcom region).
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import httpx

from flowengine.broker import Broker
from flowengine.clock import Clock
from flowengine.dexcom import DexcomClient, Unit, format_reading
from flowengine.errors import ConfigError
from flowengine.glucose_chart import render_chart

from . import texts
from .runner import ACTOR, GlucoseReport

__all__ = ["DexcomGlucose", "dexcom_glucose"]


class DexcomGlucose:
    """A :class:`~bot.runner.GlucoseSource` on a DexcomClient."""

    def __init__(self, client: DexcomClient, *, tz: str = "UTC", unit: Unit = "mg/dL") -> None:
        self.client = client
        self.unit: Unit = unit
        try:
            self.tz = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ConfigError(f"unknown time zone {tz!r}", key="telegram.timezone") from err

    @property
    def provider(self) -> str:
        return self.client.provider_id

    async def __call__(self, hours: int) -> GlucoseReport:
        end = self.client.now()
        readings = await self.client.egvs(end - timedelta(hours=hours), end + timedelta(seconds=1))
        latest = next((r for r in reversed(readings) if r.value_mgdl is not None), None)
        line = format_reading(latest, self.unit, now=end) if latest is not None else None
        chart = partial(render_chart, readings, tz=self.tz, unit=self.unit, now=end)
        image = await anyio.to_thread.run_sync(chart)
        return GlucoseReport(texts.glucose_caption(line, hours), image)


def dexcom_glucose(
    broker: Broker,
    *,
    http: httpx.AsyncClient,
    provider_id: str = "dexcom",
    tz: str = "UTC",
    unit: Unit = "mg/dL",
    clock: Clock | None = None,
) -> DexcomGlucose:
    """A glucose source for ``provider_id`` (dexcom, dexcom-eu, ...) from the catalog."""
    spec = broker.catalog.get(provider_id)
    if not spec.api_base_url:
        raise ConfigError(
            "has no api_base_url, so its readings cannot be fetched",
            key=f"providers.{provider_id}.api_base_url",
        )
    client = DexcomClient(
        broker,
        provider_id=spec.id,
        base_url=spec.api_base_url,
        http=http,
        clock=clock,
        actor=ACTOR,
    )
    return DexcomGlucose(client, tz=tz, unit=unit)
