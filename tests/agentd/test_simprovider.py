"""The simulated Dexcom provider, spoken to over real HTTP semantics (httpx.ASGITransport)."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from quart import Quart

from agentd.simprovider import SimProvider, create_sim_app, get_sim
from flowengine.clock import ManualClock
from flowengine.protocol import code_challenge, new_code_verifier

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


@pytest.fixture(name="app")
def _app(clock: ManualClock) -> Quart:
    return create_sim_app(
        clock=clock,
        clients={"cid": "secret", "public-app": None},
        redirect_uris=[REDIRECT],
    )


@pytest.fixture(name="sim")
def _sim(app: Quart) -> SimProvider:
    return get_sim(app)


@pytest.fixture(name="http")
async def _http(app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://sim.test") as client:
        yield client


def _authorize_params(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": "cid",
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "scope": "offline_access",
        "state": "st-123",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def _query(location: str) -> dict[str, str]:
    parts = urlsplit(location)
    return {k: v[0] for k, v in parse_qs(parts.query).items()}


async def _code(http: httpx.AsyncClient, verifier: str | None = None, **overrides: str) -> str:
    """Walk the consent page like a browser and return the code from the redirect."""
    params = _authorize_params(**overrides)
    if verifier is not None:
        params |= {"code_challenge": code_challenge(verifier), "code_challenge_method": "S256"}
    page = await http.get("/v2/oauth2/login", params=params)
    assert page.status_code == 200
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket is not None
    answer = await http.post(
        "/v2/oauth2/login", data={"ticket": ticket.group(1), "decision": "allow"}
    )
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith(REDIRECT + "?")
    query = _query(location)
    assert query["state"] == params["state"]
    return query["code"]


async def _exchange(
    http: httpx.AsyncClient, code: str, verifier: str | None = None, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "cid",
        "client_secret": "secret",
    }
    if verifier is not None:
        form["code_verifier"] = verifier
    form.update(extra)
    return await http.post("/v2/oauth2/token", data=form)


async def _refresh(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post(
        "/v2/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": "cid",
            "client_secret": "secret",
        },
    )


async def _egvs(http: httpx.AsyncClient, token: str, start: str, end: str) -> httpx.Response:
    return await http.get(
        "/v3/users/self/egvs",
        params={"startDate": start, "endDate": end},
        headers={"Authorization": f"Bearer {token}"},
    )


# ------------------------------------------------------------------------ authorize


@pytest.mark.anyio
async def test_consent_page_offers_allow_and_deny(http: httpx.AsyncClient) -> None:
    page = await http.get("/v2/oauth2/login", params=_authorize_params())
    assert page.status_code == 200
    assert 'value="allow"' in page.text
    assert 'value="deny"' in page.text
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket is not None
    denied = await http.post(
        "/v2/oauth2/login", data={"ticket": ticket.group(1), "decision": "deny"}
    )
    assert denied.status_code == 302
    assert _query(denied.headers["location"]) == {
        "error": "access_denied",
        "error_description": "The user denied access",
        "state": "st-123",
    }
    again = await http.post(
        "/v2/oauth2/login", data={"ticket": ticket.group(1), "decision": "allow"}
    )
    assert again.status_code == 400  # a ticket answers once


@pytest.mark.anyio
@pytest.mark.parametrize("consent", ["allow", "deny"])
async def test_scripted_consent_redirects_at_once(clock: ManualClock, consent: str) -> None:
    app = create_sim_app(
        clock=clock, clients={"cid": "s"}, redirect_uris=[REDIRECT], consent=consent
    )  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://s") as c:
        response = await c.get("/v2/oauth2/login", params=_authorize_params())
    assert response.status_code == 302
    query = _query(response.headers["location"])
    assert query["state"] == "st-123"
    if consent == "allow":
        assert set(query) == {"code", "state"}
        assert get_sim(app).counters.codes_issued == 1
    else:
        assert query["error"] == "access_denied"
        assert get_sim(app).counters.codes_issued == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client_id": "nobody"}, "unknown client_id"),
        ({"redirect_uri": REDIRECT + "/"}, "redirect_uri does not match"),
        ({"redirect_uri": "https://evil.test/cb"}, "redirect_uri does not match"),
    ],
)
async def test_bad_client_or_redirect_never_redirects(
    http: httpx.AsyncClient, overrides: dict[str, str], message: str
) -> None:
    response = await http.get("/v2/oauth2/login", params=_authorize_params(**overrides))
    assert response.status_code == 400
    assert "location" not in response.headers
    assert message in response.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "egv"}, "invalid_scope"),
        ({"scope": None}, "invalid_scope"),
        ({"code_challenge": "x" * 43, "code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "short", "code_challenge_method": "S256"}, "invalid_request"),
        ({"client_id": "public-app"}, "invalid_request"),  # public client without PKCE
    ],
)
async def test_bad_authorize_parameters_redirect_with_error(
    http: httpx.AsyncClient, overrides: dict[str, str | None], error: str
) -> None:
    response = await http.get("/v2/oauth2/login", params=_authorize_params(**overrides))
    assert response.status_code == 302
    query = _query(response.headers["location"])
    assert query["error"] == error
    assert query["state"] == "st-123"
    assert "code" not in query


@pytest.mark.anyio
async def test_missing_state_is_rejected(http: httpx.AsyncClient) -> None:
    response = await http.get("/v2/oauth2/login", params=_authorize_params(state=None))
    assert response.status_code == 302
    assert _query(response.headers["location"])["error"] == "invalid_request"


# ---------------------------------------------------------------------------- token


@pytest.mark.anyio
async def test_code_with_pkce_exchanges_for_dexcom_shaped_tokens(
    http: httpx.AsyncClient, sim: SimProvider
) -> None:
    verifier = new_code_verifier()
    code = await _code(http, verifier)
    response = await _exchange(http, code, verifier)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in", "token_type", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    assert response.headers["cache-control"] == "no-store"
    assert sim.counters.token_requests == {"authorization_code": 1}
    assert sim.counters.refresh_issued == 1
    data = await _egvs(http, body["access_token"], "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert data.status_code == 200


@pytest.mark.anyio
async def test_wrong_verifier_is_rejected_and_spends_the_code(http: httpx.AsyncClient) -> None:
    verifier = new_code_verifier()
    code = await _code(http, verifier)
    wrong = await _exchange(http, code, new_code_verifier())
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    right = await _exchange(http, code, verifier)
    assert right.status_code == 400
    assert right.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_missing_verifier_is_rejected(http: httpx.AsyncClient) -> None:
    code = await _code(http, new_code_verifier())
    response = await _exchange(http, code)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_code_reuse_is_rejected_and_revokes_its_tokens(http: httpx.AsyncClient) -> None:
    code = await _code(http)
    first = await _exchange(http, code)
    assert first.status_code == 200
    tokens = first.json()
    second = await _exchange(http, code)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    data = await _egvs(http, tokens["access_token"], "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert data.status_code == 401
    refreshed = await _refresh(http, tokens["refresh_token"])
    assert refreshed.status_code == 400


@pytest.mark.anyio
async def test_code_expires(http: httpx.AsyncClient, clock: ManualClock) -> None:
    code = await _code(http)
    clock.advance(61)
    response = await _exchange(http, code)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_redirect_uri_must_match_at_exchange(http: httpx.AsyncClient) -> None:
    code = await _code(http)
    response = await _exchange(http, code, redirect_uri=REDIRECT + "?x=1")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_client_authentication(http: httpx.AsyncClient) -> None:
    code = await _code(http)
    wrong = await _exchange(http, code, client_secret="nope")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"

    code = await _code(http)
    basic = base64.b64encode(b"cid:secret").decode()
    ok = await http.post(
        "/v2/oauth2/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert ok.status_code == 200

    code = await _code(http)
    both = await http.post(
        "/v2/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_secret": "secret",
        },
        headers={"Authorization": f"Basic {basic}"},
    )
    assert both.status_code == 400
    assert both.json()["error"] == "invalid_request"


@pytest.mark.anyio
async def test_public_client_uses_pkce_without_secret(http: httpx.AsyncClient) -> None:
    verifier = new_code_verifier()
    code = await _code(http, verifier, client_id="public-app")
    response = await http.post(
        "/v2/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "public-app",
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200


@pytest.mark.anyio
async def test_unsupported_grant_type(http: httpx.AsyncClient, sim: SimProvider) -> None:
    response = await http.post(
        "/v2/oauth2/token",
        data={"grant_type": "password", "client_id": "cid", "client_secret": "secret"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    assert sim.counters.token_errors == {"unsupported_grant_type": 1}


@pytest.mark.anyio
async def test_refresh_tokens_rotate(http: httpx.AsyncClient, sim: SimProvider) -> None:
    tokens = (await _exchange(http, await _code(http))).json()
    first = await _refresh(http, tokens["refresh_token"])
    assert first.status_code == 200
    rotated = first.json()
    assert set(rotated) == {"access_token", "expires_in", "token_type", "refresh_token"}
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert rotated["access_token"] != tokens["access_token"]
    old = await _refresh(http, tokens["refresh_token"])
    assert old.status_code == 400
    assert old.json()["error"] == "invalid_grant"
    newer = await _refresh(http, rotated["refresh_token"])
    assert newer.status_code == 200
    assert sim.counters.token_requests == {"authorization_code": 1, "refresh_token": 3}
    assert sim.counters.refresh_issued == 3
    assert sim.counters.refresh_rejected == 1
    snapshot = (await http.get("/_sim/counters")).json()
    assert snapshot["token_requests"] == {"authorization_code": 1, "refresh_token": 3}
    assert snapshot["refresh_rejected"] == 1
    assert snapshot["token_errors"] == {"invalid_grant": 1}


@pytest.mark.anyio
async def test_refresh_without_rotation_keeps_the_token(clock: ManualClock) -> None:
    app = create_sim_app(
        clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT], rotate_refresh=False
    )
    sim = get_sim(app)
    refresh = sim.issue_tokens("cid")["refresh_token"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://s") as c:
        for _ in range(2):
            response = await _refresh(c, refresh)
            assert response.status_code == 200
            assert response.json()["refresh_token"] == refresh
    assert sim.counters.refresh_issued == 1
    assert sim.counters.refresh_rejected == 0


@pytest.mark.anyio
async def test_refresh_ttl(clock: ManualClock) -> None:
    app = create_sim_app(
        clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT], refresh_ttl=3600
    )
    refresh = get_sim(app).issue_tokens()["refresh_token"]
    clock.advance(3600)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://s") as c:
        response = await _refresh(c, refresh)
    assert response.status_code == 400


@pytest.mark.anyio
async def test_revoke_refresh_token_kills_the_grant(
    http: httpx.AsyncClient, sim: SimProvider
) -> None:
    tokens = sim.issue_tokens("cid")
    response = await http.post(
        "/v2/oauth2/revoke",
        data={
            "token": tokens["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": "cid",
            "client_secret": "secret",
        },
    )
    assert response.status_code == 200
    assert sim.counters.revocations == 1
    assert (await _refresh(http, tokens["refresh_token"])).status_code == 400
    data = await _egvs(http, tokens["access_token"], "2026-11-20T12:00:00", "2026-11-20T13:00:00")
    assert data.status_code == 401


# ------------------------------------------------------------------------- data API


@pytest.mark.anyio
async def test_expired_access_token_gets_401(
    http: httpx.AsyncClient, sim: SimProvider, clock: ManualClock
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
    assert sim.counters.api_unauthorized == 2


@pytest.mark.anyio
async def test_egvs_shape_cadence_and_determinism(
    http: httpx.AsyncClient, sim: SimProvider
) -> None:
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
    app = create_sim_app(
        clock=clock,
        display_device="receiver",
        transmitter_generation="g6",
        display_tz="America/Los_Angeles",
    )
    token = get_sim(app).issue_tokens()["access_token"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://s") as c:
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
    http: httpx.AsyncClient, sim: SimProvider, params: dict[str, str], description: str
) -> None:
    token = sim.issue_tokens()["access_token"]
    response = await http.get(
        "/v3/users/self/egvs", params=params, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert description in response.json()["error_description"]


@pytest.mark.anyio
async def test_exactly_thirty_days_is_allowed(http: httpx.AsyncClient, sim: SimProvider) -> None:
    token = sim.issue_tokens()["access_token"]
    response = await _egvs(http, token, "2026-10-01T00:00:00", "2026-10-31T00:00:00")
    assert response.status_code == 200
    assert len(response.json()["records"]) == 30 * 288


@pytest.mark.anyio
async def test_data_delay_and_history_bound_what_is_served(clock: ManualClock) -> None:
    app = create_sim_app(clock=clock, data_delay=timedelta(hours=3), history=timedelta(days=2))
    sim = get_sim(app)
    token = sim.issue_tokens()["access_token"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://s") as c:
        recent = await _egvs(c, token, "2026-11-20T14:00:00", "2026-11-20T18:00:00")
        old = await _egvs(c, token, "2026-11-10T00:00:00", "2026-11-12T00:00:00")
    times = [datetime.fromisoformat(r["systemTime"]) for r in recent.json()["records"]]
    assert max(times) <= NOW - timedelta(hours=3)
    assert len(times) == 12  # 14:00-15:00 only
    assert old.json()["records"] == []
    assert sim.latest_egv_time() == max(times)


@pytest.mark.anyio
async def test_injected_failures_then_recovery(http: httpx.AsyncClient, sim: SimProvider) -> None:
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
    assert [r.status for r in sim.requests] == [429, 503, 200]


@pytest.mark.anyio
async def test_token_endpoint_injection(http: httpx.AsyncClient, sim: SimProvider) -> None:
    sim.inject(502, path_prefix="/v2/oauth2/token")
    refresh = sim.issue_tokens()["refresh_token"]
    assert (await _refresh(http, refresh)).status_code == 502
    assert (await _refresh(http, refresh)).status_code == 200


async def _get(http: httpx.AsyncClient, sim: SimProvider, path: str, **params: str) -> Any:
    token = sim.issue_tokens()["access_token"]
    response = await http.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    return response.json()


@pytest.mark.anyio
async def test_other_record_endpoints(http: httpx.AsyncClient, sim: SimProvider) -> None:
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
async def test_data_range_and_devices(http: httpx.AsyncClient, sim: SimProvider) -> None:
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
    """The catalog's Dexcom entry, pointed at the sim, drives a full connect and refresh."""
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
        clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT], consent="allow"
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
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base) as c:
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
