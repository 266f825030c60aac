"""The glucose command end to end: BotRunner -> DexcomGlucose -> simulated Dexcom (in-process
ASGI) with tokens from the broker -> caption with the latest value and a PNG chart."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import parse_qs

import httpx
import pytest
from quart import Quart

from agentd.simprovider import SimProvider, create_sim_app, get_sim, glucose_at
from bot import texts
from bot.glucose import dexcom_glucose
from flowengine.catalog import load_catalog
from flowengine.clock import ManualClock, to_ms
from flowengine.dexcom import TREND_ARROWS
from flowengine.errors import ConfigError
from flowengine.tokens import TokenSet

from .conftest import OWNER, BotRig

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
BASE = "https://sim-dexcom.test"


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="sim_app")
def _sim_app(clock: ManualClock) -> Quart:
    return create_sim_app(clock=clock)


@pytest.fixture(name="sim")
def _sim(sim_app: Quart) -> SimProvider:
    return get_sim(sim_app)


@pytest.fixture(name="dexcom_http")
async def _dexcom_http(sim_app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim_app)) as client:
        yield client


@pytest.fixture(name="dexcom_rig")
def _dexcom_rig(rig: BotRig) -> BotRig:
    rig.catalog.register(replace(load_catalog().get("dexcom"), api_base_url=BASE))
    return rig


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_glucose_answers_with_latest_value_trend_and_chart(
    dexcom_rig: BotRig, sim: SimProvider, dexcom_http: httpx.AsyncClient, clock: ManualClock
) -> None:
    rig = dexcom_rig
    issued = sim.issue_tokens()
    rig.tokens.write(
        "dexcom",
        TokenSet(
            access=issued["access_token"],
            refresh=issued["refresh_token"],
            expires=to_ms(time.time()) + 3_600_000,
        ),
    )
    async with rig.running() as runner:
        assert rig.broker is not None
        runner.glucose = dexcom_glucose(
            rig.broker, http=dexcom_http, tz="Europe/Berlin", clock=clock
        )
        await rig.say("glucose 6h")
    (answer,) = rig.chat.sent(OWNER)
    assert answer.image is not None
    assert _png_size(answer.image) == (1000, 500)

    latest = sim.latest_egv_time()
    first, second = answer.text.split("\n")
    value, unit, arrow, *age = first.removeprefix("🩸 ").split(" ")
    assert (value, unit) == (str(round(glucose_at(latest.timestamp()))), "mg/dL")
    assert arrow in TREND_ARROWS.values()
    assert " ".join(age) in ("just now", f"{int((NOW - latest).total_seconds() // 60)} min ago")
    assert second == "Last 6 h"
    # one request for exactly the asked window, in Dexcom's date format
    (request,) = [r for r in sim.requests if r.path.endswith("/egvs")]
    query = parse_qs(request.query_string)
    assert query["startDate"] == ["2026-11-20T12:00:00"]
    assert query["endDate"] == ["2026-11-20T18:00:01"]


async def test_glucose_when_dexcom_is_not_connected(
    dexcom_rig: BotRig, dexcom_http: httpx.AsyncClient, clock: ManualClock
) -> None:
    rig = dexcom_rig
    async with rig.running() as runner:
        assert rig.broker is not None
        runner.glucose = dexcom_glucose(rig.broker, http=dexcom_http, clock=clock)
        await rig.say("glucose")
    assert rig.chat.texts(OWNER) == ["Dexcom is not connected. Say connect dexcom first."]


async def test_glucose_when_not_set_up(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("glucose 7d")
    assert rig.chat.texts(OWNER) == [texts.GLUCOSE_NOT_SET_UP]


async def test_a_provider_without_api_base_url_cannot_serve_glucose(
    rig: BotRig, dexcom_http: httpx.AsyncClient
) -> None:
    async with rig.running():
        assert rig.broker is not None
        with pytest.raises(ConfigError, match="api_base_url"):
            dexcom_glucose(rig.broker, http=dexcom_http, provider_id="fake")


@pytest.mark.parametrize(
    ("reading", "hours", "caption"),
    [
        ("142 mg/dL → 4 min ago", 6, "🩸 142 mg/dL → 4 min ago\nLast 6 h"),
        ("7.9 mmol/L ↗ just now", 24, "🩸 7.9 mmol/L ↗ just now\nLast 24 h"),
        (None, 168, "🩸 No glucose readings in the last 7 d."),
    ],
)
def test_caption(reading: str | None, hours: int, caption: str) -> None:
    assert texts.glucose_caption(reading, hours) == caption


async def test_connect_dexcom_at_the_simulator_then_glucose(rig: BotRig) -> None:
    """The whole story in one chat: credentials asked, consent at the simulated Dexcom, the
    redirect to the daemon over HTTP, the exchange, then a glucose chart on the new token."""
    sim_app = create_sim_app(
        clients={"sim-client": "sim-secret"},
        redirect_uris=[rig.daemon.redirect_uri],
        consent="allow",
    )
    sim = get_sim(sim_app)
    rig.catalog.register(load_catalog().get("dexcom"))  # api.dexcom.com, routed to the sim
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim_app)) as sim_http:
        rig.provider_http = sim_http
        async with rig.running() as runner:
            assert rig.broker is not None
            runner.glucose = dexcom_glucose(rig.broker, http=sim_http)
            await rig.say("connect dexcom")
            await rig.say("sim-client")
            await rig.say("sim-secret")
            link = await rig.authorize_message("Dexcom")
            # the owner's browser: consent at Dexcom, redirected to the daemon's callback
            url = link.buttons[0].url  # type: ignore[union-attr]
            consent = await sim_http.get(url)
            assert consent.status_code == 302
            callback = consent.headers["location"]
            assert callback.startswith(rig.daemon.redirect_uri + "?")
            assert (await rig.http.get(callback)).status_code == 200
            await rig.chat.wait_for(lambda: link.edits)
            assert link.current.startswith(
                "✅ Dexcom connected\nScopes: offline_access\nToken expires in 2 h"
            )
            assert sim.counters.token_requests["authorization_code"] == 1

            await rig.say("glucose 24h")
            chart = await rig.chat.wait_message(lambda m: m.image is not None)
    assert chart.image is not None
    assert _png_size(chart.image) == (1000, 500)
    assert chart.text.startswith("🩸 ")
    assert chart.text.endswith("\nLast 24 h")
    assert sim.counters.api_requests["egvs"] == 1
    assert sim.counters.api_unauthorized == 0
