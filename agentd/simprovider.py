"""A simulated OAuth 2.0 provider and a faithful fake of the Dexcom API v3.

Used by the test-suite (in-process through ``httpx.ASGITransport``) and by the product's demo
(served by Hypercorn like any Quart app). :func:`create_sim_app` returns a Quart app; its
state, counters and failure injection live on a :class:`SimProvider` reachable with
:func:`get_sim`.

Endpoints (paths as on ``api.dexcom.com``)::

    GET  /v2/oauth2/login        authorize: consent page (Allow / Deny) or auto allow / deny
    POST /v2/oauth2/login        the consent form's answer -> 302 to redirect_uri
    POST /v2/oauth2/token        grant_type=authorization_code | refresh_token
    POST /v2/oauth2/revoke       RFC 7009 revocation (an addition: Dexcom documents none)
    GET  /v3/users/self/egvs     startDate, endDate (required)
    GET  /v3/users/self/events   startDate, endDate (required)
    GET  /v3/users/self/calibrations  startDate, endDate (required)
    GET  /v3/users/self/alerts   startDate, endDate (required)
    GET  /v3/users/self/dataRange     lastSyncTime (optional)
    GET  /v3/users/self/devices
    GET  /_sim/counters          the sim's counters as JSON (demo dashboards; not Dexcom)

What was checked against Dexcom's documentation (developer.dexcom.com), and what is a choice
of this simulator:

* Authorize / token endpoints ``/v2/oauth2/login`` and ``/v2/oauth2/token``; the token
  request is a form body carrying ``client_id`` and ``client_secret``; the only scope is
  ``offline_access``; the token response is ``access_token``, ``expires_in`` (7200 in the
  documented example), ``token_type`` ``"Bearer"``, ``refresh_token``
  (developer.dexcom.com/docs/dexcom/authentication; the v3 swagger bundle's token-response
  example). Dexcom's real response also carries Keycloak extras (``refresh_expires_in``,
  ``not-before-policy``, ``session_state``); the sim answers with the four documented keys.
* Whether Dexcom rotates refresh tokens is not documented: ``rotate_refresh`` switches it.
  Code lifetime (``code_ttl``) and refresh-token lifetime (``refresh_ttl``) are sim choices.
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
  limit was not in the searchable corpus; ``max_window`` is a parameter. The sim answers
  400 for a longer window.
* Rate limit 60,000 calls per app per hour, exceeding it returns HTTP 429
  (/docs/dexcomv3/endpoint-overview). The sim only injects 429/5xx on request.
* Data delay: the FAQ (developer.dexcom.com/content/frequently-asked-questions) says EGVs are
  served on a three-hour delay; community reports say one hour in the US. ``data_delay``
  (default none) hides readings newer than ``now - data_delay``.
* Error bodies of the data endpoints are not documented; the sim answers
  ``{"error": ..., "error_description": ...}``.

Glucose data is a deterministic function of time (5-minute cadence on an epoch-aligned grid):
a daily sine plus a 3-hour ripple, a low excursion near 03:30 UTC and a high one near 13:30
UTC, so any window returns the same values on every run.

No secret (client secret, code, verifier, token) is ever logged or returned except the
tokens the token endpoint hands out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import math
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from quart import Quart, Response, request

from flowengine.clock import Clock, SystemClock

__all__ = [
    "DEXCOM_MAX_WINDOW",
    "SimCounters",
    "SimProvider",
    "SimRequest",
    "create_sim_app",
    "get_sim",
    "glucose_at",
]

DEXCOM_MAX_WINDOW = timedelta(days=30)
_CADENCE = 300  # seconds between EGVs
_PHASE = 23  # seconds past the 5-minute grid, so systemTimes do not look synthetic
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
_EXTENSION = "simprovider"
_EVENT_TIMES = (45_600, 45_900)  # seconds of the UTC day: insulin 12:40, carbs 12:45
_CALIBRATION_TIME = 28_800  # 08:00 UTC

Consent = Literal["ask", "allow", "deny"]


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


@dataclass
class SimCounters:
    """What the sim saw; tests and the demo read these."""

    token_requests: Counter[str] = field(default_factory=Counter)  # by grant_type
    token_errors: Counter[str] = field(default_factory=Counter)  # by OAuth error code
    codes_issued: int = 0
    access_tokens_issued: int = 0
    refresh_issued: int = 0
    refresh_rejected: int = 0
    revocations: int = 0
    api_requests: Counter[str] = field(default_factory=Counter)  # by endpoint name
    api_unauthorized: int = 0
    injected: int = 0


@dataclass(frozen=True)
class SimRequest:
    """A data-API request as the sim received it (no secrets: the bearer token is not kept)."""

    method: str
    path: str
    query_string: str
    status: int


@dataclass
class _Pending:
    client_id: str
    redirect_uri: str
    state: str | None
    challenge: str | None
    scope: str
    expires_at: float


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str | None
    expires_at: float
    used: bool = False
    issued_refresh: set[str] = field(default_factory=set)
    issued_access: set[str] = field(default_factory=set)


@dataclass
class _Access:
    client_id: str
    expires_at: float
    refresh: str | None


@dataclass
class _Refresh:
    client_id: str
    expires_at: float | None
    active: bool = True


@dataclass
class _Injection:
    status: int
    remaining: int
    retry_after: str | None
    path_prefix: str


class _OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class SimProvider:
    """The simulator's state. Built by :func:`create_sim_app`; see its parameters."""

    def __init__(
        self,
        *,
        clock: Clock,
        access_ttl: int,
        refresh_ttl: int | None,
        code_ttl: int,
        rotate_refresh: bool,
        clients: Mapping[str, str | None],
        redirect_uris: Mapping[str, list[str]],
        consent: Consent,
        require_state: bool,
        require_pkce: bool,
        scope: str,
        max_window: timedelta,
        data_delay: timedelta,
        history: timedelta,
        display_device: str,
        transmitter_generation: str,
        display_tz: str,
        user_id: str,
    ) -> None:
        self.clock = clock
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.code_ttl = code_ttl
        self.rotate_refresh = rotate_refresh
        self.clients = dict(clients)
        self.redirect_uris = {k: list(v) for k, v in redirect_uris.items()}
        self.consent: Consent = consent
        self.require_state = require_state
        self.require_pkce = require_pkce
        self.scope = scope
        self.max_window = max_window
        self.data_delay = data_delay
        self.history = history
        self.display_device = display_device
        self.transmitter_generation = transmitter_generation
        self.display_tz = ZoneInfo(display_tz)
        self.user_id = user_id
        self.transmitter_id = hashlib.sha256(f"tx:{user_id}".encode()).hexdigest()
        self.counters = SimCounters()
        self.requests: list[SimRequest] = []
        self._pending: dict[str, _Pending] = {}
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._injections: list[_Injection] = []

    # ---------------------------------------------------------------- test/demo API

    def inject(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after: float | str | None = None,
        path_prefix: str = "/v3/",
    ) -> None:
        """Answer the next ``count`` requests under ``path_prefix`` with ``status``.

        ``retry_after`` becomes a ``Retry-After`` header (seconds or an HTTP-date string).
        """
        after = None if retry_after is None else str(retry_after)
        if isinstance(retry_after, float) and retry_after.is_integer():
            after = str(int(retry_after))
        self._injections.append(_Injection(status, count, after, path_prefix))

    def issue_tokens(self, client_id: str | None = None) -> dict[str, Any]:
        """Mint a token pair without the browser dance (demo seeding, client tests)."""
        cid = client_id if client_id is not None else next(iter(self.clients))
        if cid not in self.clients:
            raise KeyError(f"unknown sim client {cid!r}")
        return self._token_response(cid, None)

    def expire_access_tokens(self) -> None:
        """Make every issued access token expired (refresh tokens stay valid)."""
        now = self.clock.now()
        for entry in self._access.values():
            entry.expires_at = min(entry.expires_at, now)

    def counters_snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON-ready data (no secrets in them)."""
        c = self.counters
        return {
            "token_requests": dict(c.token_requests),
            "token_errors": dict(c.token_errors),
            "codes_issued": c.codes_issued,
            "access_tokens_issued": c.access_tokens_issued,
            "refresh_issued": c.refresh_issued,
            "refresh_rejected": c.refresh_rejected,
            "revocations": c.revocations,
            "api_requests": dict(c.api_requests),
            "api_unauthorized": c.api_unauthorized,
            "injected": c.injected,
        }

    def latest_egv_time(self) -> datetime:
        """systemTime of the newest reading the API would serve right now."""
        k = _grid_before(self._visible_until() + 1e-6)
        return datetime.fromtimestamp(k * _CADENCE + _PHASE, UTC)

    # ----------------------------------------------------------------------- tokens

    def _new_refresh(self, client_id: str) -> str:
        token = secrets.token_urlsafe(32)
        expires = None if self.refresh_ttl is None else self.clock.now() + self.refresh_ttl
        self._refresh[token] = _Refresh(client_id, expires)
        self.counters.refresh_issued += 1
        return token

    def _token_response(self, client_id: str, refresh: str | None) -> dict[str, Any]:
        if refresh is None:
            refresh = self._new_refresh(client_id)
        access = secrets.token_urlsafe(32)
        self._access[access] = _Access(client_id, self.clock.now() + self.access_ttl, refresh)
        self.counters.access_tokens_issued += 1
        return {
            "access_token": access,
            "expires_in": self.access_ttl,
            "token_type": "Bearer",
            "refresh_token": refresh,
        }

    def _revoke_refresh(self, token: str) -> None:
        entry = self._refresh.get(token)
        if entry is not None:
            entry.active = False
        for access in self._access.values():
            if access.refresh == token:
                access.expires_at = float("-inf")

    def _authenticate_client(self, form: Mapping[str, str]) -> str:
        """client_secret_post (Dexcom's way), client_secret_basic, or none for public clients."""
        header = request.headers.get("Authorization", "")
        basic_id = basic_secret = None
        if header[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
                basic_id, _, basic_secret = raw.partition(":")
            except (binascii.Error, UnicodeDecodeError) as err:
                raise _OAuthError("invalid_client", "malformed Basic credentials", 401) from err
            basic_id, basic_secret = unquote_plus(basic_id), unquote_plus(basic_secret)
            if "client_secret" in form:
                raise _OAuthError("invalid_request", "more than one client authentication method")
        client_id = basic_id if basic_id is not None else form.get("client_id", "")
        if basic_id is not None and form.get("client_id") not in (None, basic_id):
            raise _OAuthError("invalid_request", "client_id does not match the Basic credentials")
        secret = basic_secret if basic_id is not None else form.get("client_secret")
        if client_id not in self.clients:
            raise _OAuthError("invalid_client", "unknown client", 401)
        expected = self.clients[client_id]
        if expected is None:  # public client
            if secret:
                raise _OAuthError("invalid_client", "public clients send no secret", 401)
            return client_id
        if not secret or not hmac.compare_digest(secret.encode(), expected.encode()):
            raise _OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def _grant_code(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        code_value = form.get("code", "")
        code = self._codes.get(code_value)
        if code is None:
            raise _OAuthError("invalid_grant", "unknown authorization code")
        if code.used:
            # RFC 6749 §4.1.2: a reused code SHOULD revoke what it produced.
            for token in code.issued_refresh:
                self._revoke_refresh(token)
            raise _OAuthError("invalid_grant", "authorization code already used")
        code.used = True  # any attempt spends the code (no verifier guessing)
        if code.client_id != client_id:
            raise _OAuthError("invalid_grant", "code was issued to another client")
        if self.clock.now() >= code.expires_at:
            raise _OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != code.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri does not match the authorize request")
        verifier = form.get("code_verifier")
        if code.challenge is not None:
            if not verifier:
                raise _OAuthError("invalid_grant", "code_verifier required")
            digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
            computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
            if not hmac.compare_digest(computed, code.challenge):
                raise _OAuthError("invalid_grant", "code_verifier does not match the challenge")
        elif verifier:
            raise _OAuthError("invalid_grant", "code_verifier sent but no challenge was")
        body = self._token_response(client_id, None)
        code.issued_refresh.add(body["refresh_token"])
        return body

    def _grant_refresh(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token", "")
        entry = self._refresh.get(token)
        now = self.clock.now()
        if (
            entry is None
            or not entry.active
            or entry.client_id != client_id
            or (entry.expires_at is not None and now >= entry.expires_at)
        ):
            self.counters.refresh_rejected += 1
            raise _OAuthError("invalid_grant", "refresh token is invalid, expired or revoked")
        if self.rotate_refresh:
            entry.active = False
            return self._token_response(client_id, None)
        return self._token_response(client_id, token)

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

    def data_range(self, since: float | None) -> dict[str, Any]:
        start = self._data_start() if since is None else max(self._data_start(), since)
        end = self._visible_until() + 1e-6

        def window(times: list[float]) -> dict[str, Any] | None:
            if not times:
                return None
            return {"start": self._common(times[0]), "end": self._common(times[-1])}

        egv_ks = self._window(start, end)
        egvs = [float(k * _CADENCE + _PHASE) for k in ([egv_ks[0], egv_ks[-1]] if egv_ks else [])]
        return {
            "recordType": "dataRange",
            "recordVersion": "3.0",
            "userId": self.user_id,
            "calibrations": window([t for _, t in self._daily(start, end, _CALIBRATION_TIME)]),
            "egvs": window(egvs),
            "events": window(
                sorted(t for sod in _EVENT_TIMES for _, t in self._daily(start, end, sod))
            ),
        }

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


# ------------------------------------------------------------------------- helpers


def _oauth_json(error: str, description: str, status: int) -> Response:
    resp = Response(
        json.dumps({"error": error, "error_description": description}),
        status=status,
        content_type="application/json",
    )
    resp.headers["Cache-Control"] = "no-store"
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="sim"'
    return resp


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    resp = Response(json.dumps(body), status=status, content_type="application/json")
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _with_query(uri: str, params: Mapping[str, str | None]) -> str:
    parts = urlsplit(uri)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _redirect(location: str) -> Response:
    resp = Response("", status=302)
    resp.headers["Location"] = location
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _error_page(message: str, status: int = 400) -> Response:
    text = (
        "<!doctype html><html><head><title>Sign-in error</title></head><body>"
        f"<h1>Cannot continue</h1><p>{html.escape(message)}</p></body></html>"
    )
    return Response(text, status=status, content_type="text/html; charset=utf-8")


def _consent_page(ticket: str, client_id: str, redirect_uri: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Dexcom (simulated) - Authorize</title>
<style>body{{font-family:sans-serif;max-width:32rem;margin:3rem auto}}
button{{font-size:1.1rem;padding:.5rem 1.5rem;margin-right:1rem}}</style></head>
<body><h1>Simulated Dexcom</h1>
<p>The application <strong>{html.escape(client_id)}</strong> asks to read your CGM data
(scope <code>offline_access</code>).</p>
<p>You will be sent back to <code>{html.escape(redirect_uri)}</code>.</p>
<form method="post" action="/v2/oauth2/login">
<input type="hidden" name="ticket" value="{html.escape(ticket)}">
<button type="submit" name="decision" value="allow" id="allow">Allow</button>
<button type="submit" name="decision" value="deny" id="deny">Deny</button>
</form></body></html>"""


# ----------------------------------------------------------------------------- app


def create_sim_app(
    *,
    clock: Clock | None = None,
    access_ttl: int = 7200,
    refresh_ttl: int | None = None,
    code_ttl: int = 60,
    rotate_refresh: bool = True,
    clients: Mapping[str, str | None] | None = None,
    redirect_uris: Iterable[str] | Mapping[str, Iterable[str]] = (),
    consent: Consent = "ask",
    require_state: bool = True,
    require_pkce: bool = False,
    scope: str = "offline_access",
    max_window: timedelta = DEXCOM_MAX_WINDOW,
    data_delay: timedelta = timedelta(0),
    history: timedelta = timedelta(days=90),
    display_device: str = "iOS",
    transmitter_generation: str = "g7",
    display_tz: str = "UTC",
    user_id: str = "sim-user-0001",
) -> Quart:
    """Build the simulated provider.

    ``clients`` maps client_id to its secret (``None``: a public client, PKCE then required).
    ``redirect_uris`` is either one list for every client or a mapping per client; matched
    exactly. ``consent``: "ask" shows the Allow/Deny page, "allow"/"deny" answer at once
    (scripted runs). ``display_device`` "receiver" emits timestamps without UTC offsets,
    "iOS"/"android" with offsets, as Dexcom documents.
    """
    if clients is None:
        clients = {"sim-client": "sim-secret"}
    if isinstance(redirect_uris, Mapping):
        uris = {cid: list(v) for cid, v in redirect_uris.items()}
    else:
        shared = list(redirect_uris)
        uris = {cid: shared for cid in clients}
    sim = SimProvider(
        clock=clock or SystemClock(),
        access_ttl=access_ttl,
        refresh_ttl=refresh_ttl,
        code_ttl=code_ttl,
        rotate_refresh=rotate_refresh,
        clients=clients,
        redirect_uris=uris,
        consent=consent,
        require_state=require_state,
        require_pkce=require_pkce,
        scope=scope,
        max_window=max_window,
        data_delay=data_delay,
        history=history,
        display_device=display_device,
        transmitter_generation=transmitter_generation,
        display_tz=display_tz,
        user_id=user_id,
    )
    app = Quart(__name__)
    app.extensions[_EXTENSION] = sim

    def injected(path: str) -> Response | None:
        for inj in sim._injections:
            if inj.remaining > 0 and path.startswith(inj.path_prefix):
                inj.remaining -= 1
                sim.counters.injected += 1
                headers = {"Retry-After": inj.retry_after} if inj.retry_after else {}
                return _json(
                    {"error": "injected", "error_description": f"simulated HTTP {inj.status}"},
                    inj.status,
                    headers,
                )
        sim._injections = [i for i in sim._injections if i.remaining > 0]
        return None

    def decide(pending: _Pending, allow: bool) -> Response:
        if not allow:
            return _redirect(
                _with_query(
                    pending.redirect_uri,
                    {
                        "error": "access_denied",
                        "error_description": "The user denied access",
                        "state": pending.state,
                    },
                )
            )
        code = secrets.token_urlsafe(24)
        sim._codes[code] = _Code(
            pending.client_id,
            pending.redirect_uri,
            pending.challenge,
            sim.clock.now() + sim.code_ttl,
        )
        sim.counters.codes_issued += 1
        return _redirect(_with_query(pending.redirect_uri, {"code": code, "state": pending.state}))

    @app.get("/v2/oauth2/login")
    async def authorize() -> Response:
        args = request.args
        client_id = args.get("client_id", "")
        redirect_uri = args.get("redirect_uri", "")
        if client_id not in sim.clients:
            return _error_page("unknown client_id")
        if redirect_uri not in sim.redirect_uris.get(client_id, []):
            return _error_page("redirect_uri does not match the registered one")
        state = args.get("state")

        def fail(error: str, description: str) -> Response:
            return _redirect(
                _with_query(
                    redirect_uri, {"error": error, "error_description": description, "state": state}
                )
            )

        if args.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        if sim.require_state and not state:
            return fail("invalid_request", "state is required")
        if sim.scope and sim.scope not in (args.get("scope") or "").split():
            return fail("invalid_scope", f"scope must be {sim.scope}")
        challenge = args.get("code_challenge")
        if challenge is not None:
            if args.get("code_challenge_method") != "S256":
                return fail("invalid_request", "code_challenge_method must be S256")
            if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
                return fail("invalid_request", "malformed code_challenge")
        elif sim.require_pkce or sim.clients[client_id] is None:
            return fail("invalid_request", "PKCE code_challenge required")
        pending = _Pending(
            client_id,
            redirect_uri,
            state,
            challenge,
            args.get("scope") or "",
            sim.clock.now() + 600,
        )
        if sim.consent == "allow":
            return decide(pending, True)
        if sim.consent == "deny":
            return decide(pending, False)
        ticket = secrets.token_urlsafe(16)
        sim._pending[ticket] = pending
        page = _consent_page(ticket, client_id, redirect_uri)
        return Response(page, status=200, content_type="text/html; charset=utf-8")

    @app.post("/v2/oauth2/login")
    async def consent_answer() -> Response:
        form = await request.form
        pending = sim._pending.pop(form.get("ticket", ""), None)
        if pending is None or sim.clock.now() >= pending.expires_at:
            return _error_page("this sign-in page expired; start again")
        return decide(pending, form.get("decision") == "allow")

    @app.post("/v2/oauth2/token")
    async def token() -> Response:
        blocked = injected(request.path)
        if blocked is not None:
            return blocked
        form = {k: v for k, v in (await request.form).items()}
        grant = form.get("grant_type", "")
        sim.counters.token_requests[grant or "(none)"] += 1
        try:
            client_id = sim._authenticate_client(form)
            if grant == "authorization_code":
                body = sim._grant_code(client_id, form)
            elif grant == "refresh_token":
                body = sim._grant_refresh(client_id, form)
            else:
                raise _OAuthError("unsupported_grant_type", "unsupported grant_type")
        except _OAuthError as err:
            sim.counters.token_errors[err.error] += 1
            return _oauth_json(err.error, err.description, err.status)
        return _json(body, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    @app.post("/v2/oauth2/revoke")
    async def revoke() -> Response:
        form = {k: v for k, v in (await request.form).items()}
        try:
            client_id = sim._authenticate_client(form)
        except _OAuthError as err:
            return _oauth_json(err.error, err.description, err.status)
        value = form.get("token", "")
        if value in sim._refresh and sim._refresh[value].client_id == client_id:
            sim._revoke_refresh(value)
            sim.counters.revocations += 1
        elif value in sim._access and sim._access[value].client_id == client_id:
            sim._access[value].expires_at = float("-inf")
            sim.counters.revocations += 1
        return Response("", status=200)

    # ----------------------------------------------------------------- data API

    def authorized() -> bool:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            return False
        entry = sim._access.get(header[7:].strip())
        return entry is not None and sim.clock.now() < entry.expires_at

    def parse_date(name: str) -> float:
        raw = request.args.get(name)
        if raw is None:
            raise _OAuthError("invalid_request", f"{name} is required")
        if not _DATE_RE.fullmatch(raw):
            raise _OAuthError("invalid_request", f"{name} must be YYYY-MM-DDThh:mm:ss (UTC)")
        try:
            return datetime.strptime(raw, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        except ValueError as err:
            raise _OAuthError("invalid_request", f"{name} is not a valid date") from err

    def window() -> tuple[float, float]:
        start, end = parse_date("startDate"), parse_date("endDate")
        if end <= start:
            raise _OAuthError("invalid_request", "endDate must be after startDate")
        if end - start > sim.max_window.total_seconds():
            raise _OAuthError(
                "invalid_request",
                f"the time window may not exceed {sim.max_window.days} days",
            )
        return start, end

    async def api(name: str, build: Any) -> Response:
        sim.counters.api_requests[name] += 1
        query = request.query_string.decode("latin-1")

        def done(resp: Response) -> Response:
            sim.requests.append(SimRequest(request.method, request.path, query, resp.status_code))
            return resp

        blocked = injected(request.path)
        if blocked is not None:
            return done(blocked)
        if not authorized():
            sim.counters.api_unauthorized += 1
            return done(
                _json(
                    {"error": "invalid_token", "error_description": "missing, unknown or expired"},
                    401,
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            )
        try:
            body = build()
        except _OAuthError as err:
            return done(_json({"error": err.error, "error_description": err.description}, 400))
        return done(_json(body))

    def records(kind: str, make: Any) -> dict[str, Any]:
        start, end = window()
        return {
            "recordType": kind,
            "recordVersion": "3.0",
            "userId": sim.user_id,
            "records": make(start, end),
        }

    @app.get("/v3/users/self/egvs")
    async def egvs() -> Response:
        return await api("egvs", lambda: records("egv", sim.egv_records))

    @app.get("/v3/users/self/events")
    async def events() -> Response:
        return await api("events", lambda: records("events", sim.event_records))

    @app.get("/v3/users/self/calibrations")
    async def calibrations() -> Response:
        return await api("calibrations", lambda: records("calibrations", sim.calibration_records))

    @app.get("/v3/users/self/alerts")
    async def alerts() -> Response:
        return await api("alerts", lambda: records("alerts", sim.alert_records))

    @app.get("/v3/users/self/dataRange")
    async def data_range() -> Response:
        def build() -> dict[str, Any]:
            since = parse_date("lastSyncTime") if "lastSyncTime" in request.args else None
            return sim.data_range(since)

        return await api("dataRange", build)

    @app.get("/v3/users/self/devices")
    async def devices() -> Response:
        return await api(
            "devices",
            lambda: {
                "recordType": "device",
                "recordVersion": "3.0",
                "userId": sim.user_id,
                "records": sim.device_records(),
            },
        )

    @app.get("/_sim/counters")
    async def counters() -> Response:
        return _json(sim.counters_snapshot())

    return app


def get_sim(app: Quart) -> SimProvider:
    """The :class:`SimProvider` behind an app built by :func:`create_sim_app`."""
    sim = app.extensions.get(_EXTENSION)
    if not isinstance(sim, SimProvider):
        raise LookupError("not a simprovider app")
    return sim
