"""A faithful fake of the Dexcom API v3, mounted beside the simulated authorization server.

:class:`DexcomSim` is this integration's :class:`~integrations.Simulator`: its
:data:`DIALECT` tells the generic simulated OAuth server (agentd/simoauth.py) Dexcom's
paths and scope, and :meth:`DexcomSim.mount` adds the data endpoints::

    GET  /v2/oauth2/login        authorize (served by the generic server)
    POST /v2/oauth2/token        grant_type=authorization_code | refresh_token (idem)
    POST /v2/oauth2/revoke       RFC 7009 revocation (an addition: Dexcom documents none)
    GET  /v3/users/self/egvs     startDate, endDate (required)
    GET  /v3/users/self/events   startDate, endDate (required)
    GET  /v3/users/self/calibrations  startDate, endDate (required)
    GET  /v3/users/self/alerts   startDate, endDate (required)
    GET  /v3/users/self/dataRange     lastSyncTime (optional)
    GET  /v3/users/self/devices

What was checked against Dexcom's documentation (developer.dexcom.com), and what is a choice
of this simulator:

* Authorize / token endpoints ``/v2/oauth2/login`` and ``/v2/oauth2/token``; the token
  request is a form body carrying ``client_id`` and ``client_secret``; the only scope is
  ``offline_access``; the token response is ``access_token``, ``expires_in`` (7200 in the
  documented example), ``token_type`` ``"Bearer"``, ``refresh_token``
  (developer.dexcom.com/docs/dexcom/authentication). Dexcom's real response also carries
  Keycloak extras (``refresh_expires_in``, ``not-before-policy``, ``session_state``); the
  sim answers with the four documented keys.
* Whether Dexcom rotates refresh tokens is not documented (the generic server's
  ``rotate_refresh`` switches it). Code and refresh-token lifetimes are sim choices.
* Data endpoints and their record shapes follow the v3 operation pages:
  ``/docs/dexcomv3/operation/getEstimatedGlucoseValuesV3`` (``recordType``, ``recordVersion``
  "3.0", ``userId``, ``records[]`` of ``recordId``, ``systemTime``, ``displayTime``,
  ``transmitterId``, ``transmitterTicks``, ``value``, ``status`` (unknown|high|low|ok),
  ``trend`` (none|unknown|doubleUp|singleUp|fortyFiveUp|flat|fortyFiveDown|singleDown|
  doubleDown|notComputable|rateOutOfRange), ``trendRate``, ``unit`` "mg/dL", ``rateUnit``
  "mg/dL/min", ``displayDevice``, ``transmitterGeneration``), ``getEventsV3`` (recordType
  "events"; eventStatus, eventType, eventSubType, value, unit), ``getCalibrationsV3``
  (recordType "calibrations"), ``getAlertsEventsV3`` (recordType "alerts"; alertName,
  alertState, displayApp; "startDate: lower bound (inclusive) ... endDate: upper bound
  (exclusive)"), ``getDataRangeV3`` (recordType "dataRange"; calibrations/egvs/events each
  ``{start, end}`` of ``{systemTime, displayTime}``; optional ``lastSyncTime``).
* Timestamps: "records sourced from mobile apps (displayDevice iOS or android) will have UTC
  offsets; records sourced from receivers will not" (same pages). ``display_device`` picks
  which form the sim emits. Query dates are ``YYYY-MM-DDThh:mm:ss`` in UTC (the documented
  examples, e.g. ``startDate=2022-02-06T09:12:35``); anything else gets 400.
* Maximum window per request: 30 days. Source: the OpenAPI description generated from
  developer.dexcom.com/docs/dexcomv3/endpoint-overview (github.com/api-evangelist/dexcom,
  openapi/dexcom-estimated-glucose-values-api-openapi.yml: "The maximum window is 30 days";
  endDate "Must be no more than 30 days after startDate"). Dexcom's own page text for the
  limit was not found; ``max_window`` is a parameter. The sim answers 400 for a longer one.
* Rate limit 60,000 calls per app per hour, exceeding it returns HTTP 429
  (/docs/dexcomv3/endpoint-overview). The sim only injects 429/5xx on request
  (:meth:`agentd.simoauth.SimOAuth.inject`).
* Data delay: the FAQ (developer.dexcom.com/content/frequently-asked-questions) says EGVs are
  served on a three-hour delay. ``data_delay`` (default none, so demos show fresh data)
  hides readings newer than ``now - data_delay``.
* Error bodies of the data endpoints are not documented; the sim answers
  ``{"error": ..., "error_description": ...}``; a missing, unknown or expired token gets 401.

Glucose data is a deterministic function of time (5-minute cadence on an epoch-aligned grid):
a daily sine plus a 3-hour ripple, a low excursion near 03:30 UTC and a high one near 13:30
UTC, so any window returns the same values on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from flowengine import Clock

from .. import BearerCheck, SimDialect

if TYPE_CHECKING:  # pragma: no cover
    from quart import Quart, Response

__all__ = [
    "DEXCOM_MAX_WINDOW",
    "DIALECT",
    "DexcomSim",
    "SimRequest",
    "glucose_at",
]

DEXCOM_MAX_WINDOW = timedelta(days=30)
_CADENCE = 300  # seconds between EGVs
_PHASE = 23  # seconds past the 5-minute grid, so systemTimes do not look synthetic
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
_EVENT_TIMES = (45_600, 45_900)  # seconds of the UTC day: insulin 12:40, carbs 12:45
_CALIBRATION_TIME = 28_800  # 08:00 UTC

#: Dexcom's OAuth endpoints as the simulated authorization server serves them
DIALECT = SimDialect(
    name="Dexcom",
    authorize_path="/v2/oauth2/login",
    token_path="/v2/oauth2/token",
    revoke_path="/v2/oauth2/revoke",
    required_scope="offline_access",
    access_ttl=7200,
    code_ttl=60,
)


# ----------------------------------------------------------------------------- data


def glucose_at(t: float) -> float:
    """The simulated glucose (mg/dL, unrounded) at epoch second ``t``."""
    day = 86_400.0
    tod = t % day
    value = 120.0 + 20.0 * math.sin(2 * math.pi * (tod - 21_600.0) / day)
    value += 9.0 * math.sin(2 * math.pi * t / 10_800)
    # a nightly low around 03:30 UTC and a post-lunch high around 13:30 UTC
    value -= 60.0 * math.exp(-(((tod - 12_600.0) / 1_800.0) ** 2))
    value += 110.0 * math.exp(-(((tod - 48_600.0) / 2_000.0) ** 2))
    return max(40.0, min(400.0, value))


def _trend(rate: float) -> str:
    if rate > 3:
        return "doubleUp"
    if rate > 2:
        return "singleUp"
    if rate > 1:
        return "fortyFiveUp"
    if rate >= -1:
        return "flat"
    if rate >= -2:
        return "fortyFiveDown"
    if rate >= -3:
        return "singleDown"
    return "doubleDown"


def _grid_at_or_after(t: float) -> int:
    """The index k of the first reading at ``k*300 + PHASE >= t``."""
    return math.ceil((t - _PHASE) / _CADENCE)


def _grid_before(t: float) -> int:
    """The index k of the last reading at ``k*300 + PHASE < t``."""
    return math.ceil((t - _PHASE) / _CADENCE) - 1


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class SimRequest:
    """A data-API request as the sim received it (no secrets: the bearer token is not kept)."""

    method: str
    path: str
    query_string: str
    status: int


@dataclass
class DexcomCounters:
    api_requests: Counter[str] = field(default_factory=Counter)  # by endpoint name
    api_unauthorized: int = 0


class _BadRequest(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class DexcomSim:
    """The simulated Dexcom data API; hand it to ``agentd.simoauth.create_sim_app(api=…)``.

    ``data_delay`` hides the newest readings (Dexcom's FAQ: 3 h), ``history`` bounds the
    oldest; ``display_device`` "receiver" emits timestamps without UTC offsets,
    "iOS"/"android" with offsets, as Dexcom documents.
    """

    provider = "dexcom"
    dialect = DIALECT
    path_prefix = "/v3/"

    def __init__(
        self,
        *,
        clock: Clock,
        max_window: timedelta = DEXCOM_MAX_WINDOW,
        data_delay: timedelta = timedelta(0),
        history: timedelta = timedelta(days=90),
        display_device: str = "iOS",
        transmitter_generation: str = "g7",
        display_tz: str = "UTC",
        user_id: str = "sim-user-0001",
    ) -> None:
        self.clock = clock
        self.max_window = max_window
        self.data_delay = data_delay
        self.history = history
        self.display_device = display_device
        self.transmitter_generation = transmitter_generation
        self.display_tz = ZoneInfo(display_tz)
        self.user_id = user_id
        self.transmitter_id = hashlib.sha256(f"tx:{user_id}".encode()).hexdigest()
        self.counters = DexcomCounters()
        self.requests: list[SimRequest] = []

    def latest_egv_time(self) -> datetime:
        """systemTime of the newest reading the API would serve right now."""
        k = _grid_before(self._visible_until() + 1e-6)
        return datetime.fromtimestamp(k * _CADENCE + _PHASE, UTC)

    # ------------------------------------------------------------------------- data

    def _visible_until(self) -> float:
        return self.clock.now() - self.data_delay.total_seconds()

    def _data_start(self) -> float:
        return self.clock.now() - self.history.total_seconds()

    def _times(self, t: float) -> tuple[str, str]:
        utc = datetime.fromtimestamp(t, UTC)
        local = utc.astimezone(self.display_tz)
        if self.display_device == "receiver":
            return utc.strftime("%Y-%m-%dT%H:%M:%S"), local.strftime("%Y-%m-%dT%H:%M:%S")
        return utc.isoformat(timespec="seconds"), local.isoformat(timespec="seconds")

    def _common(self, t: float) -> dict[str, Any]:
        system, display = self._times(t)
        return {"systemTime": system, "displayTime": display}

    def _window(self, start: float, end: float) -> range:
        lo = max(start, self._data_start())
        hi = min(end, self._visible_until() + 1e-6)
        if hi <= lo:
            return range(0)
        return range(_grid_at_or_after(lo), _grid_before(hi) + 1)

    def _record_id(self, kind: str, k: int) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sim-dexcom:{self.user_id}:{kind}:{k}"))

    def egv_records(self, start: float, end: float) -> list[dict[str, Any]]:
        records = []
        for k in self._window(start, end):
            t = k * _CADENCE + _PHASE
            value = round(glucose_at(t))
            rate = round((glucose_at(t) - glucose_at(t - _CADENCE)) / 5.0, 2)
            records.append(
                {
                    "recordId": self._record_id("egv", k),
                    **self._common(t),
                    "transmitterId": self.transmitter_id,
                    "transmitterTicks": (k * _CADENCE) % 7_776_000,
                    "value": value,
                    "status": "ok",
                    "trend": _trend(rate),
                    "trendRate": rate,
                    "unit": "mg/dL",
                    "rateUnit": "mg/dL/min",
                    "displayDevice": self.display_device,
                    "transmitterGeneration": self.transmitter_generation,
                }
            )
        return records

    def _daily(self, start: float, end: float, second_of_day: int) -> list[tuple[int, float]]:
        lo = max(start, self._data_start())
        hi = min(end, self._visible_until() + 1e-6)
        out = []
        day = math.floor(lo / 86_400)
        while day * 86_400 + second_of_day < hi:
            t = day * 86_400 + second_of_day
            if t >= lo:
                out.append((day, float(t)))
            day += 1
        return out

    def event_records(self, start: float, end: float) -> list[dict[str, Any]]:
        records = []
        meals = [
            (_EVENT_TIMES[0], "insulin", "fastActing", "4.5", "units"),
            (_EVENT_TIMES[1], "carbs", None, "45", "grams"),
        ]
        pairs = [(d, t, m) for m in meals for d, t in self._daily(start, end, m[0])]
        for day, t, (_, etype, sub, value, unit) in sorted(pairs, key=lambda p: p[1]):
            records.append(
                {
                    **self._common(t),
                    "recordId": self._record_id(f"event-{etype}", day),
                    "eventStatus": "created",
                    "eventType": etype,
                    "eventSubType": sub,
                    "value": value,
                    "unit": unit,
                    "transmitterId": self.transmitter_id,
                    "transmitterGeneration": self.transmitter_generation,
                    "displayDevice": self.display_device,
                }
            )
        return records

    def calibration_records(self, start: float, end: float) -> list[dict[str, Any]]:
        return [
            {
                "recordId": self._record_id("calibration", day),
                **self._common(t),
                "unit": "mg/dL",
                "value": round(glucose_at(t)) + 6,
                "displayDevice": self.display_device,
                "transmitterId": self.transmitter_id,
                "transmitterTicks": int(t) % 7_776_000,
                "transmitterGeneration": self.transmitter_generation,
            }
            for day, t in self._daily(start, end, _CALIBRATION_TIME)
        ]

    def alert_records(self, start: float, end: float) -> list[dict[str, Any]]:
        records = []
        for k in self._window(start, end):
            t = k * _CADENCE + _PHASE
            now_v, prev_v = round(glucose_at(t)), round(glucose_at(t - _CADENCE))
            name = None
            if now_v < 70 <= prev_v:
                name = "low"
            elif now_v > 180 >= prev_v:
                name = "high"
            if name is None:
                continue
            records.append(
                {
                    "recordId": self._record_id(f"alert-{name}", k),
                    **self._common(t),
                    "alertName": name,
                    "alertState": "activeAlarming",
                    "displayDevice": self.display_device,
                    "transmitterGeneration": self.transmitter_generation,
                    "transmitterId": self.transmitter_id,
                    "displayApp": "G7" if self.transmitter_generation == "g7" else "G6",
                }
            )
        return records

    def answer(self, record_type: str, **fields: Any) -> dict[str, Any]:
        """A v3 answer: ``recordType``, ``recordVersion`` and ``userId``, then ``fields``."""
        return {
            "recordType": record_type,
            "recordVersion": "3.0",
            "userId": self.user_id,
            **fields,
        }

    def data_range(self, since: float | None) -> dict[str, Any]:
        start = self._data_start() if since is None else max(self._data_start(), since)
        end = self._visible_until() + 1e-6

        def window(times: list[float]) -> dict[str, Any] | None:
            if not times:
                return None
            return {"start": self._common(times[0]), "end": self._common(times[-1])}

        egv_ks = self._window(start, end)
        egvs = [float(k * _CADENCE + _PHASE) for k in ([egv_ks[0], egv_ks[-1]] if egv_ks else [])]
        return self.answer(
            "dataRange",
            calibrations=window([t for _, t in self._daily(start, end, _CALIBRATION_TIME)]),
            egvs=window(egvs),
            events=window(
                sorted(t for sod in _EVENT_TIMES for _, t in self._daily(start, end, sod))
            ),
        )

    def device_records(self) -> list[dict[str, Any]]:
        upload = self._times(self._visible_until())[0]
        return [
            {
                "lastUploadDate": upload,
                "transmitterId": self.transmitter_id,
                "transmitterGeneration": self.transmitter_generation,
                "displayDevice": self.display_device,
                "displayApp": "G7" if self.transmitter_generation == "g7" else "G6",
                "alertSchedules": [
                    {
                        "alertScheduleSettings": {
                            "alertScheduleName": "Default",
                            "isEnabled": True,
                            "isDefaultSchedule": True,
                            "startTime": "00:00",
                            "endTime": "00:00",
                            "daysOfWeek": [
                                "sunday",
                                "monday",
                                "tuesday",
                                "wednesday",
                                "thursday",
                                "friday",
                                "saturday",
                            ],
                            "isActive": True,
                            "override": {"isOverrideEnabled": False, "mode": "quiet"},
                        },
                        "alertSettings": [
                            {"alertName": "low", "value": 70, "unit": "mg/dL", "enabled": True},
                            {"alertName": "high", "value": 180, "unit": "mg/dL", "enabled": True},
                        ],
                    }
                ],
            }
        ]

    # -------------------------------------------------------------------------- app

    def mount(self, app: Quart, bearer: BearerCheck) -> None:
        """Add the /v3/users/self/* endpoints to ``app``."""
        from quart import Response, request

        sim = self

        def reply(
            body: Any, status: int = 200, headers: Mapping[str, str] | None = None
        ) -> Response:
            resp = Response(json.dumps(body), status=status, content_type="application/json")
            for key, value in (headers or {}).items():
                resp.headers[key] = value
            return resp

        @app.after_request
        async def log_request(response: Response) -> Response:
            if request.path.startswith(sim.path_prefix):
                sim.counters.api_requests[request.path.rsplit("/", 1)[-1]] += 1
                query = request.query_string.decode("latin-1")
                sim.requests.append(
                    SimRequest(request.method, request.path, query, response.status_code)
                )
            return response

        def authorized() -> bool:
            header = request.headers.get("Authorization", "")
            if header[:7].lower() != "bearer ":
                return False
            return bearer.access_token_valid(header[7:].strip())

        def parse_date(name: str) -> float:
            raw = request.args.get(name)
            if raw is None:
                raise _BadRequest("invalid_request", f"{name} is required")
            if not _DATE_RE.fullmatch(raw):
                raise _BadRequest("invalid_request", f"{name} must be YYYY-MM-DDThh:mm:ss (UTC)")
            try:
                return datetime.strptime(raw, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
            except ValueError as err:
                raise _BadRequest("invalid_request", f"{name} is not a valid date") from err

        def window() -> tuple[float, float]:
            start, end = parse_date("startDate"), parse_date("endDate")
            if end <= start:
                raise _BadRequest("invalid_request", "endDate must be after startDate")
            if end - start > sim.max_window.total_seconds():
                raise _BadRequest(
                    "invalid_request",
                    f"the time window may not exceed {sim.max_window.days} days",
                )
            return start, end

        def api(build: Callable[[], dict[str, Any]]) -> Response:
            if not authorized():
                sim.counters.api_unauthorized += 1
                return reply(
                    {"error": "invalid_token", "error_description": "missing, unknown or expired"},
                    401,
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            try:
                body = build()
            except _BadRequest as err:
                return reply({"error": err.error, "error_description": err.description}, 400)
            return reply(body)

        def serve_records(
            path: str, kind: str, make: Callable[[float, float], list[dict[str, Any]]]
        ) -> None:
            async def view() -> Response:
                return api(lambda: sim.answer(kind, records=make(*window())))

            app.add_url_rule(f"/v3/users/self/{path}", path, view, methods=["GET"])

        for path, kind, make in (
            ("egvs", "egv", sim.egv_records),
            ("events", "events", sim.event_records),
            ("calibrations", "calibrations", sim.calibration_records),
            ("alerts", "alerts", sim.alert_records),
        ):
            serve_records(path, kind, make)

        @app.get("/v3/users/self/dataRange")
        async def data_range() -> Response:
            def build() -> dict[str, Any]:
                since = parse_date("lastSyncTime") if "lastSyncTime" in request.args else None
                return sim.data_range(since)

            return api(build)

        @app.get("/v3/users/self/devices")
        async def devices() -> Response:
            return api(lambda: sim.answer("device", records=sim.device_records()))
