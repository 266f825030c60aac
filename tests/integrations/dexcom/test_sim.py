"""The simulated Dexcom API v3 (integrations/dexcom/sim.py) beside the simulated authorization
server, spoken to over real HTTP semantics (httpx.ASGITransport)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from quart import Quart

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from flowengine.clock import ManualClock
from integrations.dexcom.sim import DexcomSim
from tests.fakes import asgi

REDIRECT = "https://broker.test/oauth/callback"
NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
EGV_FIELDS = {
    "recordId",
    "systemTime",
    "displayTime",
    "transmitterId",
    "transmitterTicks",
    "value",
    "status",
    "trend",
    "trendRate",
    "unit",
    "rateUnit",
    "displayDevice",
    "transmitterGeneration",
}


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api(clock: ManualClock) -> DexcomSim:
    return DexcomSim(clock=clock)


@pytest.fixture(name="app")
def _app(clock: ManualClock, api: DexcomSim) -> Quart:
    return create_sim_app(api=api, clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT])


@pytest.fixture(name="sim")
def _sim(app: Quart) -> SimOAuth:
    return get_sim(app)


@pytest.fixture(name="http")
async def _http(app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    transport = asgi(app)
    async with httpx.AsyncClient(transport=transport, base_url="https://sim.test") as client:
        yield client


def _query(location: str) -> dict[str, str]:
    parts = urlsplit(location)
    return {k: v[0] for k, v in parse_qs(parts.query).items()}


async def _egvs(http: httpx.AsyncClient, token: str, start: str, end: str) -> httpx.Response:
    return await http.get(
        "/v3/users/self/egvs",
        params={"startDate": start, "endDate": end},
        headers={"Authorization": f"Bearer {token}"},
    )


# ------------------------------------------------------------------------- data API


@pytest.mark.anyio
async def test_expired_access_token_gets_401(
    http: httpx.AsyncClient, sim: SimOAuth, api: DexcomSim, clock: ManualClock
) -> None:
    token = sim.issue_tokens()["access_token"]
    ok = await _egvs(http, token, "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert ok.status_code == 200
    clock.advance(7200)
    expired = await _egvs(http, token, "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"].startswith("Bearer")
    missing = await http.get("/v3/users/self/devices")
    assert missing.status_code == 401
    assert api.counters.api_unauthorized == 2


@pytest.mark.anyio
async def test_egvs_shape_cadence_and_determinism(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    token = sim.issue_tokens()["access_token"]
    response = await _egvs(http, token, "2026-11-19T18:00:00", "2026-11-20T18:00:00")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("recordType", "recordVersion", "userId")} == {
        "recordType": "egv",
        "recordVersion": "3.0",
        "userId": "sim-user-0001",
    }
    records = body["records"]
    assert len(records) == 288
    assert all(set(r) == EGV_FIELDS for r in records)
    times = [datetime.fromisoformat(r["systemTime"]) for r in records]
    assert all(t.utcoffset() == timedelta(0) for t in times)  # iOS source: UTC offset present
    assert {(b - a) for a, b in zip(times, times[1:], strict=False)} == {timedelta(minutes=5)}
    assert times[0] >= datetime(2026, 11, 19, 18, 0, tzinfo=UTC)
    assert times[-1] < datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
    values = [r["value"] for r in records]
    assert min(values) < 70 < 180 < max(values)  # one low and one high excursion a day
    assert {r["unit"] for r in records} == {"mg/dL"}
    assert {r["rateUnit"] for r in records} == {"mg/dL/min"}
    assert {"flat", "fortyFiveUp", "singleUp", "singleDown"} <= {r["trend"] for r in records}
    assert len({r["recordId"] for r in records}) == 288
    again = await _egvs(http, token, "2026-11-19T18:00:00", "2026-11-20T18:00:00")
    assert again.json() == body


@pytest.mark.anyio
async def test_receiver_records_have_no_offsets(clock: ManualClock) -> None:
    api = DexcomSim(
        clock=clock,
        display_device="receiver",
        transmitter_generation="g6",
        display_tz="America/Los_Angeles",
    )
    app = create_sim_app(api=api, clock=clock)
    token = get_sim(app).issue_tokens()["access_token"]
    async with httpx.AsyncClient(transport=asgi(app), base_url="https://s") as c:
        response = await _egvs(c, token, "2026-11-20T12:00:00", "2026-11-20T12:10:00")
    first = response.json()["records"][0]
    assert first["systemTime"] == "2026-11-20T12:00:23"
    assert first["displayTime"] == "2026-11-20T04:00:23"
    assert first["displayDevice"] == "receiver"
    assert first["transmitterGeneration"] == "g6"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "description"),
    [
        ({"endDate": "2026-11-20T12:00:00"}, "startDate is required"),
        ({"startDate": "2026-11-20T12:00:00"}, "endDate is required"),
        ({"startDate": "2026-11-20T12:00:00Z", "endDate": "2026-11-20T13:00:00"}, "YYYY-MM-DD"),
        ({"startDate": "2026-11-20T12:00:00.000", "endDate": "2026-11-20T13:00:00"}, "YYYY"),
        ({"startDate": "2026-11-20", "endDate": "2026-11-21"}, "YYYY-MM-DD"),
        ({"startDate": "2026-11-20T12:00:00\n", "endDate": "2026-11-20T13:00:00"}, "YYYY"),
        ({"startDate": "2026-02-30T00:00:00", "endDate": "2026-03-01T00:00:00"}, "not a valid"),
        ({"startDate": "2026-11-20T13:00:00", "endDate": "2026-11-20T12:00:00"}, "after"),
        ({"startDate": "2026-10-01T00:00:00", "endDate": "2026-10-31T00:00:01"}, "30 days"),
    ],
)
async def test_egvs_query_validation(
    http: httpx.AsyncClient, sim: SimOAuth, params: dict[str, str], description: str
) -> None:
    token = sim.issue_tokens()["access_token"]
    response = await http.get(
        "/v3/users/self/egvs", params=params, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert description in response.json()["error_description"]


@pytest.mark.anyio
async def test_exactly_thirty_days_is_allowed(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    token = sim.issue_tokens()["access_token"]
    response = await _egvs(http, token, "2026-10-01T00:00:00", "2026-10-31T00:00:00")
    assert response.status_code == 200
    assert len(response.json()["records"]) == 30 * 288


@pytest.mark.anyio
async def test_data_delay_and_history_bound_what_is_served(clock: ManualClock) -> None:
    api = DexcomSim(clock=clock, data_delay=timedelta(hours=3), history=timedelta(days=2))
    app = create_sim_app(api=api, clock=clock)
    sim = get_sim(app)
    token = sim.issue_tokens()["access_token"]
    async with httpx.AsyncClient(transport=asgi(app), base_url="https://s") as c:
        recent = await _egvs(c, token, "2026-11-20T14:00:00", "2026-11-20T18:00:00")
        old = await _egvs(c, token, "2026-11-10T00:00:00", "2026-11-12T00:00:00")
    times = [datetime.fromisoformat(r["systemTime"]) for r in recent.json()["records"]]
    assert max(times) <= NOW - timedelta(hours=3)
    assert len(times) == 12  # 14:00-15:00 only
    assert old.json()["records"] == []
    assert api.latest_egv_time() == max(times)


@pytest.mark.anyio
async def test_injected_failures_then_recovery(
    http: httpx.AsyncClient, sim: SimOAuth, api: DexcomSim
) -> None:
    token = sim.issue_tokens()["access_token"]
    sim.inject(429, retry_after=7)
    sim.inject(503)
    limited = await _egvs(http, token, "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    unavailable = await _egvs(http, token, "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert unavailable.status_code == 503
    assert "retry-after" not in unavailable.headers
    ok = await _egvs(http, token, "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert ok.status_code == 200
    assert sim.counters.injected == 2
    assert [r.status for r in api.requests] == [429, 503, 200]
    assert api.counters.api_requests == {"egvs": 3}


async def _get(http: httpx.AsyncClient, sim: SimOAuth, path: str, **params: str) -> Any:
    token = sim.issue_tokens()["access_token"]
    response = await http.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    return response.json()


@pytest.mark.anyio
async def test_other_record_endpoints(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    window = {"startDate": "2026-11-18T00:00:00", "endDate": "2026-11-20T00:00:00"}
    events = await _get(http, sim, "/v3/users/self/events", **window)
    assert events["recordType"] == "events"
    assert [(e["eventType"], e["systemTime"][:16]) for e in events["records"]] == [
        ("insulin", "2026-11-18T12:40"),
        ("carbs", "2026-11-18T12:45"),
        ("insulin", "2026-11-19T12:40"),
        ("carbs", "2026-11-19T12:45"),
    ]
    assert {e["eventStatus"] for e in events["records"]} == {"created"}
    calibrations = await _get(http, sim, "/v3/users/self/calibrations", **window)
    assert calibrations["recordType"] == "calibrations"
    assert len(calibrations["records"]) == 2
    alerts = await _get(http, sim, "/v3/users/self/alerts", **window)
    assert alerts["recordType"] == "alerts"
    assert sorted({a["alertName"] for a in alerts["records"]}) == ["high", "low"]
    assert len(alerts["records"]) == 4


@pytest.mark.anyio
async def test_data_range_and_devices(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    data = await _get(http, sim, "/v3/users/self/dataRange")
    assert data["recordType"] == "dataRange"
    assert set(data) == {"recordType", "recordVersion", "userId", "calibrations", "egvs", "events"}
    end = datetime.fromisoformat(data["egvs"]["end"]["systemTime"])
    start = datetime.fromisoformat(data["egvs"]["start"]["systemTime"])
    assert NOW - timedelta(minutes=5) <= end <= NOW
    assert NOW - timedelta(days=90) <= start <= NOW - timedelta(days=90) + timedelta(minutes=5)
    since = await _get(http, sim, "/v3/users/self/dataRange", lastSyncTime="2026-11-20T00:00:00")
    since_start = datetime.fromisoformat(since["egvs"]["start"]["systemTime"])
    assert since_start.date() == NOW.date()
    devices = await _get(http, sim, "/v3/users/self/devices")
    assert devices["recordType"] == "device"
    (device,) = devices["records"]
    assert device["transmitterGeneration"] == "g7"
    assert device["alertSchedules"][0]["alertSettings"][0]["alertName"] == "low"


# ------------------------------------------------------------------ product interop


@pytest.mark.anyio
async def test_the_products_oauth_client_speaks_to_the_sim(clock: ManualClock) -> None:
    """The catalog's Dexcom entry, pointed at the sim, drives a full connect and refresh.

    The sim's Dexcom dialect is written from Dexcom's documentation, not from the catalog,
    so a wrong catalog value (path, scope, client auth) fails here."""
    import dataclasses

    from flowengine.catalog import load_catalog
    from flowengine.credentials import ClientCredentials
    from flowengine.errors import ReauthorizationRequired
    from flowengine.oauth_http import exchange_code, refresh_tokens
    from flowengine.protocol import build_authorize_url, new_state

    base = "https://sim.test"
    spec = dataclasses.replace(
        load_catalog().get("dexcom"),
        authorize_url=f"{base}/v2/oauth2/login",
        token_url=f"{base}/v2/oauth2/token",
        api_base_url=base,
    )
    app = create_sim_app(
        api=DexcomSim(clock=clock),
        clock=clock,
        clients={"cid": "secret"},
        redirect_uris=[REDIRECT],
        consent="allow",
    )
    sim = get_sim(app)
    creds = ClientCredentials("cid", "secret")
    state = new_state()
    url = build_authorize_url(
        spec.authorize_url,
        client_id="cid",
        redirect_uri=REDIRECT,
        state=state,
        scopes=spec.scopes,
        scope_separator=spec.scope_separator,
    )
    async with httpx.AsyncClient(transport=asgi(app), base_url=base) as c:
        redirected = await c.get(url)
        query = _query(redirected.headers["location"])
        assert query["state"] == state
        now_ms = int(clock.now() * 1000)
        tokens = await exchange_code(
            spec,
            creds,
            code=query["code"],
            redirect_uri=REDIRECT,
            code_verifier=None,
            client=c,
            now_ms=now_ms,
        )
        rotated = await refresh_tokens(
            spec, creds, refresh_token=tokens.refresh or "", client=c, now_ms=now_ms
        )
        assert rotated.refresh != tokens.refresh
        with pytest.raises(ReauthorizationRequired):
            await refresh_tokens(
                spec, creds, refresh_token=tokens.refresh or "", client=c, now_ms=now_ms
            )
    assert sim.counters.token_requests == {"authorization_code": 1, "refresh_token": 2}
    assert sim.counters.refresh_rejected == 1
