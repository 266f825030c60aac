"""A simulated Withings: its OAuth quirks (for the generic simulated authorization server,
agentd/simoauth.py) and the Measure ``getmeas`` endpoint.

Documented (Withings API reference, developer.withings.com/api-reference — operations
``oauth2-authorize``, ``oauth2-getaccesstoken``, ``measure-getmeas``, section "Response
status" — mirrored in github.com/api-evangelist/withings openapi/; the get-access pages and
the support article "Shutting down access and refresh tokens endpoints"):

* authorize at ``/oauth2_user/authorize2`` (account.withings.com) with ``response_type=code``,
  ``client_id``, ``state``, ``redirect_uri`` and a COMMA-separated ``scope``; the code is valid
  30 seconds; ``user.info`` is for SDK/contract partners only ("will fail" otherwise), public
  apps use ``user.metrics``, ``user.activity``, ``user.sleepevents``;
* tokens at ``POST /v2/oauth2`` (wbsapi.withings.net) with ``action=requesttoken`` on the code
  exchange AND on the refresh, client_id and client_secret in the form body; the answer is
  HTTP 200 ``{"status": 0, "body": {"userid", "access_token", "refresh_token", "expires_in":
  10800, "scope": "user.metrics,…", "token_type": "Bearer"}}``; a non-zero status is an error;
* a refresh returns a new refresh token every time; the old one keeps working until the new
  access token is used or 8 hours have passed; refresh tokens last one year;
* revocation needs a signed request (``action=revoke`` with nonce and signature): not RFC 7009,
  not simulated;
* ``getmeas`` at ``/measure``: ``action=getmeas``, ``meastype``/``meastypes``, ``category``,
  ``startdate``/``enddate`` or ``lastupdate``, ``offset``; the answer's ``body`` has
  ``updatetime``, ``timezone``, ``measuregrps`` (``grpid``, ``attrib``, ``date``, ``created``,
  ``modified``, ``category``, ``deviceid``, ``hash_deviceid``, ``model``, ``modelid``,
  ``measures`` of ``value``/``type``/``unit``/``algo``/``fm``), ``more`` and ``offset``;
  values are ``value * 10^unit``; types 1 weight, 9 diastolic, 10 systolic, 11 pulse;
* status codes: 100-102/200/401 authentication failed, 503 invalid params, 522 timeout,
  601 too many requests, 2554 not implemented.

Assumed (seen by integrators, not in Withings' text):

* an invalid or expired refresh token or code answers status 503 "Invalid Params" (GitHub
  jaroslawhartman/withings-sync#41); a bad client secret answers 503 too;
* an expired or unknown access token answers HTTP 200 ``{"status": 401, "body": {},
  "error": "… invalid_token …"}``;
* ``measuregrps`` come newest first; a page holds at most ``page_size`` groups (the real
  page size is not documented); an unknown ``action`` answers status 2554.

The data is a deterministic function of time: a morning weigh-in on most days (a slow
trend plus a 60-day swing), a blood-pressure reading every morning, and every ninth day an
ambiguous evening weigh-in (``attrib`` 1: someone else on the scale).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from flowengine import Clock

from .. import BearerCheck, SimDialect

if TYPE_CHECKING:  # pragma: no cover
    from quart import Quart, Response

__all__ = ["DIALECT", "WithingsSim", "blood_pressure_on", "weight_on"]

#: Withings' OAuth endpoints and quirks, as the simulated authorization server serves them
DIALECT = SimDialect(
    name="Withings",
    authorize_path="/oauth2_user/authorize2",
    token_path="/v2/oauth2",
    revoke_path=None,
    token_params={"action": "requesttoken"},
    envelope=True,
    envelope_errors={"default": 503},
    scope_separator=",",
    scopes=("user.metrics", "user.activity", "user.sleepevents"),
    response_extra={"userid": 363},
    token_scope=True,
    code_ttl=30,
    access_ttl=10_800,
    old_refresh_grace=8 * 3600,
    old_refresh_dies_on_use=True,
)

DAY = 86_400
_WEIGH_IN = 6 * 3600 + 45 * 60  # 06:45 UTC, plus up to 40 minutes
_PRESSURE = 8 * 3600 + 10 * 60  # 08:10 UTC
_GUEST = 18 * 3600 + 30 * 60  # 18:30 UTC, every ninth day
_INVALID_TOKEN = "XRequestID: Not provided invalid_token: The access token provided is invalid"


def _jitter(day: int, salt: str) -> float:
    """A deterministic number in [0, 1) for ``day``."""
    digest = hashlib.sha256(f"{salt}:{day}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def weight_on(day: int) -> float | None:
    """The morning weight (kg, 0.1 kg steps like a scale) on epoch day ``day``, or None."""
    if day % 7 == 3:
        return None  # no weigh-in that day
    value = 78.0 + 1.5 * math.sin(2 * math.pi * day / 60) + math.sin(2 * math.pi * day / 365)
    value += 0.6 * (_jitter(day, "w") - 0.5)
    return round(value, 1)


def blood_pressure_on(day: int) -> tuple[int, int, int]:
    """Systolic, diastolic (mmHg) and pulse (bpm) of the morning reading on ``day``."""
    swing = math.sin(2 * math.pi * day / 45)
    systolic = round(122 + 6 * swing + 8 * (_jitter(day, "s") - 0.5))
    diastolic = round(79 + 3 * swing + 6 * (_jitter(day, "d") - 0.5))
    pulse = round(64 + 8 * (_jitter(day, "p") - 0.5))
    return systolic, diastolic, pulse


@dataclass(frozen=True)
class SimRequest:
    """A getmeas request as the sim saw it (the bearer token is not kept)."""

    method: str
    params: Mapping[str, str]
    status: int  # the envelope's status (HTTP is 200 unless injected)


@dataclass
class WithingsCounters:
    api_requests: Counter[str] = field(default_factory=Counter)  # by action
    api_unauthorized: int = 0


class WithingsSim:
    """The simulated Measure API; hand it to ``agentd.simoauth.create_sim_app(api=…)``."""

    provider = "withings"
    dialect = DIALECT
    path_prefix = "/measure"

    def __init__(
        self,
        *,
        clock: Clock,
        history: timedelta = timedelta(days=400),
        page_size: int = 200,
        timezone: str = "Europe/Berlin",
        user_id: int = 363,
    ) -> None:
        self.clock = clock
        self.history = history
        self.page_size = page_size
        self.timezone = timezone
        self.user_id = user_id
        self.counters = WithingsCounters()
        self.requests: list[SimRequest] = []
        self._statuses: list[int] = []

    def inject_status(self, status: int, *, count: int = 1) -> None:
        """Answer the next ``count`` getmeas calls with envelope ``status`` (HTTP 200)."""
        self._statuses.extend([status] * count)

    # ------------------------------------------------------------------------- data

    def groups(self, start: float, end: float) -> list[dict[str, Any]]:
        """Every measure group taken in [start, end], newest first."""
        now = self.clock.now()
        lo = max(start, now - self.history.total_seconds())
        hi = min(end, now)
        out: list[dict[str, Any]] = []
        if hi < lo:
            return out
        for day in range(math.floor(lo / DAY), math.floor(hi / DAY) + 1):
            for group in self._day(day):
                if lo <= group["date"] <= hi:
                    out.append(group)
        out.sort(key=lambda g: (g["date"], g["grpid"]), reverse=True)
        return out

    def _day(self, day: int) -> list[dict[str, Any]]:
        groups = []
        weight = weight_on(day)
        if weight is not None:
            when = day * DAY + _WEIGH_IN + int(2400 * _jitter(day, "t"))
            groups.append(self._group(day, 1, when, "Body+", 5, [(1, round(weight * 1000), -3)]))
        systolic, diastolic, pulse = blood_pressure_on(day)
        measures = [(9, diastolic, 0), (10, systolic, 0), (11, pulse, 0)]
        groups.append(self._group(day, 2, day * DAY + _PRESSURE, "BPM Connect", 45, measures))
        if day % 9 == 0:
            guest = round((31.0 + _jitter(day, "g")) * 1000)
            groups.append(
                self._group(day, 3, day * DAY + _GUEST, "Body+", 5, [(1, guest, -3)], attrib=1)
            )
        return groups

    def _group(
        self,
        day: int,
        kind: int,
        when: int,
        model: str,
        model_id: int,
        measures: list[tuple[int, int, int]],
        attrib: int = 0,
    ) -> dict[str, Any]:
        device = hashlib.sha1(f"{self.user_id}:{model}".encode()).hexdigest()
        return {
            "grpid": day * 10 + kind,
            "attrib": attrib,
            "date": when,
            "created": when + 60,
            "modified": when + 60,
            "category": 1,
            "deviceid": device,
            "hash_deviceid": device,
            "measures": [
                {"value": value, "type": kind_, "unit": unit, "algo": 0, "fm": 3}
                for kind_, value, unit in measures
            ],
            "modelid": model_id,
            "model": model,
            "comment": None,
        }

    def getmeas(self, params: Mapping[str, str]) -> tuple[int, dict[str, Any], str | None]:
        """(status, body, error) for one getmeas call with these parameters."""

        def number(name: str) -> int | None:
            raw = params.get(name)
            if raw is None or raw == "":
                return None
            if not raw.lstrip("-").isdigit():
                raise ValueError(name)
            return int(raw)

        try:
            types = {int(t) for t in params.get("meastypes", "").split(",") if t}
            single = number("meastype")
            category = number("category") or 1
            start, end = number("startdate"), number("enddate")
            lastupdate, offset = number("lastupdate"), number("offset") or 0
        except ValueError as err:
            return 503, {}, f"Invalid Params: {err}"
        if single is not None:
            types.add(single)
        now = self.clock.now()
        if lastupdate is not None:
            found = [g for g in self.groups(0, now) if g["modified"] >= lastupdate]
        else:
            found = self.groups(start if start is not None else 0, end if end is not None else now)
        found = [g for g in found if g["category"] == category]
        if types:
            found = [
                {**g, "measures": [m for m in g["measures"] if m["type"] in types]} for g in found
            ]
            found = [g for g in found if g["measures"]]
        page = found[offset : offset + self.page_size]
        more = offset + self.page_size < len(found)
        body: dict[str, Any] = {
            "updatetime": int(now),
            "timezone": self.timezone,
            "measuregrps": page,
            "more": 1 if more else 0,
            "offset": offset + len(page) if more else 0,
        }
        return 0, body, None

    # -------------------------------------------------------------------------- app

    def mount(self, app: Quart, bearer: BearerCheck) -> None:
        """Add ``/measure`` (GET or POST, parameters in the query or the form body)."""
        from quart import Response, request

        sim = self

        def envelope(status: int, body: dict[str, Any], error: str | None) -> Response:
            data: dict[str, Any] = {"status": status, "body": body}
            if error:
                data["error"] = error
            return Response(json.dumps(data), status=200, content_type="application/json")

        @app.route("/measure", methods=["GET", "POST"])
        async def measure() -> Response:
            params = dict(request.args)
            if request.method == "POST":
                params.update((await request.form).items())
            action = params.get("action", "")
            sim.counters.api_requests[action or "(none)"] += 1
            header = request.headers.get("Authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else ""
            body: dict[str, Any] = {}
            error: str | None
            if sim._statuses:
                status, error = sim._statuses.pop(0), "simulated failure"
            elif not token or not bearer.access_token_valid(token):
                sim.counters.api_unauthorized += 1
                status, error = 401, _INVALID_TOKEN
            elif action != "getmeas":
                status, error = 2554, "Not implemented"
            else:
                status, body, error = sim.getmeas(params)
            safe = {k: v for k, v in params.items() if k != "access_token"}
            sim.requests.append(SimRequest(request.method, safe, status))
            return envelope(status, body, error)
