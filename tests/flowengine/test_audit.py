"""Token hand-outs: the ledger's audit table (migration 5), first-hand-out notifications,
retention, and ``Broker.hand_out`` on a real ledger, vault and auth.json."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from bot import texts
from flowengine.audit import FIRST_HANDOUT, Caller, Retention, token_sha
from flowengine.broker import Broker, Outcome
from flowengine.catalog import Catalog
from flowengine.clock import ManualClock
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.ledger import SCHEMA_VERSION, Ledger
from flowengine.protocol import parse_callback
from flowengine.tokens import TokenStore
from flowengine.vault import token_hash
from tests.fakes import FakeProvider

pytestmark = pytest.mark.anyio

START = 1_800_000_000.0
NOW_MS = int(START * 1000)
REDIRECT = "https://broker.example.ts.net/oauth/callback"
CI = Caller("tag:ci", "ci-runner.tailnet.ts.net", "100.64.0.4")
OWNER = Caller("owner@example.com", "laptop.tailnet.ts.net", "100.64.0.2")


@pytest.fixture(name="ledger")
async def _ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        yield ledger
    finally:
        await ledger.close()


async def record(
    ledger: Ledger,
    caller: Caller = CI,
    provider: str = "dexcom",
    at: int = NOW_MS,
    retention: Retention | None = None,
) -> bool:
    _, first = await ledger.record_handout(
        at=at,
        who=caller.who,
        node=caller.node,
        provider=provider,
        token_sha="0123abcd",
        address=caller.address,
        flow_id=None,
        first_data=caller.public(),
        retention=retention,
    )
    return first


def _notifications(path: Path) -> list[tuple[str, str, str]]:
    """(kind, provider, who as the bot words the notification's data)."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT kind, provider, data FROM notifications").fetchall()
    return [
        (kind, provider, texts.handout_caller(json.loads(data))) for kind, provider, data in rows
    ]


# --------------------------------------------------------------------- ledger


async def test_migration_5_upgrades_a_version_4_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path)
    await ledger.close()
    with sqlite3.connect(path) as conn:  # what a version-4 installation has
        conn.executescript(
            "DROP TABLE token_handouts; DROP TABLE token_recipients;"
            # migration 6 (the device grant's columns) came later still
            " ALTER TABLE flows DROP COLUMN grant_type;"
            " ALTER TABLE flow_secrets DROP COLUMN device_code;"
            " ALTER TABLE flow_secrets DROP COLUMN user_code;"
            # and migration 7 (notifications' data)
            " ALTER TABLE notifications DROP COLUMN data;"
            " DELETE FROM schema_migrations WHERE version >= 5;"
        )
    ledger = await Ledger.open(path)
    try:
        assert await ledger.schema_version() == SCHEMA_VERSION == 7
        assert await record(ledger)
    finally:
        await ledger.close()


async def test_first_handout_notifies_once_per_identity_and_provider(
    ledger: Ledger, tmp_path: Path
) -> None:
    assert await record(ledger) is True
    assert await record(ledger) is False
    assert await record(ledger, provider="withings") is True
    assert await record(ledger, OWNER) is True
    assert await record(ledger, OWNER, at=NOW_MS + 1) is False
    assert _notifications(tmp_path / "ledger.sqlite3") == [
        (FIRST_HANDOUT, "dexcom", "tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)"),
        (FIRST_HANDOUT, "withings", "tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)"),
        (FIRST_HANDOUT, "dexcom", "owner@example.com on laptop.tailnet.ts.net (100.64.0.2)"),
    ]
    pending = await ledger.undelivered()
    assert [(n.kind, n.chat_id, n.reason) for n in pending] == [(FIRST_HANDOUT, None, None)] * 3


async def test_first_handout_is_one_notification_across_connections(tmp_path: Path) -> None:
    """Two processes' connections recording the same new pair at once: one notification."""
    path = tmp_path / "ledger.sqlite3"
    ledgers = [await Ledger.open(path) for _ in range(4)]
    firsts: list[bool] = []
    try:
        async with anyio.create_task_group() as tg:
            for ledger in ledgers:
                for _ in range(5):

                    async def one(ledger: Ledger = ledger) -> None:
                        firsts.append(await record(ledger))

                    tg.start_soon(one)
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert sorted(firsts) == [False] * 19 + [True]
    assert len(_notifications(path)) == 1


