"""Dexcom API v3 client: estimated glucose values and friends, on a bearer token.

The client never stores tokens: it asks a :class:`TokenSource` (the broker) for the current
access token before each request, and for one forced refresh when Dexcom answers 401
(integrations/apiclient.py). HTTP goes through an injected ``httpx.AsyncClient``; time
through an injected :class:`~flowengine.Clock`; waiting through an injected ``sleep``.

Facts used (developer.dexcom.com; details and sources in ``integrations/dexcom/sim.py``):

* Base URLs: US ``https://api.dexcom.com``, EU and outside the US ``https://api.dexcom.eu``,
  Japan ``https://api.dexcom.jp``, sandbox ``https://sandbox-api.dexcom.com``
  (/docs/dexcomv3/endpoint-overview); they come from the catalog's ``api_base_url``.
* ``GET /v3/users/self/{egvs,events,calibrations,alerts}?startDate=..&endDate=..`` with UTC
  dates written ``YYYY-MM-DDThh:mm:ss`` (no offset, no fraction); startDate inclusive,
  endDate exclusive; at most 30 days per request (:data:`DEXCOM_MAX_WINDOW`, a third-party
  figure that Dexcom's own pages do not spell out), so longer ranges are split and merged.
* Response ``{"recordType", "recordVersion", "userId", "records": [...]}``. ``systemTime`` is
  UTC, written with an offset for phone sources and without one for receivers; both parse.
* 429 when over 60,000 calls per app per hour.
* Data delay: Dexcom's FAQ (/content/frequently-asked-questions) says EGVs reach third-party
  apps on a three-hour delay (:data:`DATA_DELAY`). Integration partners report about one
  hour; a US/elsewhere split appears only in third-party clients and is not relied on.

Errors (flowengine): 401 twice (before and after one forced refresh) ->
:class:`ReauthorizationRequired`; 429/5xx/network after bounded backoff ->
:class:`ProviderTransientError` (with ``retry_after``); other answers ->
:class:`ProviderError`. Messages never include the token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx

from flowengine import ProviderError, TokenRejectedError

from ..apiclient import ProviderClient, TokenSource, json_object
from ..durations import age, parse_since
from ..export import Rows

__all__ = [
    "READING_ROWS",
    "DATA_DELAY",
    "DEXCOM_MAX_WINDOW",
    "MGDL_PER_MMOL",
    "TREND_ARROWS",
    "DataRange",
    "DexcomClient",
    "Reading",
    "TokenSource",
    "Unit",
    "format_dexcom_time",
    "format_reading",
    "parse_dexcom_time",
    "parse_since",
    "reading_from_record",
    "reading_to_dict",
    "readings_to_csv",
    "readings_to_json",
    "split_window",
]

DEXCOM_MAX_WINDOW = timedelta(days=30)
#: how late EGVs reach third-party apps, per Dexcom's FAQ
DATA_DELAY = timedelta(hours=3)
MGDL_PER_MMOL = 18.0182
Unit = Literal["mg/dL", "mmol/L"]

TREND_ARROWS: dict[str, str] = {
    "doubleUp": "↑↑",
    "singleUp": "↑",
    "fortyFiveUp": "↗",
    "flat": "→",
    "fortyFiveDown": "↘",
    "singleDown": "↓",
    "doubleDown": "↓↓",
}
_UNKNOWN_ARROW = "?"  # none, unknown, notComputable, rateOutOfRange, null


# --------------------------------------------------------------------------- readings


@dataclass(frozen=True)
class Reading:
    """One estimated glucose value (EGV)."""

    system_time: datetime  # aware, UTC
    display_time: datetime  # as shown on the device; naive when the source gave no offset
    value_mgdl: int | None
    trend: str
    trend_rate: float | None
    status: str | None
    record_id: str = field(default="", compare=False)

    @property
    def mmol(self) -> float | None:
        """The value in mmol/L, one decimal."""
        if self.value_mgdl is None:
            return None
        return round(self.value_mgdl / MGDL_PER_MMOL, 1)

    @property
    def arrow(self) -> str:
        """The trend as an arrow (``?`` when Dexcom computed none)."""
        return TREND_ARROWS.get(self.trend, _UNKNOWN_ARROW)

    def value_in(self, unit: Unit) -> str:
        """The value as text in ``unit`` ("142", "7.9"), or "--" when there is none."""
        if self.value_mgdl is None:
            return "--"
        if unit == "mmol/L":
            return f"{self.mmol:.1f}"
        return str(self.value_mgdl)


@dataclass(frozen=True)
class DataRange:
    """Earliest and latest systemTime per record kind (None when the user has none)."""

    egvs: tuple[datetime, datetime] | None
    events: tuple[datetime, datetime] | None
    calibrations: tuple[datetime, datetime] | None


# ------------------------------------------------------------------------- time format


def format_dexcom_time(when: datetime, *, round_up: bool = False) -> str:
    """``when`` (aware) as Dexcom's query format: UTC, ``YYYY-MM-DDThh:mm:ss``.

    Fractions of a second are dropped, or rounded up to the next second with ``round_up``
    (for an exclusive ``endDate`` so a reading at exactly ``when`` is not lost).
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("Dexcom dates need an aware datetime (got a naive one)")
    utc = when.astimezone(UTC)
    if round_up and utc.microsecond:
        utc = utc + timedelta(seconds=1)
    return utc.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%S")


