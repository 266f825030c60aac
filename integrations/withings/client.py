"""Withings Measure API (``getmeas``): weight and blood pressure, on a bearer token.

Facts used, from Withings' API reference (developer.withings.com/api-reference, operation
``measure-getmeas`` and section "Response status"; mirrored in github.com/api-evangelist/
withings openapi/withings-measure-api-openapi.yml):

* ``POST https://wbsapi.withings.net/measure`` with ``action=getmeas``, ``meastypes`` (comma
  list), ``category`` (1 real measures, 2 user objectives), ``startdate``/``enddate`` (unix
  seconds), ``lastupdate``, ``offset``; ``Authorization: Bearer <access token>``.
* Answer ``{"status": 0, "body": {"updatetime", "timezone", "measuregrps": [...], "more",
  "offset"}}``; ``more`` set means "call again with ``offset``". A group has ``grpid``,
  ``attrib``, ``date`` (unix seconds the measures were taken), ``created``, ``modified``,
  ``category``, ``deviceid``, ``model``, and ``measures`` of ``{value, type, unit}`` whose
  real value is ``value * 10^unit``.
* Types: 1 weight (kg), 9 diastolic and 10 systolic blood pressure (mmHg), 11 heart pulse
  (bpm). ``attrib`` 1 = captured by a device but possibly another user's, 4 = entered at
  account creation (may be inaccurate): such groups are kept but marked ``uncertain``.
* Status codes: 0 success; 100-102, 200, 401 "Authentication failed"; 522 "Timeout";
  601 "Too many request"; 5000-5006 "An error occurred" (treated as transient, retried);
  anything else is an error with the provider's ``error`` text.

Assumed, not documented: an expired or unknown access token answers HTTP 200 with
``{"status": 401, "body": {}, "error": "... invalid_token ..."}`` (seen by integrators);
the order of ``measuregrps`` (newest first in published examples; sorted here anyway).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from flowengine import ProviderError, ProviderTransientError, TokenRejectedError

from ..apiclient import ProviderClient, json_object
from ..durations import age
from ..export import Rows

__all__ = [
    "MEASUREMENT_ROWS",
    "AUTH_FAILED",
    "BLOOD_PRESSURE",
    "DIASTOLIC",
    "PULSE",
    "SYSTOLIC",
    "TRANSIENT",
    "WEIGHT",
    "Measurement",
    "WithingsClient",
    "format_measurement",
    "measurement_from_group",
    "measurement_to_dict",
    "measurements_to_csv",
    "measurements_to_json",
]

WEIGHT, DIASTOLIC, SYSTOLIC, PULSE = 1, 9, 10, 11
#: the meastypes asked for: weight and blood pressure (with the pulse measured alongside)
BLOOD_PRESSURE = (DIASTOLIC, SYSTOLIC, PULSE)
#: documented "Authentication failed" statuses
AUTH_FAILED = frozenset({100, 101, 102, 200, 401})
#: documented "Timeout", "Too many request" and "An error occurred" (5000-5006) statuses
TRANSIENT = frozenset({522, 601, *range(5000, 5007)})
_UNCERTAIN_ATTRIB = frozenset({1, 4})
_MAX_PAGES = 50


@dataclass(frozen=True)
class Measurement:
    """One measure group: a weigh-in, a blood-pressure reading, or both."""

    taken_at: datetime  # aware, UTC
    group_id: int
    weight_kg: float | None = None
    systolic: float | None = None
    diastolic: float | None = None
    pulse: float | None = None
    model: str | None = None
    attrib: int | None = None

    @property
    def uncertain(self) -> bool:
        """Possibly another person's (attrib 1) or entered at account creation (attrib 4)."""
        return self.attrib in _UNCERTAIN_ATTRIB

    @property
    def has_weight(self) -> bool:
        return self.weight_kg is not None

    @property
    def has_blood_pressure(self) -> bool:
        return self.systolic is not None and self.diastolic is not None