@pytest.mark.parametrize(
    "sha", ["", "0123abcd0123abcd", "a-Xk3d9", "0123ABCD", token_hash("x", 64)]
)
async def test_only_a_short_hash_prefix_is_recorded(ledger: Ledger, sha: str) -> None:
    with pytest.raises(ValueError, match="token_sha"):
        await ledger.record_handout(
            at=NOW_MS,
            who="tag:ci",
            node="",
            provider="dexcom",
            token_sha=sha,
            address="100.64.0.4",
            flow_id=None,
            first_data={},
        )
    assert await ledger.handouts() == []


async def test_handouts_filter_newest_first(ledger: Ledger) -> None:
    tagged = Caller("tag:ci,tag:gpu", "gpu.tailnet.ts.net", "100.64.0.9")
    for at, caller, provider in [
        (1, CI, "dexcom"),
        (2, OWNER, "dexcom"),
        (3, tagged, "withings"),
        (4, CI, "withings"),
    ]:
        await record(ledger, caller, provider, at=at)
    assert [r.at for r in await ledger.handouts()] == [4, 3, 2, 1]
    assert [r.at for r in await ledger.handouts(provider="dexcom")] == [2, 1]
    assert [r.at for r in await ledger.handouts(who="tag:ci")] == [4, 3, 1]
    assert [r.at for r in await ledger.handouts(who="TAG:GPU")] == [3]
    assert [r.at for r in await ledger.handouts(who="tag:c")] == []  # whole tags only
    assert [r.at for r in await ledger.handouts(who="Owner@Example.com")] == [2]
    assert [r.at for r in await ledger.handouts(who="tag:ci", provider="withings")] == [4, 3]
    assert [r.at for r in await ledger.handouts(since=3)] == [4, 3]
    assert [r.at for r in await ledger.handouts(limit=1)] == [4]
    row = (await ledger.handouts(limit=1))[0]
    assert row.public() == {
        "id": row.id,
        "at": 4,
        "who": "tag:ci",
        "node": "ci-runner.tailnet.ts.net",
        "provider": "withings",
        "token_sha": "0123abcd",
        "address": "100.64.0.4",
        "flow_id": None,
    }


async def test_retention_prunes_on_insert_by_age_and_count(ledger: Ledger) -> None:
    day = 86_400_000
    keep = Retention(days=2, max_rows=5)
    for i in range(3):
        await record(ledger, at=NOW_MS - 10 * day + i)  # old: past two days
    # the first insert of this ledger connection prunes at once
    await record(ledger, at=NOW_MS, retention=keep)
    assert [r.at for r in await ledger.handouts()] == [NOW_MS]
    for i in range(1, 10):
        await record(ledger, at=NOW_MS + i, retention=keep)
    # not pruned again yet: neither PRUNE_EVERY hand-outs nor a minute since
    assert len(await ledger.handouts(limit=100)) == 10
    await record(ledger, at=NOW_MS + Ledger.PRUNE_INTERVAL_MS, retention=keep)
    kept = [r.at for r in await ledger.handouts(limit=100)]
    assert kept == [NOW_MS + Ledger.PRUNE_INTERVAL_MS, *range(NOW_MS + 9, NOW_MS + 5, -1)]
    # first hand-outs are remembered past the rows' retention: no second notification
    assert await record(ledger, at=NOW_MS + 2 * Ledger.PRUNE_INTERVAL_MS) is False


async def test_prune_handouts(ledger: Ledger) -> None:
    for i in range(4):
        await record(ledger, at=NOW_MS + i)
    removed = await ledger.prune_handouts(Retention(days=1, max_rows=2), NOW_MS + 86_400_000)
    assert removed == 2  # one past its day, then all but the newest two: one more
    assert [r.at for r in await ledger.handouts()] == [NOW_MS + 3, NOW_MS + 2]
    with pytest.raises(ValueError, match="days"):
        Retention(days=0)
    with pytest.raises(ValueError, match="max_rows"):
        Retention(max_rows=0)


