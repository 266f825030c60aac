"""The simulated Withings (integrations/withings/sim.py) on the wire: its OAuth dialect
through the generic simulated server, and ``getmeas`` as Withings documents it."""

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
from integrations.withings.sim import DIALECT, WithingsSim, blood_pressure_on, weight_on
from tests.fakes import asgi

REDIRECT = "https://broker.test/oauth/callback"
NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
GROUP_FIELDS = {
    "grpid",
    "attrib",
    "date",
    "created",
    "modified",
    "category",
    "deviceid",
    "hash_deviceid",
    "measures",
    "modelid",
    "model",
    "comment",
}

pytestmark = pytest.mark.anyio


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api(clock: ManualClock) -> WithingsSim:
    return WithingsSim(clock=clock, page_size=50)


@pytest.fixture(name="app")
def _app(clock: ManualClock, api: WithingsSim) -> Quart:
    return create_sim_app(
        api=api, clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT], consent="allow"
    )


@pytest.fixture(name="sim")
def _sim(app: Quart) -> SimOAuth:
    return get_sim(app)


@pytest.fixture(name="http")
async def _http(app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    transport = asgi(app)
    async with httpx.AsyncClient(transport=transport, base_url="https://wbsapi.test") as client:
        yield client


async def _getmeas(http: httpx.AsyncClient, token: str | None, **form: str) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = await http.post("/measure", data={"action": "getmeas", **form}, headers=headers)
    assert answer.status_code == 200  # Withings answers errors inside the envelope
    return answer.json()


def _query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def test_the_oauth_dialect_is_withings(
    http: httpx.AsyncClient, sim: SimOAuth, clock: ManualClock
) -> None:
    params = {
        "response_type": "code",
        "client_id": "cid",
        "redirect_uri": REDIRECT,
        "state": "s1",
        "scope": "user.metrics,user.activity",
    }
    redirected = await http.get("/oauth2_user/authorize2", params=params)
    code = _query(redirected.headers["location"])["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "cid",
        "client_secret": "secret",
        "action": "requesttoken",
    }
    clock.advance(31)  # the code lives 30 seconds
    late = (await http.post("/v2/oauth2", data=form)).json()
    assert late["status"] == 503
    assert "expired" in late["error"]
    redirected = await http.get("/oauth2_user/authorize2", params=params)
    form["code"] = _query(redirected.headers["location"])["code"]
    answer = await http.post("/v2/oauth2", data=form)
    assert answer.status_code == 200
    envelope = answer.json()
    assert envelope["status"] == 0
    body = envelope["body"]
    assert body["expires_in"] == 10800
    assert body["scope"] == "user.metrics,user.activity"
    assert body["userid"] == 363
    assert body["token_type"] == "Bearer"
    partner_only = await http.get(
        "/oauth2_user/authorize2", params={**params, "scope": "user.info,user.metrics"}
    )
    assert _query(partner_only.headers["location"])["error"] == "invalid_scope"
    assert DIALECT.revoke_path is None


async def test_getmeas_shape_units_and_types(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    token = sim.issue_tokens()["access_token"]
    start = int((NOW - timedelta(days=14)).timestamp())
    data = await _getmeas(
        http, token, meastypes="1,9,10,11", category="1", startdate=str(start),
        enddate=str(int(NOW.timestamp())),
    )  # fmt: skip
    assert data["status"] == 0
    body = data["body"]
    assert set(body) == {"updatetime", "timezone", "measuregrps", "more", "offset"}
    assert body["timezone"] == "Europe/Berlin"
    groups = body["measuregrps"]
    assert all(set(g) == GROUP_FIELDS for g in groups)
    dates = [g["date"] for g in groups]
    assert dates == sorted(dates, reverse=True)  # newest first
    assert all(start <= d <= NOW.timestamp() for d in dates)
    weighings = [g for g in groups if g["measures"][0]["type"] == 1 and g["attrib"] == 0]
    for group in weighings:
        (measure,) = group["measures"]
        assert measure["unit"] == -3
        day = group["date"] // 86_400
        assert measure["value"] * 10 ** measure["unit"] == pytest.approx(weight_on(day))
    pressure = [g for g in groups if {m["type"] for m in g["measures"]} == {9, 10, 11}]
    assert len(pressure) == 14
    day = pressure[0]["date"] // 86_400
    by_type = {m["type"]: m["value"] for m in pressure[0]["measures"]}
    assert (by_type[10], by_type[9], by_type[11]) == blood_pressure_on(day)
    assert any(g["attrib"] == 1 for g in groups)  # the guest on the scale


async def test_meastypes_filter_and_pagination(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    token = sim.issue_tokens()["access_token"]
    start = str(int((NOW - timedelta(days=90)).timestamp()))
    first = (await _getmeas(http, token, meastypes="1", startdate=start))["body"]
    assert {m["type"] for g in first["measuregrps"] for m in g["measures"]} == {1}
    assert first["more"] == 1
    seen = list(first["measuregrps"])
    offset = first["offset"]
    while True:
        page = await _getmeas(http, token, meastypes="1", startdate=start, offset=str(offset))
        seen += page["body"]["measuregrps"]
        if not page["body"]["more"]:
            break
        offset = page["body"]["offset"]
    ids = [g["grpid"] for g in seen]
    assert len(ids) == len(set(ids))
    weigh_ins = sum(1 for d in range(90) if weight_on(int(NOW.timestamp()) // 86_400 - d))
    assert len(seen) >= weigh_ins  # plus the guests


async def test_errors_are_statuses_inside_http_200(
    http: httpx.AsyncClient, sim: SimOAuth, api: WithingsSim, clock: ManualClock
) -> None:
    token = sim.issue_tokens()["access_token"]
    assert (await _getmeas(http, None))["status"] == 401
    clock.advance(10_800)
    expired = await _getmeas(http, token)
    assert expired["status"] == 401
    assert "invalid_token" in expired["error"]
    fresh = sim.issue_tokens()["access_token"]
    unknown = await http.post("/measure", data={"action": "getfoo"}, headers={
        "Authorization": f"Bearer {fresh}"})  # fmt: skip
    assert unknown.json()["status"] == 2554
    assert (await _getmeas(http, fresh, startdate="yesterday"))["status"] == 503
    api.inject_status(601)
    assert (await _getmeas(http, fresh))["status"] == 601
    assert (await _getmeas(http, fresh))["status"] == 0
    assert api.counters.api_unauthorized == 2
    assert [r.status for r in api.requests] == [401, 401, 2554, 503, 601, 0]
    assert all("access_token" not in r.params for r in api.requests)


async def test_lastupdate_and_get_with_query_parameters(
    http: httpx.AsyncClient, sim: SimOAuth
) -> None:
    token = sim.issue_tokens()["access_token"]
    since = int((NOW - timedelta(days=2)).timestamp())
    answer = await http.get(
        "/measure",
        params={"action": "getmeas", "lastupdate": str(since)},
        headers={"Authorization": f"Bearer {token}"},
    )
    groups = answer.json()["body"]["measuregrps"]
    assert groups
    assert all(g["modified"] >= since for g in groups)
