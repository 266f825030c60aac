"""Grants that end on their own: the timer warns three days before and on the last day,
once each, recorded in the ledger; status shows the date. Time travel with a ManualClock
and with freezegun, against a real ledger, the real Broker and timer, a fake provider."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from freezegun import freeze_time

from bot import texts
from flowengine.broker import Broker
from flowengine.catalog import Catalog, RefreshLifetime
from flowengine.clock import Clock, ManualClock, SystemClock, to_ms
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.forecast import SOON, TODAY, add_months
from flowengine.protocol import parse_callback
from flowengine.timer import RefreshTimer
from flowengine.tokens import TokenStore
from tests.fakes import FakeProvider

pytestmark = pytest.mark.anyio

REDIRECT = "https://broker.example.ts.net/oauth/callback"
START = 1_800_000_000.0  # 2027-01-15 08:00 UTC
DAY = 86_400.0
SPOTIFY_LIKE = RefreshLifetime("absolute", months=6)


@dataclass
class Rig:
    engine: FlowEngine
    broker: Broker
    fake: FakeProvider
    clock: Clock
    tmp: Path

    def timer(self) -> RefreshTimer:
        """A timer process (a new one after a 'restart')."""
        return RefreshTimer(self.broker, rng=random.Random(3))

    async def warnings(self) -> list[tuple[str, str | None, int | None]]:
        notes = await self.engine.notifications()
        return [(n.kind, n.flow_id, n.chat_id) for n in notes if n.kind in (SOON, TODAY)]


async def _rig(
    tmp: Path, client: httpx.AsyncClient, fake: FakeProvider, clock: Clock, lifetime: object
) -> Rig:
    engine = await FlowEngine.open(tmp / "ledger.sqlite3", clock=clock)
    creds = CredentialStore(tmp / "credentials.json")
    creds.put("fake", fake.credentials())
    catalog = Catalog().with_override(fake.spec(refresh_lifetime=lifetime))
    broker = Broker(
        engine, catalog=catalog, credentials=creds, tokens=TokenStore(tmp / "auth.json"),
        http=client,
    )  # fmt: skip
    return Rig(engine, broker, fake, clock, tmp)


async def _connect(rig: Rig) -> str:
    start = await rig.broker.begin("fake", redirect_uri=REDIRECT, actor="bot", chat_id=42)
    verifier = await rig.engine.code_verifier(start.flow.id)
    code = rig.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
    await rig.engine.record_callback(parse_callback({"state": [start.state], "code": [code]}))
    await rig.broker.complete_state(start.state, actor="bot")
    return str(start.flow.id)


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider(expires_in=3600)


@pytest.fixture(name="rig")
async def _rig_fixture(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[Rig]:
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, client, fake, ManualClock(START), SPOTIFY_LIKE)
        try:
            yield rig
        finally:
            await rig.engine.close()


def _travel(rig: Rig, when: float) -> None:
    assert isinstance(rig.clock, ManualClock)
    rig.clock.set(when)


async def test_one_warning_three_days_before_and_one_on_the_last_day(rig: Rig) -> None:
    flow_id = await _connect(rig)
    deadline = add_months(START, 6)  # authorized at START (the code exchange)
    (status,) = await rig.broker.status()
    assert status.reconnect_by == to_ms(deadline)
    timer = rig.timer()
    await timer.start_up()
    await timer.sweep()
    assert await rig.warnings() == []

    # a day before the window: refreshed as usual, no warning
    _travel(rig, deadline - 4 * DAY)
    report = await timer.sweep()
    assert report.refreshed == [flow_id]
    assert report.lifetime_warned == []

    _travel(rig, deadline - 3 * DAY + 60)
    report = await timer.sweep()
    assert report.lifetime_warned == [flow_id]
    assert await rig.warnings() == [(SOON, flow_id, 42)]
    (note,) = await rig.engine.notifications()
    assert (note.reason, note.data["deadline"]) == ("grant_lifetime", to_ms(deadline))
    worded = texts.notification(note.kind, "Spotify", reason=note.reason, data=note.data)
    assert "2027-07-15 08:00 UTC" in worded  # as the bot words it
    assert "6 months after authorization" in worded

    # every sweep and a restarted timer during the window: still one warning
    for hours in (1, 2, 30):
        _travel(rig, deadline - 3 * DAY + hours * 3600)
        await timer.sweep()
    restarted = rig.timer()
    await restarted.start_up()
    await restarted.sweep()
    assert await rig.warnings() == [(SOON, flow_id, 42)]

    # the last day
    _travel(rig, deadline - 12 * 3600)
    await restarted.sweep()
    assert await rig.warnings() == [(SOON, flow_id, 42), (TODAY, flow_id, 42)]
    _travel(rig, deadline - 3600)
    await restarted.sweep()
    assert len(await rig.warnings()) == 2

    # past the deadline: nothing more from the forecast (the refresh failure speaks)
    _travel(rig, deadline + DAY)
    await restarted.sweep()
    assert len(await rig.warnings()) == 2


async def test_a_missed_window_is_not_sent_late(rig: Rig) -> None:
    """The timer was down through the three-day window: only the last-day warning goes."""
    flow_id = await _connect(rig)
    deadline = add_months(START, 6)
    _travel(rig, deadline - 20 * 3600)
    timer = rig.timer()
    await timer.start_up()
    await timer.sweep()
    assert await rig.warnings() == [(TODAY, flow_id, 42)]


async def test_reconnecting_moves_the_deadline(rig: Rig) -> None:
    first = await _connect(rig)
    deadline = add_months(START, 6)
    _travel(rig, deadline - 2 * DAY)
    timer = rig.timer()
    await timer.start_up()
    assert await rig.warnings() == [(SOON, first, 42)]
    second = await _connect(rig)  # the owner tapped "Reconnect"
    (status,) = await rig.broker.status()
    assert status.flow_id == second
    assert status.reconnect_by == to_ms(add_months(deadline - 2 * DAY, 6))
    await timer.sweep()
    _travel(rig, deadline - 12 * 3600)
    await timer.sweep()
    assert await rig.warnings() == [(SOON, first, 42)]  # nothing for the new grant yet


async def test_the_next_check_is_never_later_than_the_next_warning(
    tmp_path: Path,
) -> None:
    """A short-lived grant (5 days) with a long-lived access token (30 days)."""
    fake = FakeProvider(expires_in=30 * 86_400)
    clock = ManualClock(START)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, client, fake, clock, RefreshLifetime("absolute", days=5))
        try:
            flow_id = await _connect(rig)
            timer = rig.timer()
            await timer.start_up()
            at = await rig.engine.ledger.next_check_at(flow_id)
            assert at is not None
            assert at <= to_ms(START + 2 * DAY)  # the three-day window opens then
            _travel(rig, at / 1000)
            await timer.sweep()
            assert await rig.warnings() == [(SOON, flow_id, 42)]
            at = await rig.engine.ledger.next_check_at(flow_id)
            assert at == to_ms(START + 4 * DAY)  # then the last day
            _travel(rig, at / 1000)
            await timer.sweep()
            assert [k for k, _, _ in await rig.warnings()] == [SOON, TODAY]
        finally:
            await rig.engine.close()


@pytest.mark.parametrize(
    "lifetime",
    [
        None,
        RefreshLifetime("none"),
        RefreshLifetime("absolute", days=7, condition="the app is in Testing"),
    ],
)
async def test_no_rule_no_date_no_warning(tmp_path: Path, lifetime: object) -> None:
    fake = FakeProvider(expires_in=3600)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, client, fake, ManualClock(START), lifetime)
        try:
            await _connect(rig)
            (status,) = await rig.broker.status()
            assert status.reconnect_by is None
            timer = rig.timer()
            await timer.start_up()
            _travel(rig, START + 7 * DAY - 3600)
            await timer.sweep()
            assert await rig.warnings() == []
        finally:
            await rig.engine.close()


async def test_idle_rule_follows_the_last_refresh(tmp_path: Path) -> None:
    fake = FakeProvider(expires_in=3600)
    clock = ManualClock(START)
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        rig = await _rig(tmp_path, client, fake, clock, RefreshLifetime("idle", days=30))
        try:
            await _connect(rig)
            clock.advance(10 * DAY)
            await rig.broker.refresh("fake", actor="timer", force=True)
            (status,) = await rig.broker.status()
            assert status.reconnect_by == to_ms(START + 40 * DAY)
        finally:
            await rig.engine.close()


async def test_freezegun_time_travel_with_the_system_clock(tmp_path: Path) -> None:
    fake = FakeProvider(expires_in=3600)
    start = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC)
    with freeze_time(start, real_asyncio=True) as frozen:
        async with httpx.AsyncClient(transport=fake.transport()) as client:
            rig = await _rig(tmp_path, client, fake, SystemClock(), SPOTIFY_LIKE)
            try:
                flow_id = await _connect(rig)
                timer = rig.timer()
                await timer.start_up()
                frozen.move_to(dt.datetime(2027, 7, 13, 9, 0, tzinfo=dt.UTC))
                await timer.sweep()
                assert await rig.warnings() == [(SOON, flow_id, 42)]
                frozen.move_to(dt.datetime(2027, 7, 14, 9, 0, tzinfo=dt.UTC))
                await timer.sweep()
                assert [k for k, _, _ in await rig.warnings()] == [SOON, TODAY]
            finally:
                await rig.engine.close()
