"""The glucose command end to end: BotRunner -> the Dexcom integration's chat command ->
simulated Dexcom (in-process ASGI) with tokens from the broker -> caption with the latest
value and a PNG chart."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import parse_qs

import httpx
import pytest
from quart import Quart

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from bot.runner import ChatCommandHandler
from flowengine.broker import Broker
from flowengine.catalog import load_catalog
from flowengine.clock import Clock, ManualClock, SystemClock, to_ms
from flowengine.engine import FlowEngine
from flowengine.tokens import TokenSet
from integrations import Services, bind_commands
from integrations.dexcom import INTEGRATION, parse_glucose
from integrations.dexcom.chat import caption
from integrations.dexcom.client import TREND_ARROWS
from integrations.dexcom.sim import DexcomSim, glucose_at
from tests.bot.conftest import OWNER, BotRig
from tests.fakes import asgi

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
BASE = "https://sim-dexcom.test"


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api(clock: ManualClock) -> DexcomSim:
    return DexcomSim(clock=clock)


@pytest.fixture(name="sim_app")
def _sim_app(clock: ManualClock, api: DexcomSim) -> Quart:
    return create_sim_app(api=api, clock=clock)


@pytest.fixture(name="sim")
def _sim(sim_app: Quart) -> SimOAuth:
    return get_sim(sim_app)


def commands(http: httpx.AsyncClient, clock: Clock, tz: str = "UTC") -> object:
    """The rig's command factory: the Dexcom integration bound to the running broker."""

    def make(broker: Broker, engine: FlowEngine) -> Sequence[ChatCommandHandler]:
        services = Services(broker=broker, http=http, clock=clock, actor="bot", tz=tz)
        return bind_commands([INTEGRATION], services)

    return make


@pytest.fixture(name="dexcom_http")
async def _dexcom_http(sim_app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=asgi(sim_app)) as client:
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
    dexcom_rig: BotRig,
    sim: SimOAuth,
    api: DexcomSim,
    dexcom_http: httpx.AsyncClient,
    clock: ManualClock,
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
    rig.commands = commands(dexcom_http, clock, "Europe/Berlin")  # type: ignore[assignment]
    async with rig.running():
        await rig.say("glucose 6h")
    (answer,) = rig.chat.sent(OWNER)
    assert answer.image is not None
    assert _png_size(answer.image) == (1000, 500)

    latest = api.latest_egv_time()
    first, second = answer.text.split("\n")
    value, unit, arrow, *age = first.removeprefix("🩸 ").split(" ")
    assert (value, unit) == (str(round(glucose_at(latest.timestamp()))), "mg/dL")
    assert arrow in TREND_ARROWS.values()
    minutes, seconds = divmod(round((NOW - latest).total_seconds()), 60)
    assert minutes < 60
    parts = [f"{minutes}m"] if minutes else []
    if seconds or not minutes:
        parts.append(f"{seconds}s")
    assert age == [*parts, "ago"]  # the CLI's and the bot's duration format
    assert second == "Last 6 h"
    # one request for exactly the asked window, in Dexcom's date format
    (request,) = [r for r in api.requests if r.path.endswith("/egvs")]
    query = parse_qs(request.query_string)
    assert query["startDate"] == ["2026-11-20T12:00:00"]
    assert query["endDate"] == ["2026-11-20T18:00:01"]


async def test_glucose_when_dexcom_is_not_connected(
    dexcom_rig: BotRig, dexcom_http: httpx.AsyncClient, clock: ManualClock
) -> None:
    rig = dexcom_rig
    rig.commands = commands(dexcom_http, clock)  # type: ignore[assignment]
    async with rig.running():
        await rig.say("glucose")
        await rig.say("glucose 3w")
        await rig.say("help")
    not_connected, usage, help_text = rig.chat.texts(OWNER)
    assert not_connected == "Dexcom is not connected. Say connect dexcom first."
    assert usage == "Say glucose, glucose 6h, glucose 24h or glucose 7d."
    assert "glucose [6h|24h|7d] — latest glucose reading and a chart\nhelp — this text" in help_text


