"""DexcomClient against the simulated Dexcom (in-process ASGI), plus the pure helpers."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from quart import Quart

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from flowengine.catalog import ProviderSpec
from flowengine.clock import ManualClock
from flowengine.errors import (
    ConfigError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from integrations.apiclient import RetryPolicy
from integrations.dexcom.client import (
    DexcomClient,
    Reading,
    format_dexcom_time,
    format_reading,
    parse_dexcom_time,
    parse_since,
    readings_to_csv,
    readings_to_json,
    split_window,
)
from integrations.dexcom.sim import DexcomSim
from tests.fakes import asgi

NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
BASE = "https://sim-dexcom.test"


class FakeTokens:
    """A TokenSource: hands out the sim's tokens; optionally a stale one first."""

    def __init__(self, sim: SimOAuth, *, stale_first: bool = False, refresh_works: bool = True):
        self.sim = sim
        self.refresh_works = refresh_works
        self.current = "stale-token" if stale_first else sim.issue_tokens()["access_token"]
        self.gets: list[str] = []
        self.refreshes: list[tuple[str, str, bool]] = []

    async def get_token(self, provider: str, *, actor: str) -> str:
        self.gets.append(provider)
        return self.current

    async def refresh(self, provider: str, *, actor: str, force: bool = True) -> None:
        self.refreshes.append((provider, actor, force))
        if self.refresh_works:
            self.current = self.sim.issue_tokens()["access_token"]


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api(clock: ManualClock) -> DexcomSim:
    return DexcomSim(clock=clock, history=timedelta(days=120))


@pytest.fixture(name="app")
def _app(clock: ManualClock, api: DexcomSim) -> Quart:
    return create_sim_app(api=api, clock=clock)


@pytest.fixture(name="sim")
def _sim(app: Quart) -> SimOAuth:
    return get_sim(app)