def parse_dexcom_time(text: str, *, assume_utc: bool = True) -> datetime:
    """Parse a Dexcom timestamp (with ``Z``, an offset, or none; fractions allowed).

    Without an offset the time is taken as UTC when ``assume_utc`` (systemTime), or left
    naive (displayTime from a receiver).
    """
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    parsed = datetime.fromisoformat(raw)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC) if assume_utc else parsed
    return parsed.astimezone(UTC) if assume_utc else parsed


def split_window(
    start: datetime, end: datetime, max_window: timedelta = DEXCOM_MAX_WINDOW
) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into consecutive pieces of at most ``max_window``."""
    if end <= start:
        raise ValueError("end must be after start")
    if max_window <= timedelta(0):
        raise ValueError("max_window must be positive")
    pieces = []
    cursor = start
    while cursor < end:
        stop = min(cursor + max_window, end)
        pieces.append((cursor, stop))
        cursor = stop
    return pieces


def reading_from_record(record: dict[str, Any]) -> Reading:
    """One v3 EGV record -> :class:`Reading` (``KeyError``/``ValueError`` on a broken one)."""
    value = record.get("value")
    if value is not None:
        value = float(value)
        if record.get("unit") == "mmol/L":
            value *= MGDL_PER_MMOL
        value = int(round(value))
    rate = record.get("trendRate")
    if rate is not None:
        rate = float(rate)
        if record.get("rateUnit") == "mmol/L/min":
            rate = round(rate * MGDL_PER_MMOL, 2)
    return Reading(
        system_time=parse_dexcom_time(record["systemTime"]),
        display_time=parse_dexcom_time(
            record.get("displayTime") or record["systemTime"], assume_utc=False
        ),
        value_mgdl=value,
        trend=record.get("trend") or "none",
        trend_rate=rate,
        status=record.get("status"),
        record_id=str(record.get("recordId") or ""),
    )


# ----------------------------------------------------------------------- pure helpers


def format_reading(reading: Reading, unit: Unit = "mg/dL", *, now: datetime) -> str:
    """One line for a human: ``"142 mg/dL → 4m ago"``."""
    if reading.value_mgdl is None:
        value = f"no value ({reading.status})" if reading.status else "no value"
    else:
        value = f"{reading.value_in(unit)} {unit}"
    return f"{value} {reading.arrow} {age(now - reading.system_time)}"


def reading_to_dict(reading: Reading) -> dict[str, Any]:
    """A JSON-ready dict (times in ISO 8601; systemTime with ``Z``)."""
    return {
        "system_time": reading.system_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "display_time": reading.display_time.isoformat(timespec="seconds"),
        "value_mgdl": reading.value_mgdl,
        "value_mmol": reading.mmol,
        "trend": reading.trend,
        "arrow": reading.arrow,
        "trend_rate": reading.trend_rate,
        "status": reading.status,
    }


#: readings: one row per reading (:func:`reading_to_dict`)
READING_ROWS = Rows(
    reading_to_dict,
    (
        "system_time",
        "display_time",
        "value_mgdl",
        "value_mmol",
        "trend",
        "arrow",
        "trend_rate",
        "status",
    ),
)
readings_to_json = READING_ROWS.to_json
readings_to_csv = READING_ROWS.to_csv


# ----------------------------------------------------------------------------- client


def _description(response: httpx.Response) -> tuple[str | None, str | None]:
    try:
        data = response.json()
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    error = data.get("error")
    desc = data.get("error_description") or data.get("message") or data.get("fault")
    return (
        error if isinstance(error, str) else None,
        desc[:200] if isinstance(desc, str) else None,
    )


class DexcomClient(ProviderClient):
    """Dexcom API v3 on behalf of the owner; one instance per provider connection."""

    title = "Dexcom"
    default_provider = "dexcom"
    base_url_hint = "set api_base_url to the Dexcom API host of your region"

    def __init__(
        self, tokens: TokenSource, *, max_window: timedelta = DEXCOM_MAX_WINDOW, **options: Any
    ) -> None:
        super().__init__(tokens, **options)
        self.max_window = max_window

    # -------------------------------------------------------------------- public

    async def egvs(self, start: datetime, end: datetime) -> list[Reading]:
        """Readings with start <= systemTime < end, sorted, without duplicates."""
        records = await self._windowed("egvs", start, end)
        readings = self.parse_each(reading_from_record, records, what="an EGV record")
        unique: dict[object, Reading] = {}
        for reading in readings:
            unique[reading.record_id or reading.system_time] = reading
        return sorted(unique.values(), key=lambda r: r.system_time)

    async def latest(self, within: timedelta = DATA_DELAY + timedelta(hours=3)) -> Reading | None:
        """The newest reading of the last ``within`` (default: the FAQ's 3 h delay + 3 h)."""
        end = self.now()
        readings = await self.egvs(end - within, end + timedelta(seconds=1))
        return readings[-1] if readings else None

    async def data_range(self) -> DataRange:
        data = await self._get("/v3/users/self/dataRange", {})

        def span(key: str) -> tuple[datetime, datetime] | None:
            part = data.get(key)
            if not isinstance(part, dict):
                return None
            try:
                return (
                    parse_dexcom_time(part["start"]["systemTime"]),
                    parse_dexcom_time(part["end"]["systemTime"]),
                )
            except (KeyError, TypeError, ValueError) as err:
                raise ProviderError(
                    f"Dexcom sent an unreadable dataRange.{key}", provider=self.provider_id
                ) from err

        return DataRange(
            egvs=span("egvs"), events=span("events"), calibrations=span("calibrations")
        )

    async def devices(self) -> list[dict[str, Any]]:
        data = await self._get("/v3/users/self/devices", {})
        return self._records(data)

    async def events(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return await self._windowed("events", start, end)

    async def calibrations(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return await self._windowed("calibrations", start, end)

    async def alerts(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return await self._windowed("alerts", start, end)

    # ------------------------------------------------------------------ plumbing

    def _records(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        records = data.get("records")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ProviderError("Dexcom answered without a records list", provider=self.provider_id)
        return records

    async def _windowed(self, kind: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for lo, hi in split_window(start, end, self.max_window):
            params = {
                "startDate": format_dexcom_time(lo),
                "endDate": format_dexcom_time(hi, round_up=True),
            }
            data = await self._get(f"/v3/users/self/{kind}", params)
            for record in self._records(data):
                rid = record.get("recordId")
                if isinstance(rid, str) and rid:
                    if rid in seen:
                        continue
                    seen.add(rid)
                out.append(record)
        return out

    def _classify(self, path: str) -> Any:
        def classify(response: httpx.Response) -> dict[str, Any]:
            if response.status_code == 200:
                return json_object(response, name="Dexcom", provider=self.provider_id)
            error, description = _description(response)
            if response.status_code == 401:
                raise TokenRejectedError(
                    oauth_error=error, description=description, provider_status=401
                )
            raise self.api.http_failure(
                response, what=path, oauth_error=error, description=description
            )

        return classify

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        data: dict[str, Any] = await self.api.request(
            "GET", self.base_url + path, params=params, classify=self._classify(path)
        )
        return data