def _real(measure: dict[str, Any]) -> float:
    value, unit = measure["value"], measure.get("unit", 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("value")
    if isinstance(unit, bool) or not isinstance(unit, int):
        raise TypeError("unit")
    return round(float(value) * 10.0**unit, 6)


def measurement_from_group(group: dict[str, Any]) -> Measurement:
    """One ``measuregrps`` entry -> :class:`Measurement` (KeyError/TypeError when broken)."""
    values: dict[int, float] = {}
    for measure in group["measures"]:
        values[int(measure["type"])] = _real(measure)
    date = group["date"]
    if isinstance(date, bool) or not isinstance(date, int):
        raise TypeError("date")
    attrib = group.get("attrib")
    return Measurement(
        taken_at=datetime.fromtimestamp(date, UTC),
        group_id=int(group["grpid"]),
        weight_kg=values.get(WEIGHT),
        systolic=values.get(SYSTOLIC),
        diastolic=values.get(DIASTOLIC),
        pulse=values.get(PULSE),
        model=group.get("model") if isinstance(group.get("model"), str) else None,
        attrib=attrib if isinstance(attrib, int) and not isinstance(attrib, bool) else None,
    )


# ---------------------------------------------------------------------- formatting


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "--"
    return f"{value:.{digits}f}"


def format_measurement(m: Measurement, *, now: datetime) -> str:
    """One line for a human: ``78.4 kg`` and/or ``121/79 mmHg, pulse 64``, and the age."""
    parts = []
    if m.has_weight:
        parts.append(f"{_number(m.weight_kg, 1)} kg")
    if m.has_blood_pressure:
        bp = f"{_number(m.systolic, 0)}/{_number(m.diastolic, 0)} mmHg"
        if m.pulse is not None:
            bp += f", pulse {_number(m.pulse, 0)}"
        parts.append(bp)
    text = " · ".join(parts) or "no weight or blood pressure"
    flag = " (uncertain: may be another person's)" if m.uncertain else ""
    return f"{text} {age(now - m.taken_at)}{flag}"


def measurement_to_dict(m: Measurement) -> dict[str, Any]:
    return {
        "taken_at": m.taken_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "weight_kg": m.weight_kg,
        "systolic_mmhg": m.systolic,
        "diastolic_mmhg": m.diastolic,
        "pulse_bpm": m.pulse,
        "uncertain": m.uncertain,
        "model": m.model,
        "group_id": m.group_id,
    }


#: measurements: one row per measure group (:func:`measurement_to_dict`)
MEASUREMENT_ROWS = Rows(
    measurement_to_dict,
    (
        "taken_at",
        "weight_kg",
        "systolic_mmhg",
        "diastolic_mmhg",
        "pulse_bpm",
        "uncertain",
        "model",
        "group_id",
    ),
)
measurements_to_json = MEASUREMENT_ROWS.to_json
measurements_to_csv = MEASUREMENT_ROWS.to_csv


# -------------------------------------------------------------------------- client


class WithingsClient(ProviderClient):
    """Withings' Measure API on behalf of the owner; one instance per connection."""

    title = "Withings"
    default_provider = "withings"
    base_url_hint = "set api_base_url to https://wbsapi.withings.net"

    async def measurements(self, start: datetime, end: datetime) -> list[Measurement]:
        """Weight and blood-pressure groups taken in [start, end], oldest first."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("Withings dates need aware datetimes")
        groups = await self.getmeas(
            meastypes=(WEIGHT, *BLOOD_PRESSURE),
            startdate=int(start.timestamp()),
            enddate=int(end.timestamp()),
        )
        found = self.parse_each(measurement_from_group, groups, what="a measure group")
        unique = {m.group_id: m for m in found}
        return sorted(unique.values(), key=lambda m: (m.taken_at, m.group_id))

    async def latest(self, within_days: int = 365) -> tuple[Measurement | None, Measurement | None]:
        """The newest certain weigh-in and blood-pressure reading of the last ``within_days``."""
        end = self.now()
        items = await self.measurements(end - timedelta(days=within_days), end)
        certain = [m for m in items if not m.uncertain]
        weight = next((m for m in reversed(certain) if m.has_weight), None)
        pressure = next((m for m in reversed(certain) if m.has_blood_pressure), None)
        return weight, pressure

    async def getmeas(
        self,
        *,
        meastypes: Iterable[int],
        startdate: int | None = None,
        enddate: int | None = None,
        lastupdate: int | None = None,
        category: int = 1,
    ) -> list[dict[str, Any]]:
        """Every ``measuregrps`` entry, following ``more``/``offset`` page by page."""
        form = {
            "action": "getmeas",
            "meastypes": ",".join(str(t) for t in meastypes),
            "category": str(category),
        }
        for key, value in (
            ("startdate", startdate),
            ("enddate", enddate),
            ("lastupdate", lastupdate),
        ):
            if value is not None:
                form[key] = str(value)
        groups: list[dict[str, Any]] = []
        for _ in range(_MAX_PAGES):
            body = await self.api.request(
                "POST", f"{self.base_url}/measure", data=form, classify=self._classify
            )
            page = body.get("measuregrps")
            if not isinstance(page, list) or not all(isinstance(g, dict) for g in page):
                raise ProviderError(
                    "Withings answered getmeas without a measuregrps list",
                    provider=self.provider_id,
                )
            groups.extend(page)
            offset = body.get("offset")
            if not body.get("more") or not isinstance(offset, int) or isinstance(offset, bool):
                return groups
            form["offset"] = str(offset)
        raise ProviderError(
            f"Withings kept answering more=1 after {_MAX_PAGES} pages", provider=self.provider_id
        )

    def _classify(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise self.api.http_failure(response, what="getmeas")
        data = json_object(response, name="Withings", provider=self.provider_id)
        code = data.get("status")
        error = data.get("error")
        description = error[:200] if isinstance(error, str) else None
        if code == 0:
            body = data.get("body")
            if not isinstance(body, dict):
                raise ProviderError(
                    "Withings answered status 0 without a body", provider=self.provider_id
                )
            return body
        if not isinstance(code, int) or isinstance(code, bool):
            raise ProviderError(
                "Withings answered without its status envelope", provider=self.provider_id
            )
        if code in AUTH_FAILED:
            raise TokenRejectedError(
                oauth_error=f"status_{code}", description=description, provider_status=200
            )
        cls: type[ProviderError]
        if code in TRANSIENT:
            cls, message = ProviderTransientError, f"Withings is busy or failing (status {code})"
        else:
            cls, message = ProviderError, f"Withings refused getmeas (status {code})"
        raise cls(
            message,
            provider=self.provider_id,
            oauth_error=f"status_{code}",
            description=description,
            provider_status=200,
        )
