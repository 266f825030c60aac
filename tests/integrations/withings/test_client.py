"""WithingsClient against the simulated Measure API, and its pure helpers."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from quart import Quart

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from flowengine.clock import ManualClock
from flowengine.errors import ProviderError, ProviderTransientError, ReauthorizationRequired
from integrations.apiclient import RetryPolicy
from integrations.withings.client import (
    Measurement,
    WithingsClient,
    format_measurement,
    measurement_from_group,
    measurements_to_csv,
    measurements_to_json,
)
from integrations.withings.sim import WithingsSim, weight_on
from tests.fakes import asgi

NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
BASE = "https://wbsapi.test"


class FakeTokens:
    def __init__(self, sim: SimOAuth, *, stale_first: bool = False, refresh_works: bool = True):
        self.sim = sim
        self.refresh_works = refresh_works
        self.current = "stale" if stale_first else sim.issue_tokens()["access_token"]
        self.refreshes = 0

    async def get_token(self, provider: str, *, actor: str) -> str:
        return self.current

    async def refresh(self, provider: str, *, actor: str, force: bool = True) -> None:
        self.refreshes += 1
        if self.refresh_works:
            self.current = self.sim.issue_tokens()["access_token"]


class Sleeps(list[float]):
    async def __call__(self, delay: float) -> None:
        self.append(delay)


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api(clock: ManualClock) -> WithingsSim:
    return WithingsSim(clock=clock, page_size=40)


@pytest.fixture(name="app")
def _app(clock: ManualClock, api: WithingsSim) -> Quart:
    return create_sim_app(api=api, clock=clock)


@pytest.fixture(name="sim")
def _sim(app: Quart) -> SimOAuth:
    return get_sim(app)


@pytest.fixture(name="http")
async def _http(app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=asgi(app)) as client:
        yield client


def _client(
    tokens: FakeTokens, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> WithingsClient:
    return WithingsClient(tokens, base_url=BASE, http=http, clock=clock, sleep=sleeps)


@pytest.mark.anyio
async def test_sixty_days_follow_every_page_oldest_first(
    sim: SimOAuth, api: WithingsSim, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    client = _client(FakeTokens(sim), http, clock, Sleeps())
    items = await client.measurements(NOW - timedelta(days=60), NOW)
    assert len(api.requests) >= 3  # about 118 groups, 40 a page
    assert all(r.params["meastypes"] == "1,9,10,11" for r in api.requests)
    assert all(r.params["category"] == "1" for r in api.requests)
    assert [r.params.get("offset") for r in api.requests][:2] == [None, "40"]
    times = [m.taken_at for m in items]
    assert times == sorted(times)
    assert len({m.group_id for m in items}) == len(items)
    certain_weights = [m for m in items if m.has_weight and not m.uncertain]
    days = [NOW.timestamp() // 86_400 - d for d in range(60)]
    assert len(certain_weights) in (
        sum(1 for d in days if weight_on(int(d)) is not None) + k for k in (-1, 0, 1)
    )
    for m in certain_weights:
        assert m.weight_kg == weight_on(int(m.taken_at.timestamp() // 86_400))
    assert sum(1 for m in items if m.has_blood_pressure) in (59, 60, 61)


@pytest.mark.anyio
async def test_latest_skips_the_guest_on_the_scale(
    sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    # 2026-11-20 is epoch day 20412; 20412 % 9 == 0: a guest weighed in at 18:30 the day before
    clock.set((NOW + timedelta(days=1)).timestamp())
    weight, pressure = await _client(FakeTokens(sim), http, clock, Sleeps()).latest()
    assert weight is not None
    assert not weight.uncertain
    assert weight.weight_kg is not None
    assert weight.weight_kg > 60
    assert pressure is not None
    assert pressure.systolic is not None


@pytest.mark.anyio
async def test_status_401_refreshes_once(
    sim: SimOAuth, api: WithingsSim, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    tokens = FakeTokens(sim, stale_first=True)
    await _client(tokens, http, clock, Sleeps()).measurements(NOW - timedelta(days=1), NOW)
    assert tokens.refreshes == 1
    assert [r.status for r in api.requests] == [401, 0]
    dead = FakeTokens(sim, stale_first=True, refresh_works=False)
    with pytest.raises(ReauthorizationRequired) as info:
        await _client(dead, http, clock, Sleeps()).measurements(NOW - timedelta(days=1), NOW)
    assert info.value.oauth_error == "status_401"
    assert "stale" not in str(info.value)


@pytest.mark.anyio
async def test_too_many_requests_is_retried_then_given_up(
    sim: SimOAuth, api: WithingsSim, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    sleeps = Sleeps()
    client = _client(FakeTokens(sim), http, clock, sleeps)
    api.inject_status(601, count=2)
    await client.measurements(NOW - timedelta(days=1), NOW)
    assert sleeps == [1.0, 2.0]
    api.inject_status(601, count=4)  # the first try and three retries
    with pytest.raises(ProviderTransientError) as info:
        await client.measurements(NOW - timedelta(days=1), NOW)
    assert info.value.oauth_error == "status_601"
    api.inject_status(2554)
    with pytest.raises(ProviderError) as other:
        await client.measurements(NOW - timedelta(days=1), NOW)
    assert type(other.value) is ProviderError
    assert other.value.oauth_error == "status_2554"


@pytest.mark.anyio
async def test_http_failures_and_bad_bodies(clock: ManualClock) -> None:
    answers = [
        httpx.Response(503),
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json={"status": 0}),
        httpx.Response(200, json={"body": {}}),
        httpx.Response(403),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    sim = get_sim(create_sim_app(clock=clock))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = WithingsClient(
            FakeTokens(sim),
            base_url=BASE,
            http=http,
            clock=clock,
            sleep=Sleeps(),
            retry=RetryPolicy(max_retries=0),
        )
        for expected in ("HTTP 503", "not JSON", "without a body", "envelope", "HTTP 403"):
            with pytest.raises(ProviderError, match=expected):
                await client.getmeas(meastypes=(1,))


def test_values_are_value_times_ten_to_unit() -> None:
    group = {
        "grpid": 5,
        "attrib": 0,
        "date": 1_790_000_000,
        "measures": [
            {"value": 72345, "type": 1, "unit": -3},
            {"value": 120, "type": 10, "unit": 0},
            {"value": 80, "type": 9, "unit": 0},
            {"value": 6, "type": 11, "unit": 1},
        ],
        "model": "Body+",
    }
    m = measurement_from_group(group)
    assert (m.weight_kg, m.systolic, m.diastolic, m.pulse) == (72.345, 120, 80, 60)
    assert m.taken_at == datetime.fromtimestamp(1_790_000_000, UTC)
    for broken in ({**group, "date": "x"}, {**group, "measures": [{"type": 1}]}, {"grpid": 1}):
        with pytest.raises((KeyError, TypeError)):
            measurement_from_group(broken)


@pytest.mark.parametrize(
    ("m", "text"),
    [
        (Measurement(NOW - timedelta(hours=2), 1, weight_kg=78.44), "78.4 kg 2h ago"),
        (
            Measurement(NOW, 2, systolic=121, diastolic=79, pulse=64),
            "121/79 mmHg, pulse 64 0s ago",
        ),
        (
            Measurement(NOW - timedelta(days=3), 3, weight_kg=31.2, attrib=1),
            "31.2 kg 3d ago (uncertain: may be another person's)",
        ),
    ],
)
def test_format_measurement(m: Measurement, text: str) -> None:
    assert format_measurement(m, now=NOW) == text


def test_csv_and_json() -> None:
    items = [
        Measurement(NOW, 1, weight_kg=78.4, model="Body+"),
        Measurement(NOW, 2, systolic=121, diastolic=79, pulse=64, attrib=1),
    ]
    rows = list(csv.DictReader(io.StringIO(measurements_to_csv(items))))
    assert rows[0]["weight_kg"] == "78.4"
    assert rows[0]["systolic_mmhg"] == ""
    assert rows[1]["uncertain"] == "True"
    data = json.loads(measurements_to_json(items))
    assert data[1] == {
        "taken_at": "2026-11-20T18:00:00Z",
        "weight_kg": None,
        "systolic_mmhg": 121,
        "diastolic_mmhg": 79,
        "pulse_bpm": 64,
        "uncertain": True,
        "model": None,
        "group_id": 2,
    }
