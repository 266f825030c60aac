"""The bot's ``weight`` command end to end: BotRunner -> the Withings integration -> the
simulated Measure API with the broker's token -> a caption and a PNG of weight and blood
pressure. Also the chart itself, and that matplotlib loads only when a chart is drawn."""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from quart import Quart

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from bot.runner import ChatCommandHandler
from flowengine.broker import Broker
from flowengine.catalog import load_catalog
from flowengine.clock import ManualClock, to_ms
from flowengine.engine import FlowEngine
from flowengine.tokens import TokenSet
from integrations import Services, bind_commands
from integrations.withings import INTEGRATION, parse_weight
from integrations.withings.chart import render_chart
from integrations.withings.chat import caption
from integrations.withings.client import Measurement
from integrations.withings.sim import WithingsSim
from tests.bot.conftest import OWNER, BotRig
from tests.fakes import asgi

NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
BASE = "https://wbsapi.test"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api(clock: ManualClock) -> WithingsSim:
    return WithingsSim(clock=clock)


@pytest.fixture(name="sim_app")
def _sim_app(clock: ManualClock, api: WithingsSim) -> Quart:
    return create_sim_app(api=api, clock=clock)


@pytest.fixture(name="sim")
def _sim(sim_app: Quart) -> SimOAuth:
    return get_sim(sim_app)


@pytest.fixture(name="withings_http")
async def _withings_http(sim_app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=asgi(sim_app)) as client:
        yield client


@pytest.fixture(name="withings_rig")
def _withings_rig(rig: BotRig, withings_http: httpx.AsyncClient, clock: ManualClock) -> BotRig:
    rig.catalog.register(dataclasses.replace(load_catalog().get("withings"), api_base_url=BASE))

    def make(broker: Broker, engine: FlowEngine) -> Sequence[ChatCommandHandler]:
        services = Services(
            broker=broker, http=withings_http, clock=clock, actor="bot", tz="Europe/Berlin"
        )
        return bind_commands([INTEGRATION], services)

    rig.commands = make
    return rig


@pytest.mark.anyio
async def test_weight_answers_with_caption_and_chart(
    withings_rig: BotRig, sim: SimOAuth, api: WithingsSim
) -> None:
    rig = withings_rig
    issued = sim.issue_tokens(scope="user.metrics")
    rig.tokens.write(
        "withings",
        TokenSet(
            access=issued["access_token"],
            refresh=issued["refresh_token"],
            expires=to_ms(time.time()) + 3_600_000,
        ),
    )
    async with rig.running():
        await rig.say("weight 7d")
        await rig.say("bp 1y")
        await rig.say("weight 3w")
    week, year, usage = rig.chat.sent(OWNER)
    assert week.image is not None
    assert _png_size(week.image) == (1000, 700)
    weight_line, pressure_line, window = week.text.split("\n")
    assert weight_line.startswith("⚖️ ")
    assert " kg " in weight_line
    assert pressure_line.startswith("❤️ ")
    assert "mmHg, pulse " in pressure_line
    assert window == "Last 7 d"
    assert year.text.endswith("Last 365 d")
    assert usage.text == "Say weight, weight 7d, weight 90d or weight 1y."
    assert {r.params["action"] for r in api.requests} == {"getmeas"}


@pytest.mark.anyio
async def test_weight_when_withings_is_not_connected(withings_rig: BotRig) -> None:
    async with withings_rig.running():
        await withings_rig.say("weight")
    assert withings_rig.chat.texts(OWNER) == [
        "Withings is not connected. Say connect withings first."
    ]


@pytest.mark.parametrize(
    ("words", "days"),
    [
        ((), 30),
        (("7d",), 7),
        (("90d",), 90),
        (("1y",), 365),
        (("730d",), 730),
        (("731d",), None),
        (("0d",), None),
        (("3w",), None),
        (("7d", "1y"), None),
    ],
)
def test_parse_weight(words: tuple[str, ...], days: int | None) -> None:
    assert parse_weight(words) == days


def test_caption() -> None:
    assert caption("78.4 kg 2h ago", None, 30) == "⚖️ 78.4 kg 2h ago\nLast 30 d"
    assert caption(None, None, 7) == "⚖️ No weight or blood pressure in the last 7 d."


def test_the_chart_leaves_out_the_guest_and_draws_empty_periods() -> None:
    items = [
        Measurement(NOW - timedelta(days=d), d, weight_kg=78 + d / 10) for d in range(1, 20)
    ] + [
        Measurement(NOW - timedelta(days=d, hours=1), 100 + d, systolic=120, diastolic=80)
        for d in range(1, 20)
    ]
    guest = Measurement(NOW, 999, weight_kg=30.0, attrib=1)
    png = render_chart([*items, guest], tz=ZoneInfo("Europe/Berlin"))
    assert _png_size(png) == (1000, 700)
    assert _png_size(render_chart([], tz=ZoneInfo("UTC"), width_px=400, height_px=300)) == (
        400,
        300,
    )
    with pytest.raises(ValueError, match="100 x 100"):
        render_chart([], tz=ZoneInfo("UTC"), width_px=50)


def test_matplotlib_loads_only_when_a_chart_is_drawn() -> None:
    code = (
        "import sys, integrations.withings.chart, integrations.withings.chat\n"
        "assert 'matplotlib' not in sys.modules\n"
        "from zoneinfo import ZoneInfo\n"
        "integrations.withings.chart.render_chart([], tz=ZoneInfo('UTC'))\n"
        "assert 'matplotlib' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