@pytest.fixture(name="http")
async def _http(app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    transport = asgi(app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


@pytest.fixture(name="sleeps")
def _sleeps() -> Sleeps:
    return Sleeps()


def _client(
    tokens: FakeTokens, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps, **kw: object
) -> DexcomClient:
    return DexcomClient(
        tokens,
        base_url=BASE,
        http=http,
        clock=clock,
        sleep=sleeps,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(name="dexcom")
def _dexcom(
    sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> DexcomClient:
    return _client(FakeTokens(sim), http, clock, sleeps)


# --------------------------------------------------------------------------- wire


@pytest.mark.anyio
async def test_dates_on_the_wire(api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth) -> None:
    start = datetime(2026, 11, 20, 7, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=1)))
    readings = await dexcom.egvs(start, NOW - timedelta(microseconds=1))
    (seen,) = api.requests
    assert seen.path == "/v3/users/self/egvs"
    assert seen.query_string == "startDate=2026-11-20T06%3A00%3A00&endDate=2026-11-20T18%3A00%3A00"
    assert len(readings) == 144
    assert readings[0].system_time == datetime(2026, 11, 20, 6, 0, 23, tzinfo=UTC)


@pytest.mark.anyio
async def test_seventy_days_take_three_requests_merged_in_order(
    api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth
) -> None:
    start = NOW - timedelta(days=70)
    readings = await dexcom.egvs(start, NOW)
    assert [r.query_string for r in api.requests] == [
        "startDate=2026-09-11T18%3A00%3A00&endDate=2026-10-11T18%3A00%3A00",
        "startDate=2026-10-11T18%3A00%3A00&endDate=2026-11-10T18%3A00%3A00",
        "startDate=2026-11-10T18%3A00%3A00&endDate=2026-11-20T18%3A00%3A00",
    ]
    assert len(readings) == 70 * 288
    times = [r.system_time for r in readings]
    assert len(set(times)) == len(times)
    assert {b - a for a, b in zip(times, times[1:], strict=False)} == {timedelta(minutes=5)}


def test_split_window_pieces() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    pieces = split_window(start, start + timedelta(days=61), timedelta(days=30))
    assert pieces == [
        (start, start + timedelta(days=30)),
        (start + timedelta(days=30), start + timedelta(days=60)),
        (start + timedelta(days=60), start + timedelta(days=61)),
    ]
    assert split_window(start, start + timedelta(days=30)) == [(start, start + timedelta(days=30))]
    with pytest.raises(ValueError, match="end must be after start"):
        split_window(start, start)


@pytest.mark.anyio
async def test_overlapping_answers_are_deduplicated(clock: ManualClock, sleeps: Sleeps) -> None:
    """Windows overlap on the wire when a boundary is rounded; records appear once."""
    record = {
        "recordId": "same-id",
        "systemTime": "2026-11-20T10:00:23",
        "displayTime": "2026-11-20T10:00:23",
        "value": 100,
        "trend": "flat",
        "trendRate": 0.1,
        "status": "ok",
    }
    later = record | {"recordId": "other", "systemTime": "2026-11-19T10:00:23", "value": 90}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "recordType": "egv",
                "recordVersion": "3.0",
                "userId": "u",
                "records": [record, later],
            },
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        tokens = FakeTokens(get_sim(create_sim_app(api=DexcomSim(clock=clock), clock=clock)))
        client = DexcomClient(
            tokens,
            base_url=BASE,
            http=http,
            clock=clock,
            sleep=sleeps,
            max_window=timedelta(days=1),
        )
        readings = await client.egvs(NOW - timedelta(days=3), NOW)
    assert [(r.record_id, r.value_mgdl) for r in readings] == [("other", 90), ("same-id", 100)]


@pytest.mark.anyio
async def test_naive_datetimes_are_refused(
    api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth
) -> None:
    with pytest.raises(ValueError, match="aware"):
        await dexcom.egvs(datetime(2026, 11, 20), datetime(2026, 11, 21))
    assert api.requests == []


# ------------------------------------------------------------------ auth and retry


@pytest.mark.anyio
async def test_401_refreshes_once_and_retries(
    api: DexcomSim, sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> None:
    tokens = FakeTokens(sim, stale_first=True)
    client = _client(tokens, http, clock, sleeps, actor="cli")
    reading = await client.latest()
    assert reading is not None
    assert tokens.refreshes == [("dexcom", "cli", True)]
    assert [r.status for r in api.requests] == [401, 200]
    assert sleeps.delays == []


@pytest.mark.anyio
async def test_401_after_refresh_needs_reauthorization(
    api: DexcomSim, sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> None:
    tokens = FakeTokens(sim, stale_first=True, refresh_works=False)
    client = _client(tokens, http, clock, sleeps)
    with pytest.raises(ReauthorizationRequired) as info:
        await client.devices()
    assert len(tokens.refreshes) == 1
    assert info.value.provider_status == 401
    assert info.value.provider == "dexcom"
    assert "stale-token" not in str(info.value)
    assert [r.status for r in api.requests] == [401, 401]


@pytest.mark.anyio
async def test_expired_token_midway_is_refreshed(
    api: DexcomSim, sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> None:
    tokens = FakeTokens(sim)
    client = _client(tokens, http, clock, sleeps)
    await client.devices()
    clock.advance(7200)
    await client.devices()
    assert len(tokens.refreshes) == 1
    assert [r.status for r in api.requests] == [200, 401, 200]


@pytest.mark.anyio
async def test_refresh_failure_propagates(
    sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> None:
    class Revoked(FakeTokens):
        async def refresh(self, provider: str, *, actor: str, force: bool = True) -> None:
            raise ReauthorizationRequired(
                "grant revoked", provider=provider, oauth_error="invalid_grant", provider_status=400
            )

    client = _client(Revoked(sim, stale_first=True), http, clock, sleeps)
    with pytest.raises(ReauthorizationRequired, match="grant revoked"):
        await client.data_range()


@pytest.mark.anyio
async def test_429_honours_retry_after(
    api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth, sleeps: Sleeps
) -> None:
    sim.inject(429, count=2, retry_after=7)
    readings = await dexcom.egvs(NOW - timedelta(hours=1), NOW)
    assert len(readings) == 12
    assert sleeps.delays == [7.0, 7.0]
    assert [r.status for r in api.requests] == [429, 429, 200]


@pytest.mark.anyio
async def test_5xx_backs_off_exponentially_then_succeeds(
    dexcom: DexcomClient, sim: SimOAuth, sleeps: Sleeps
) -> None:
    sim.inject(503, count=2)
    devices = await dexcom.devices()
    assert len(devices) == 1
    assert sleeps.delays == [1.0, 2.0]


@pytest.mark.anyio
async def test_5xx_gives_up_after_bounded_retries(
    api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth, sleeps: Sleeps
) -> None:
    sim.inject(500, count=10)
    with pytest.raises(ProviderTransientError) as info:
        await dexcom.egvs(NOW - timedelta(hours=1), NOW)
    assert info.value.provider_status == 500
    assert sleeps.delays == [1.0, 2.0, 4.0]
    assert len(api.requests) == 4


@pytest.mark.anyio
async def test_long_retry_after_is_not_slept(
    dexcom: DexcomClient, sim: SimOAuth, sleeps: Sleeps
) -> None:
    sim.inject(429, retry_after=3600)
    with pytest.raises(ProviderTransientError) as info:
        await dexcom.devices()
    assert info.value.retry_after == 3600.0
    assert info.value.provider_status == 429
    assert sleeps.delays == []


@pytest.mark.anyio
async def test_network_errors_are_transient(
    sim: SimOAuth, clock: ManualClock, sleeps: Sleeps
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = _client(FakeTokens(sim), http, clock, sleeps, retry=RetryPolicy(max_retries=1))
        with pytest.raises(ProviderTransientError, match="ConnectError") as info:
            await client.devices()
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert sleeps.delays == [1.0]


@pytest.mark.anyio
async def test_a_window_the_server_refuses_is_a_provider_error(
    sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> None:
    client = _client(FakeTokens(sim), http, clock, sleeps, max_window=timedelta(days=40))
    with pytest.raises(ProviderError) as info:
        await client.egvs(NOW - timedelta(days=40), NOW)
    assert type(info.value) is ProviderError
    assert info.value.provider_status == 400
    assert info.value.description is not None
    assert "30 days" in info.value.description
    assert sleeps.delays == []


# ----------------------------------------------------------------------- endpoints


@pytest.mark.anyio
async def test_empty_range(api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth) -> None:
    assert await dexcom.egvs(NOW - timedelta(days=200), NOW - timedelta(days=190)) == []
    assert len(api.requests) == 1


@pytest.mark.anyio
async def test_latest_respects_the_data_delay(clock: ManualClock, sleeps: Sleeps) -> None:
    app = create_sim_app(api=DexcomSim(clock=clock, data_delay=timedelta(hours=3)), clock=clock)
    async with httpx.AsyncClient(transport=asgi(app), base_url=BASE) as http:
        client = _client(FakeTokens(get_sim(app)), http, clock, sleeps)
        assert await client.latest(within=timedelta(hours=3)) is None
        reading = await client.latest()
    assert reading is not None
    assert reading.system_time == datetime(2026, 11, 20, 14, 55, 23, tzinfo=UTC)


@pytest.mark.anyio
async def test_latest_is_the_newest_reading(dexcom: DexcomClient) -> None:
    reading = await dexcom.latest()
    assert reading is not None
    assert reading.system_time == datetime(2026, 11, 20, 17, 55, 23, tzinfo=UTC)
    assert reading.value_mgdl is not None
    assert 40 <= reading.value_mgdl <= 400
    assert reading.status == "ok"


@pytest.mark.anyio
async def test_data_range(dexcom: DexcomClient) -> None:
    data = await dexcom.data_range()
    assert data.egvs is not None
    assert data.egvs[1] == datetime(2026, 11, 20, 17, 55, 23, tzinfo=UTC)
    assert data.egvs[0] - (NOW - timedelta(days=120)) < timedelta(minutes=5)
    assert data.events is not None
    assert data.calibrations is not None


@pytest.mark.anyio
async def test_events_calibrations_alerts_devices(
    api: DexcomSim, dexcom: DexcomClient, sim: SimOAuth
) -> None:
    start, end = NOW - timedelta(days=45), NOW
    events = await dexcom.events(start, end)
    calibrations = await dexcom.calibrations(start, end)
    alerts = await dexcom.alerts(start, end)
    devices = await dexcom.devices()
    assert len(events) == 90
    assert len(calibrations) == 45
    assert {a["alertName"] for a in alerts} == {"low", "high"}
    assert devices[0]["transmitterGeneration"] == "g7"
    assert [r.path for r in api.requests] == [
        "/v3/users/self/events",
        "/v3/users/self/events",
        "/v3/users/self/calibrations",
        "/v3/users/self/calibrations",
        "/v3/users/self/alerts",
        "/v3/users/self/alerts",
        "/v3/users/self/devices",
    ]


@pytest.mark.anyio
async def test_from_spec_uses_the_catalog_base_url_and_id(
    sim: SimOAuth, http: httpx.AsyncClient, clock: ManualClock, sleeps: Sleeps
) -> None:
    spec = ProviderSpec(
        id="dexcom-sim",
        name="Dexcom (sim)",
        authorize_url=f"{BASE}/v2/oauth2/login",
        token_url=f"{BASE}/v2/oauth2/token",
        api_base_url=BASE + "/",
    )
    tokens = FakeTokens(sim)
    client = DexcomClient.from_spec(spec, tokens, http=http, clock=clock, sleep=sleeps)
    assert client.provider_id == "dexcom-sim"
    assert client.base_url == BASE
    await client.devices()
    assert tokens.gets == ["dexcom-sim"]
    with pytest.raises(ConfigError, match="api_base_url"):
        DexcomClient.from_spec(
            ProviderSpec(id="x", name="x", authorize_url="a", token_url="t"), tokens, http=http
        )


# ------------------------------------------------------------------- pure helpers


def _reading(value: int | None = 142, trend: str = "flat", minutes_ago: float = 4) -> Reading:
    when = NOW - timedelta(minutes=minutes_ago)
    return Reading(when, when.replace(tzinfo=None), value, trend, 0.2, "ok")


@pytest.mark.parametrize(
    ("trend", "arrow"),
    [
        ("doubleUp", "↑↑"),
        ("singleUp", "↑"),
        ("fortyFiveUp", "↗"),
        ("flat", "→"),
        ("fortyFiveDown", "↘"),
        ("singleDown", "↓"),
        ("doubleDown", "↓↓"),
        ("none", "?"),
        ("unknown", "?"),
        ("notComputable", "?"),
        ("rateOutOfRange", "?"),
    ],
)
def test_trend_arrows(trend: str, arrow: str) -> None:
    assert _reading(trend=trend).arrow == arrow


@pytest.mark.parametrize(
    ("reading", "unit", "text"),
    [
        (_reading(142), "mg/dL", "142 mg/dL → 4m ago"),
        (_reading(142), "mmol/L", "7.9 mmol/L → 4m ago"),
        (_reading(55, "singleDown", 0.5), "mg/dL", "55 mg/dL ↓ 30s ago"),
        (_reading(250, "doubleUp", 125), "mmol/L", "13.9 mmol/L ↑↑ 2h 5m ago"),
        (_reading(100, "flat", 120), "mg/dL", "100 mg/dL → 2h ago"),
        (_reading(100, "flat", 60 * 24 * 3), "mg/dL", "100 mg/dL → 3d ago"),
        (_reading(None, "none"), "mg/dL", "no value (ok) ? 4m ago"),
    ],
)
def test_format_reading(reading: Reading, unit: str, text: str) -> None:
    assert format_reading(reading, unit, now=NOW) == text  # type: ignore[arg-type]


def test_mmol_conversion() -> None:
    assert _reading(100).mmol == 5.5
    assert _reading(180).mmol == 10.0
    assert _reading(70).mmol == 3.9
    assert _reading(None).mmol is None


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("24h", timedelta(hours=24)),
        ("6h", timedelta(hours=6)),
        ("7d", timedelta(days=7)),
        ("90m", timedelta(minutes=90)),
        ("2w", timedelta(weeks=2)),
        (" 3 H ", timedelta(hours=3)),
    ],
)
def test_parse_since(text: str, delta: timedelta) -> None:
    assert parse_since(text) == delta


@pytest.mark.parametrize("text", ["", "24", "h", "1.5h", "-3h", "0d", "3mo", "yesterday"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_since(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-20T12:00:23", datetime(2026, 11, 20, 12, 0, 23, tzinfo=UTC)),
        ("2026-11-20T12:00:23Z", datetime(2026, 11, 20, 12, 0, 23, tzinfo=UTC)),
        ("2026-11-20T12:00:23+00:00", datetime(2026, 11, 20, 12, 0, 23, tzinfo=UTC)),
        ("2026-11-20T04:00:23-08:00", datetime(2026, 11, 20, 12, 0, 23, tzinfo=UTC)),
        ("2022-12-05T15:00:25.438Z", datetime(2022, 12, 5, 15, 0, 25, 438_000, tzinfo=UTC)),
    ],
)
def test_parse_dexcom_time(text: str, expected: datetime) -> None:
    parsed = parse_dexcom_time(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


def test_display_time_without_offset_stays_naive() -> None:
    assert parse_dexcom_time("2026-11-20T04:00:23", assume_utc=False).tzinfo is None


def test_format_dexcom_time() -> None:
    when = datetime(2026, 11, 20, 19, 30, 5, 1, tzinfo=timezone(timedelta(hours=1)))
    assert format_dexcom_time(when) == "2026-11-20T18:30:05"
    assert format_dexcom_time(when, round_up=True) == "2026-11-20T18:30:06"
    assert format_dexcom_time(when.replace(microsecond=0), round_up=True) == "2026-11-20T18:30:05"
    with pytest.raises(ValueError, match="aware"):
        format_dexcom_time(datetime(2026, 11, 20))


def test_csv_and_json() -> None:
    readings = [_reading(142, "flat", 10), _reading(None, "none", 5)]
    rows = list(csv.DictReader(io.StringIO(readings_to_csv(readings))))
    assert rows[0] == {
        "system_time": "2026-11-20T17:50:00Z",
        "display_time": "2026-11-20T17:50:00",
        "value_mgdl": "142",
        "value_mmol": "7.9",
        "trend": "flat",
        "arrow": "→",
        "trend_rate": "0.2",
        "status": "ok",
    }
    assert rows[1]["value_mgdl"] == ""
    assert rows[1]["value_mmol"] == ""
    data = json.loads(readings_to_json(readings))
    assert data[0]["value_mgdl"] == 142
    assert data[0]["arrow"] == "→"
    assert data[1]["value_mgdl"] is None