# --------------------------------------------------------------------- Broker


class Rig:
    def __init__(self, root: Path, broker: Broker, fake: FakeProvider, clock: ManualClock):
        self.root = root
        self.broker = broker
        self.fake = fake
        self.clock = clock

    async def connect(self) -> None:
        broker = self.broker
        start = await broker.begin("fake", redirect_uri=REDIRECT, actor="bot")
        verifier = await broker.engine.code_verifier(start.flow.id)
        code = self.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
        await broker.engine.record_callback(
            parse_callback({"state": [start.state], "code": [code]})
        )
        await broker.complete_state(start.state, actor="bot")


@pytest.fixture(name="rig")
async def _rig(tmp_path: Path) -> AsyncIterator[Rig]:
    fake = FakeProvider(delay=0.05)
    clock = ManualClock(START)
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
        creds = CredentialStore(tmp_path / "credentials.json")
        creds.put("fake", fake.credentials())
        broker = Broker(
            engine,
            catalog=Catalog().with_override(fake.spec()),
            credentials=creds,
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )
        try:
            yield Rig(tmp_path, broker, fake, clock)
        finally:
            await engine.close()


async def test_hand_out_records_before_it_returns(rig: Rig) -> None:
    await rig.connect()
    handed = await rig.broker.hand_out("fake", CI)
    assert handed.outcome.outcome is Outcome.STILL_VALID
    assert handed.handed_out
    assert handed.first
    tokens = handed.outcome.tokens
    assert tokens is not None
    assert handed.record is not None
    assert handed.record.token_sha == token_sha(tokens.access) == token_hash(tokens.access, 8)
    assert handed.record.flow_id == handed.outcome.flow_id
    assert [r.id for r in await rig.broker.handouts()] == [handed.record.id]
    again = await rig.broker.hand_out("fake", CI)
    assert not again.first
    # the ledger names the token by its hash prefix only: not even in the WAL
    for path in rig.root.glob("ledger.sqlite3*"):
        assert tokens.access.encode() not in path.read_bytes(), path.name


async def test_nothing_is_recorded_when_no_token_goes_out(rig: Rig) -> None:
    handed = await rig.broker.hand_out("fake", CI)
    assert handed.outcome.outcome is Outcome.NOT_CONNECTED
    assert not handed.handed_out
    await rig.connect()
    rig.clock.advance(3600)  # expired; the provider refuses the refresh
    rig.fake.fail_next(httpx.Response(400, json={"error": "invalid_grant"}))
    handed = await rig.broker.hand_out("fake", CI)
    assert handed.outcome.outcome is Outcome.REAUTHORIZE
    assert not handed.handed_out
    assert await rig.broker.handouts() == []


async def test_a_token_still_valid_is_handed_out_when_the_refresh_fails(rig: Rig) -> None:
    await rig.connect()
    rig.clock.advance(3600 - 30)  # inside the on-use margin, not expired
    rig.fake.fail_next(httpx.Response(503))
    handed = await rig.broker.hand_out("fake", OWNER)
    assert handed.outcome.outcome is Outcome.RETRY
    assert handed.handed_out


async def test_200_callers_at_expiry_one_refresh(rig: Rig) -> None:
    await rig.connect()
    rig.clock.advance(3600)
    before = rig.fake.grants("refresh_token")
    results = []

    async def one(i: int) -> None:
        results.append(await rig.broker.hand_out("fake", CI if i % 2 else OWNER))

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert rig.fake.grants("refresh_token") - before == 1
    assert all(h.handed_out for h in results)
    assert len({h.outcome.tokens.access for h in results if h.outcome.tokens}) == 1
    assert len(await rig.broker.handouts(limit=1000)) == 200
    assert sum(h.first for h in results) == 2  # one per identity


async def test_handouts_keep_to_retention(rig: Rig) -> None:
    await rig.connect()
    await rig.broker.hand_out("fake", CI)
    rig.broker.retention = Retention(days=1)
    rig.clock.advance(86_400 * 2)
    assert await rig.broker.handouts() == []  # past retention, even before a prune