async def test_without_the_integration_there_is_no_glucose_command(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("glucose 7d")
        await rig.say("help")
    unknown, help_text = rig.chat.texts(OWNER)
    assert unknown == "I did not understand that. Say help for what I can do."
    assert "glucose" not in help_text


async def test_a_provider_without_api_base_url_is_a_clear_failure(
    dexcom_rig: BotRig, dexcom_http: httpx.AsyncClient, clock: ManualClock
) -> None:
    rig = dexcom_rig
    rig.catalog.register(replace(load_catalog().get("dexcom"), api_base_url=None))
    rig.tokens.write("dexcom", TokenSet(access="a", refresh="r", expires=None))
    rig.commands = commands(dexcom_http, clock)  # type: ignore[assignment]
    async with rig.running():
        await rig.say("glucose")
    (answer,) = rig.chat.texts(OWNER)
    assert answer.startswith("⚠️ No glucose reading: ")
    assert "api_base_url" in answer


@pytest.mark.parametrize(
    ("words", "hours"),
    [((), 24), (("6h",), 6), (("24h",), 24), (("1d",), 24), (("7d",), 168), (("3w",), None)],
)
def test_parse_glucose(words: tuple[str, ...], hours: int | None) -> None:
    assert parse_glucose(words) == hours
    assert parse_glucose(("6h", "7d")) is None


@pytest.mark.parametrize(
    ("reading", "hours", "text"),
    [
        ("142 mg/dL → 4m ago", 6, "🩸 142 mg/dL → 4m ago\nLast 6 h"),
        ("7.9 mmol/L ↗ just now", 24, "🩸 7.9 mmol/L ↗ just now\nLast 24 h"),
        (None, 168, "🩸 No glucose readings in the last 7 d."),
    ],
)
def test_caption(reading: str | None, hours: int, text: str) -> None:
    assert caption(reading, hours) == text


async def test_connect_dexcom_at_the_simulator_then_glucose(rig: BotRig) -> None:
    """The whole story in one chat: credentials asked, consent at the simulated Dexcom, the
    redirect to the daemon over HTTP, the exchange, then a glucose chart on the new token."""
    api = DexcomSim(clock=SystemClock())
    sim_app = create_sim_app(
        api=api,
        clients={"sim-client": "sim-secret"},
        redirect_uris=[rig.redirect_uri],
        consent="allow",
    )
    sim = get_sim(sim_app)
    rig.catalog.register(load_catalog().get("dexcom"))  # api.dexcom.com, routed to the sim
    async with httpx.AsyncClient(transport=asgi(sim_app)) as sim_http:
        rig.provider_http = sim_http
        rig.commands = commands(sim_http, SystemClock())  # type: ignore[assignment]
        async with rig.running():
            await rig.say("connect dexcom")
            await rig.say("sim-client")
            await rig.say("sim-secret")
            link = await rig.authorize_message("Dexcom")
            # the owner's browser: consent at Dexcom, redirected to the daemon's callback
            url = link.buttons[0].url  # type: ignore[union-attr]
            consent = await sim_http.get(url)
            assert consent.status_code == 302
            callback = consent.headers["location"]
            assert callback.startswith(rig.redirect_uri + "?")
            assert (await rig.http.get(callback)).status_code == 200
            await rig.chat.wait_for(lambda: link.edits)
            assert link.current.startswith(
                "✅ Dexcom connected\nScopes: offline_access\nToken expires in 2h"
            )
            assert sim.counters.token_requests["authorization_code"] == 1

            await rig.say("glucose 24h")
            chart = await rig.chat.wait_message(lambda m: m.image is not None)
    assert chart.image is not None
    assert _png_size(chart.image) == (1000, 500)
    assert chart.text.startswith("🩸 ")
    assert chart.text.endswith("\nLast 24 h")
    assert api.counters.api_requests["egvs"] == 1
    assert api.counters.api_unauthorized == 0
