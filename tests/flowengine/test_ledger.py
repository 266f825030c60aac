"""The SQLite ledger on a real file: transitions, guards, secrets, schema and reads."""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowengine.errors import ConcurrentUpdateError, FlowNotFound, InvalidTransition, StorageError
from flowengine.ledger import _MIGRATIONS, SCHEMA_VERSION, SECRET_KEYS, Ledger, check_detail
from flowengine.models import Flow
from flowengine.protocol import hash_state
from flowengine.states import Condition, FlowState, FlowTrigger

from .helpers_flows import ALL_COMBOS, EXPECTED, combo_id, file_mode, path_to, replay, snapshot

pytestmark = pytest.mark.anyio

VERIFIER = "verifier-" + "v" * 50
_ids = itertools.count(1)


@pytest.fixture(name="db")
def _db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite3"


@pytest.fixture(name="ledger")
async def _ledger(db: Path) -> AsyncIterator[Ledger]:
    ledger = await Ledger.open(db)
    yield ledger
    await ledger.close()


async def new_flow(
    ledger: Ledger,
    *,
    provider: str = "dexcom",
    at: int = 1_000,
    verifier: str | None = VERIFIER,
    deadline: int | None = None,
) -> Flow:
    n = next(_ids)
    return await ledger.create(
        flow_id=f"flow{n:04d}",
        provider=provider,
        at=at,
        redirect_uri="https://broker.example.ts.net/oauth/callback",
        scopes=["offline_access", "egv"],
        actor="test",
        chat_id=42,
        state_hash=f"{n:064x}",
        code_verifier=verifier,
        deadline=deadline,
    )


async def drive(ledger: Ledger, flow: Flow, target: FlowState) -> Flow:
    at = flow.updated_at
    for trigger, condition in path_to(target):
        at += 10
        flow = await ledger.transition(flow.id, trigger, actor="test", at=at, condition=condition)
    assert flow.state is target
    return flow


# ------------------------------------------------------------------ the table, persisted


@pytest.fixture(name="anyio_backend", scope="module")
def _module_anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(name="shared", scope="module")
async def _shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Ledger, sqlite3.Connection]]:
    """One ledger for the 462 table cases, and an observer connection on the same file.

    The observer's ``PRAGMA data_version`` changes if and only if another connection
    committed something: a forbidden transition must leave it unchanged.
    """
    path = tmp_path_factory.mktemp("table") / "ledger.sqlite3"
    ledger = await Ledger.open(path)
    observer = sqlite3.connect(path)
    yield ledger, observer
    observer.close()
    await ledger.close()


def data_version(observer: sqlite3.Connection) -> int:
    return int(observer.execute("PRAGMA data_version").fetchone()[0])


def flow_rows(observer: sqlite3.Connection, flow_id: str) -> list[list[tuple[object, ...]]]:
    return [
        observer.execute(f"SELECT * FROM {table} WHERE {key} = ?", (flow_id,)).fetchall()
        for table, key in (
            ("flows", "id"),
            ("flow_events", "flow_id"),
            ("flow_secrets", "flow_id"),
            ("oauth_pending", "flow_id"),
        )
    ]


@pytest.mark.parametrize("combo", ALL_COMBOS, ids=combo_id)
async def test_every_transition_through_the_ledger(
    shared: tuple[Ledger, sqlite3.Connection],
    combo: tuple[FlowState, FlowTrigger, Condition | None],
) -> None:
    ledger, observer = shared
    state, trigger, condition = combo
    flow = await drive(ledger, await new_flow(ledger), state)
    expected = EXPECTED.get(combo)
    version = data_version(observer)
    rows = flow_rows(observer, flow.id)
    if expected is None:
        with pytest.raises(InvalidTransition) as info:
            await ledger.transition(
                flow.id, trigger, actor="test", at=flow.updated_at + 5, condition=condition
            )
        assert (info.value.state, info.value.trigger) == (state.value, trigger.value)
        assert info.value.flow_id == flow.id
        assert data_version(observer) == version, "a forbidden transition committed something"
        assert flow_rows(observer, flow.id) == rows
        assert await ledger.get(flow.id) == flow
    else:
        moved = await ledger.transition(
            flow.id,
            trigger,
            actor="test",
            at=flow.updated_at + 5,
            condition=condition,
            detail={"why": "table"},
        )
        assert data_version(observer) != version
        assert moved.state is expected
        assert moved.version == flow.version + 1
        assert moved.updated_at == flow.updated_at + 5
        events = await ledger.events(flow.id)
        last = events[-1]
        assert (last.seq, last.from_state, last.trigger, last.to_state) == (
            flow.version + 1,
            state,
            trigger,
            expected,
        )
        assert (last.actor, last.detail, last.at) == ("test", {"why": "table"}, moved.updated_at)
        assert replay(moved, events) is expected
        after = flow_rows(observer, flow.id)
        assert after[1][:-1] == rows[1], "earlier events were rewritten"
        assert after[2:] == rows[2:], "secrets or pending codes changed"


# --------------------------------------------------------------------------- creation


async def test_create_writes_the_flow_and_its_first_event(ledger: Ledger, db: Path) -> None:
    flow = await new_flow(ledger, at=5_000, deadline=65_000)
    assert flow.state is FlowState.INITIATED
    assert (flow.version, flow.created_at, flow.updated_at, flow.deadline) == (1, 5000, 5000, 65000)
    assert flow.scopes == ("offline_access", "egv")
    assert flow.uses_pkce is True
    assert (flow.chat_id, flow.actor, flow.provider) == (42, "test", "dexcom")
    events = await ledger.events(flow.id)
    assert len(events) == 1
    assert events[0].public() == {
        "seq": 1,
        "at": 5000,
        "from": None,
        "to": "initiated",
        "trigger": "create",
        "actor": "test",
        "detail": {},
    }
    assert await ledger.verifier(flow.id) == VERIFIER
    assert await ledger.by_state_hash(flow.state_hash) == flow
    snap = snapshot(db)
    assert snap["flow_secrets"] == [(flow.id, VERIFIER, None, None)]
    assert VERIFIER not in repr(snap["flows"]) + repr(snap["flow_events"])


async def test_create_without_pkce_stores_no_verifier(ledger: Ledger, db: Path) -> None:
    flow = await new_flow(ledger, verifier=None)
    assert flow.uses_pkce is False
    assert await ledger.verifier(flow.id) is None
    assert snapshot(db)["flow_secrets"] == []


async def test_create_refuses_secret_detail_and_writes_nothing(ledger: Ledger, db: Path) -> None:
    before = snapshot(db)
    with pytest.raises(ValueError, match="secrets"):
        await ledger.create(
            flow_id="x",
            provider="p",
            at=1,
            redirect_uri="https://h/cb",
            scopes=[],
            actor="test",
            chat_id=None,
            state_hash="h",
            code_verifier=None,
            deadline=None,
            detail={"code_verifier": "zzz"},
        )
    assert snapshot(db) == before


async def test_duplicate_state_hash_is_refused_atomically(ledger: Ledger, db: Path) -> None:
    flow = await new_flow(ledger)
    before = snapshot(db)
    with pytest.raises(sqlite3.IntegrityError):
        await ledger.create(
            flow_id="other",
            provider="p",
            at=1,
            redirect_uri="https://h/cb",
            scopes=[],
            actor="test",
            chat_id=None,
            state_hash=flow.state_hash,
            code_verifier=VERIFIER,
            deadline=None,
        )
    assert snapshot(db) == before


# ------------------------------------------------------------------------- transitions


async def test_transition_of_an_unknown_flow(ledger: Ledger, db: Path) -> None:
    before = snapshot(db)
    with pytest.raises(FlowNotFound) as info:
        await ledger.transition("nope", FlowTrigger.ISSUE_URL, actor="test", at=1)
    assert info.value.flow_id == "nope"
    assert snapshot(db) == before


async def test_stale_expected_version_writes_nothing(ledger: Ledger, db: Path) -> None:
    flow = await new_flow(ledger)
    before = snapshot(db)
    with pytest.raises(ConcurrentUpdateError) as info:
        await ledger.transition(
            flow.id, FlowTrigger.ISSUE_URL, actor="test", at=2_000, expected_version=7
        )
    assert (info.value.expected, info.value.actual) == (7, 1)
    assert snapshot(db) == before
    moved = await ledger.transition(
        flow.id, FlowTrigger.ISSUE_URL, actor="test", at=2_000, expected_version=1
    )
    assert moved.version == 2


SECRET_VALUE = "s3cr3t-value-never-echoed"


@pytest.mark.parametrize(
    "detail",
    [{key: SECRET_VALUE} for key in sorted(SECRET_KEYS)]
    + [
        {"Access_Token": SECRET_VALUE},
        {"ok": 1, "REFRESH_TOKEN": SECRET_VALUE},
        {"response": {"token_type": "Bearer", "access_token": SECRET_VALUE}},
        {"attempts": [{"n": 1}, {"n": 2, "code": SECRET_VALUE}]},
    ],
    ids=repr,
)
async def test_event_detail_refuses_secret_keys(
    ledger: Ledger, db: Path, detail: dict[str, object]
) -> None:
    flow = await new_flow(ledger)
    before = snapshot(db)
    with pytest.raises(ValueError, match="may not hold secrets") as info:
        await ledger.transition(flow.id, FlowTrigger.ISSUE_URL, actor="test", at=2, detail=detail)
    assert SECRET_VALUE not in str(info.value)
    assert snapshot(db) == before


def test_check_detail_serialises_stably() -> None:
    assert check_detail({"b": 1, "a": [1, "x"]}) == '{"a":[1,"x"],"b":1}'
    assert check_detail({}) == "{}"
    # keys that merely contain a secret's name are fine; so are secret-looking values
    assert check_detail({"token_type": "Bearer", "states": ["a"], "error": "code"})


async def test_updates_outside_the_allowed_columns_are_refused(ledger: Ledger, db: Path) -> None:
    flow = await new_flow(ledger)
    before = snapshot(db)
    for column in ("state", "version", "provider", "state_hash"):
        with pytest.raises(ValueError, match="cannot set"):
            await ledger.transition(
                flow.id, FlowTrigger.ISSUE_URL, actor="test", at=2, updates={column: "x"}
            )
    assert snapshot(db) == before


async def test_transition_updates_columns_and_drops_the_verifier(ledger: Ledger) -> None:
    flow = await drive(ledger, await new_flow(ledger, deadline=9), FlowState.CODE_RECEIVED)
    moved = await ledger.transition(
        flow.id,
        FlowTrigger.EXCHANGE_FAILED,
        actor="test",
        at=flow.updated_at + 1,
        updates={"deadline": None, "error_code": "invalid_grant", "error_description": "no"},
        drop_verifier=True,
    )
    assert (moved.deadline, moved.error_code, moved.error_description) == (
        None,
        "invalid_grant",
        "no",
    )
    assert await ledger.verifier(flow.id) is None


async def test_a_failing_statement_rolls_the_whole_transition_back(
    ledger: Ledger, db: Path
) -> None:
    a = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    b = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        a.id, FlowTrigger.RECEIVE_CODE, actor="test", at=3_000, pending_code=("st", "c1")
    )
    before = snapshot(db)
    # the oauth_pending insert fails (state is the primary key): the move is undone
    with pytest.raises(sqlite3.IntegrityError):
        await ledger.transition(
            b.id, FlowTrigger.RECEIVE_CODE, actor="test", at=3_000, pending_code=("st", "c2")
        )
    assert snapshot(db) == before
    assert (await ledger.get(b.id)) == b


# ------------------------------------------------------------------------ oauth_pending


async def test_a_code_is_handed_out_once_and_wiped(ledger: Ledger, db: Path) -> None:
    flow = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        flow.id,
        FlowTrigger.RECEIVE_CODE,
        actor="test",
        at=4_000,
        pending_code=("raw-state", "raw-code"),
    )
    assert await ledger.pending("raw-state") == (flow.id, True, 4000, None)
    assert await ledger.pending("other") is None
    assert await ledger.consume("raw-state", 4_500) == (flow.id, "raw-code", 4000)
    assert await ledger.consume("raw-state", 4_600) is None
    assert await ledger.pending("raw-state") == (flow.id, False, 4000, 4500)
    assert "raw-code" not in repr(snapshot(db))


async def test_wipe_pending_forgets_an_unconsumed_code(ledger: Ledger, db: Path) -> None:
    flow = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        flow.id, FlowTrigger.RECEIVE_CODE, actor="test", at=4_000, pending_code=("s1", "c-xyz")
    )
    await ledger.wipe_pending(flow.id, 4_100)
    assert await ledger.pending("s1") == (flow.id, False, 4000, 4100)
    assert await ledger.consume("s1", 4_200) is None
    assert "c-xyz" not in repr(snapshot(db))


async def test_ending_a_flow_wipes_its_unconsumed_code_in_the_same_transaction(
    ledger: Ledger, db: Path
) -> None:
    flow = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        flow.id, FlowTrigger.RECEIVE_CODE, actor="test", at=4_000, pending_code=("s2", "c-abc")
    )
    await ledger.transition(flow.id, FlowTrigger.EXPIRE, actor="test", at=4_300, drop_verifier=True)
    assert await ledger.pending("s2") == (flow.id, False, 4000, 4300)
    assert await ledger.consume("s2", 4_400) is None
    assert "c-abc" not in repr(snapshot(db))


# ------------------------------------------------------------------------------ reads


async def test_list_filters_and_orders_newest_first(ledger: Ledger) -> None:
    a = await new_flow(ledger, provider="dexcom", at=1)
    b = await new_flow(ledger, provider="oura", at=2)
    c = await drive(ledger, await new_flow(ledger, provider="dexcom", at=3), FlowState.STORED)
    d = await new_flow(ledger, provider="dexcom", at=3)  # same time as c: insertion order
    assert [f.id for f in await ledger.flows()] == [d.id, c.id, b.id, a.id]
    assert [f.id for f in await ledger.flows(provider="dexcom")] == [d.id, c.id, a.id]
    assert [f.id for f in await ledger.flows(states=[FlowState.STORED])] == [c.id]
    assert [f.id for f in await ledger.flows(provider="oura", states=[FlowState.INITIATED])] == [
        b.id
    ]
    assert [f.id for f in await ledger.flows(limit=2)] == [d.id, c.id]
    assert await ledger.flows(provider="withings") == []
    assert await ledger.counts() == {"initiated": 3, "stored": 1}


async def test_due_returns_overdue_flows_by_deadline(ledger: Ledger) -> None:
    late = await new_flow(ledger, deadline=500)
    later = await new_flow(ledger, deadline=800)
    await new_flow(ledger, deadline=5_000)
    await new_flow(ledger, deadline=None)
    assert [f.id for f in await ledger.due(1_000)] == [late.id, later.id]
    assert [f.id for f in await ledger.due(1_000, limit=1)] == [late.id]
    assert await ledger.due(499) == []


async def test_next_check_schedule(ledger: Ledger) -> None:
    a = await new_flow(ledger)
    b = await new_flow(ledger)
    assert await ledger.next_check_at(a.id) is None
    await ledger.set_next_check(a.id, 700)
    await ledger.set_next_check(b.id, 300)
    assert await ledger.next_check_at(a.id) == 700
    assert [f.id for f in await ledger.due_checks(1_000)] == [b.id, a.id]
    assert [f.id for f in await ledger.due_checks(500)] == [b.id]
    await ledger.set_next_check(b.id, None)
    assert [f.id for f in await ledger.due_checks(1_000)] == [a.id]
    # scheduling is not a transition: no event, same version
    assert (await ledger.get(a.id)) == a
    assert len(await ledger.events(a.id)) == 1


async def test_notifications_are_delivered_once(ledger: Ledger) -> None:
    first = await ledger.notify(
        at=1, kind="expired", provider="dexcom", reason="invalid_grant", data={"x": "reconnect"}
    )
    second = await ledger.notify(
        at=2, kind="refresh_failing", provider="oura", data={"attempts": 3}, flow_id="f", chat_id=5
    )
    pending = await ledger.undelivered()
    assert [(n.id, n.kind, n.provider, n.flow_id, n.chat_id) for n in pending] == [
        (first, "expired", "dexcom", None, None),
        (second, "refresh_failing", "oura", "f", 5),
    ]
    assert "reconnect" not in repr(pending[0])
    assert await ledger.mark_delivered(first, 10) is True
    assert await ledger.mark_delivered(first, 11) is False
    assert [n.id for n in await ledger.undelivered()] == [second]


# ---------------------------------------------------------------------- file and schema


async def test_file_is_private_and_in_wal_mode(ledger: Ledger, db: Path) -> None:
    await new_flow(ledger)
    assert file_mode(db) == 0o600
    assert file_mode(db.parent) == 0o700
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        if side.exists():
            assert file_mode(side) & 0o077 == 0, side
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


async def test_file_is_private_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        ledger = await Ledger.open(tmp_path / "lax" / "l.sqlite3")
    finally:
        os.umask(old)
    await ledger.close()
    assert file_mode(tmp_path / "lax" / "l.sqlite3") == 0o600


async def test_schema_version_is_recorded_once_and_reopening_keeps_data(db: Path) -> None:
    ledger = await Ledger.open(db)
    flow = await drive(ledger, await new_flow(ledger), FlowState.STORED)
    assert await ledger.schema_version() == SCHEMA_VERSION >= 1
    await ledger.close()

    again = await Ledger.open(db)
    try:
        assert await again.schema_version() == SCHEMA_VERSION
        assert await again.get(flow.id) == flow
        assert replay(flow, await again.events(flow.id)) is FlowState.STORED
        moved = await again.transition(flow.id, FlowTrigger.BEGIN_REFRESH, actor="test", at=9_999)
        assert moved.version == flow.version + 1
    finally:
        await again.close()
    rows = snapshot(db)["schema_migrations"]
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_a_newer_schema_is_refused(db: Path) -> None:
    ledger = await Ledger.open(db)
    await ledger.close()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'future')", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer") as info:
        await Ledger.open(db)
    assert info.value.path == str(db)


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StorageError) as info:
        await Ledger.open(junk)
    assert info.value.path == str(junk)
    assert junk.read_bytes() == b"this is not sqlite at all" * 100


async def test_an_unusable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError):
        await Ledger.open(blocker / "ledger.sqlite3")


# ------------------------------------------------------------------- secrets at rest


def wal_size(db: Path) -> int:
    return Path(f"{db}-wal").stat().st_size


def raw_bytes(db: Path) -> bytes:
    """The ledger's bytes on disk: the main file (free pages included) and its -wal file."""
    out = db.read_bytes()
    wal = Path(f"{db}-wal")
    if wal.exists():
        out += wal.read_bytes()
    return out


async def test_oauth_pending_keeps_only_the_state_hash(ledger: Ledger, db: Path) -> None:
    state, code = "state-" + "s" * 40, "code-" + "c" * 40
    flow = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        flow.id, FlowTrigger.RECEIVE_CODE, actor="test", at=4_000, pending_code=(state, code)
    )
    assert snapshot(db)["oauth_pending"] == [(hash_state(state), flow.id, code, 4000, None)]
    assert state.encode() not in raw_bytes(db)
    assert code.encode() in raw_bytes(db)  # the scan below can see a value that is there


@pytest.mark.parametrize("ending", ["consume", "drop_verifier", "wipe_pending"])
async def test_no_wiped_secret_survives_in_the_file_its_free_pages_or_the_wal(
    ledger: Ledger, db: Path, ending: str
) -> None:
    state, code = "state-" + "s" * 40, "code-" + "k" * 40
    flow = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        flow.id, FlowTrigger.RECEIVE_CODE, actor="test", at=4_000, pending_code=(state, code)
    )
    for secret in (code, VERIFIER):
        assert secret.encode() in raw_bytes(db), secret
    if ending == "consume":
        assert await ledger.consume(state, 4_100) == (flow.id, code, 4000)
        await ledger.transition(
            flow.id, FlowTrigger.EXCHANGE, actor="test", at=4_200, drop_verifier=True
        )
    elif ending == "drop_verifier":
        await ledger.transition(
            flow.id, FlowTrigger.EXPIRE, actor="test", at=4_200, drop_verifier=True
        )
    else:
        await ledger.wipe_pending(flow.id, 4_100)
        await ledger.transition(
            flow.id, FlowTrigger.EXCHANGE_FAILED, actor="test", at=4_200, drop_verifier=True
        )
    data = raw_bytes(db)
    for secret in (code, VERIFIER, state):
        assert secret.encode() not in data, secret
    assert wal_size(db) == 0  # truncated, not just checkpointed


async def test_a_checkpoint_blocked_by_a_reader_is_retried(ledger: Ledger, db: Path) -> None:
    code = "code-" + "r" * 40
    flow = await drive(ledger, await new_flow(ledger), FlowState.AWAITING_CODE)
    await ledger.transition(
        flow.id, FlowTrigger.RECEIVE_CODE, actor="test", at=4_000, pending_code=("st" * 9, code)
    )
    reader = sqlite3.connect(db, timeout=0)
    try:
        # another process in the middle of a read keeps the WAL from being truncated
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM flows").fetchone()
        ledger.checkpoint_timeout_ms = 50
        await ledger.transition(
            flow.id, FlowTrigger.EXCHANGE_FAILED, actor="test", at=4_100, drop_verifier=True
        )
        assert code.encode() in raw_bytes(db)
        reader.execute("COMMIT")
    finally:
        reader.close()
    # the next write (of any kind) finishes the job
    await ledger.set_next_check(flow.id, None)
    assert code.encode() not in raw_bytes(db)


async def test_close_retries_a_blocked_checkpoint(db: Path) -> None:
    ledger = await Ledger.open(db)
    flow = await drive(ledger, await new_flow(ledger), FlowState.CODE_RECEIVED)
    # another process's connection stays open throughout: closing ours is not the last close,
    # so SQLite's own checkpoint-on-close does not run
    other = sqlite3.connect(db, timeout=0)
    try:
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM flows").fetchone()
        ledger.checkpoint_timeout_ms = 50
        await ledger.transition(
            flow.id, FlowTrigger.EXCHANGE_FAILED, actor="test", at=9_000, drop_verifier=True
        )
        assert VERIFIER.encode() in raw_bytes(db)
        other.execute("COMMIT")  # idle now, but still open
        await ledger.close()
        assert VERIFIER.encode() not in raw_bytes(db)
    finally:
        other.close()


def _older_ledger(db: Path, migrations: int, *, secure_delete: bool = True) -> sqlite3.Connection:
    """A ledger file as a version with only the first ``migrations`` migrations left it."""
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    if not secure_delete:
        conn.execute("PRAGMA secure_delete = OFF")
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    for version, script in _MIGRATIONS[:migrations]:
        conn.executescript(script)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (version,))
    return conn


async def test_migration_3_hashes_the_states_of_an_older_ledger(db: Path) -> None:
    state = "old-raw-state-" + "o" * 30
    # secure_delete off: the worst case, a build without it
    conn = _older_ledger(db, 2, secure_delete=False)
    try:
        conn.execute(
            "INSERT INTO flows (id, provider, state, version, created_at, updated_at,"
            " redirect_uri, scopes, actor, state_hash, uses_pkce)"
            " VALUES ('f1', 'dexcom', 'code_received', 3, 1, 2, 'https://x/oauth/callback',"
            " '', 'test', ?, 1)",
            (hash_state(state),),
        )
        conn.execute("INSERT INTO oauth_pending VALUES (?, 'f1', 'the-code', 2, NULL)", (state,))
    finally:
        conn.close()
    assert state.encode() in raw_bytes(db)

    ledger = await Ledger.open(db)
    try:
        assert await ledger.schema_version() == SCHEMA_VERSION >= 3
        assert await ledger.pending(state) == ("f1", True, 2, None)
        assert await ledger.consume(state, 5) == ("f1", "the-code", 2)
    finally:
        await ledger.close()
    assert snapshot(db)["oauth_pending"] == [(hash_state(state), "f1", None, 2, 5)]
    assert state.encode() not in raw_bytes(db)
    assert b"the-code" not in raw_bytes(db)


# ------------------------------------------------------------- the device grant (RFC 8628)

DEVICE_CODE = "device-" + "q" * 40
USER_CODE = "WDJB-MJHT"


async def device_flow(ledger: Ledger) -> Flow:
    n = next(_ids)
    flow = await ledger.create(
        flow_id=f"flow{n:04d}",
        provider="dexcom",
        at=1_000,
        redirect_uri="",
        scopes=["offline_access"],
        actor="test",
        chat_id=None,
        state_hash=f"{n:064x}",
        code_verifier=None,
        deadline=None,
        grant="device",
    )
    return await ledger.transition(
        flow.id,
        FlowTrigger.ISSUE_DEVICE_CODE,
        actor="test",
        at=2_000,
        device_secrets=(DEVICE_CODE, USER_CODE),
    )


async def test_the_device_code_is_kept_with_the_other_secrets(ledger: Ledger, db: Path) -> None:
    flow = await device_flow(ledger)
    assert (flow.state, flow.grant, flow.uses_pkce) == (FlowState.AWAITING_DEVICE, "device", False)
    assert flow.public()["grant"] == "device"
    assert await ledger.device_secrets(flow.id) == (DEVICE_CODE, USER_CODE)
    assert snapshot(db)["flow_secrets"] == [(flow.id, None, DEVICE_CODE, USER_CODE)]
    text = repr(snapshot(db)["flows"]) + repr(snapshot(db)["flow_events"])
    assert DEVICE_CODE not in text
    assert USER_CODE not in text
    # a slow_down stays where it is and keeps the secrets
    slowed = await ledger.transition(
        flow.id, FlowTrigger.SLOW_DOWN, actor="test", at=3_000, detail={"interval": 10}
    )
    assert slowed.state is FlowState.AWAITING_DEVICE
    assert await ledger.device_secrets(flow.id) == (DEVICE_CODE, USER_CODE)
    code_flow = await new_flow(ledger)
    assert code_flow.grant == "code"
    assert await ledger.device_secrets(code_flow.id) is None


@pytest.mark.parametrize(
    "trigger", [FlowTrigger.EXCHANGE, FlowTrigger.DENY, FlowTrigger.EXPIRE, FlowTrigger.CANCEL]
)
async def test_no_device_code_survives_the_end_of_its_flow(
    ledger: Ledger, db: Path, trigger: FlowTrigger
) -> None:
    flow = await device_flow(ledger)
    for secret in (DEVICE_CODE, USER_CODE):
        assert secret.encode() in raw_bytes(db), secret
    await ledger.transition(flow.id, trigger, actor="test", at=4_000, drop_verifier=True)
    assert await ledger.device_secrets(flow.id) is None
    data = raw_bytes(db)
    for secret in (DEVICE_CODE, USER_CODE):
        assert secret.encode() not in data, secret
    assert wal_size(db) == 0


@pytest.mark.parametrize("key", ["device_code", "user_code", "verification_uri_complete"])
def test_event_detail_refuses_the_device_secrets(key: str) -> None:
    with pytest.raises(ValueError, match="secrets"):
        check_detail({"poll": {key: "x"}})


async def test_unknown_grant_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="grant"):
        await ledger.create(
            flow_id="g",
            provider="dexcom",
            at=1,
            redirect_uri="",
            scopes=[],
            actor="test",
            chat_id=None,
            state_hash="0" * 64,
            code_verifier=None,
            deadline=None,
            grant="implicit",
        )


async def test_migration_6_keeps_older_flows_as_code_flows(db: Path) -> None:
    conn = _older_ledger(db, 5)
    try:
        conn.execute(
            "INSERT INTO flows (id, provider, state, version, created_at, updated_at,"
            " redirect_uri, scopes, actor, state_hash, uses_pkce)"
            " VALUES ('f4', 'dexcom', 'awaiting_code', 2, 1, 2, 'https://x/oauth/callback',"
            " '', 'test', ?, 1)",
            ("4" * 64,),
        )
        conn.execute("INSERT INTO flow_secrets VALUES ('f4', ?)", (VERIFIER,))
    finally:
        conn.close()
    ledger = await Ledger.open(db)
    try:
        flow = await ledger.get("f4")
        assert flow is not None
        assert flow.grant == "code"
        assert await ledger.verifier("f4") == VERIFIER
        assert await ledger.device_secrets("f4") is None
        assert await ledger.schema_version() == SCHEMA_VERSION == 7
    finally:
        await ledger.close()


async def test_migration_7_keeps_the_text_of_older_notifications(db: Path) -> None:
    """Rows queued by a version without notification data keep their text; new rows carry
    data and no text (the bot words them)."""
    conn = _older_ledger(db, 6)
    try:
        conn.execute(
            "INSERT INTO notifications (at, kind, provider, message, reason)"
            " VALUES (1, 'reconnect_soon', 'spotify', 'Spotify needs reconnecting by then', NULL)"
        )
    finally:
        conn.close()
    ledger = await Ledger.open(db)
    try:
        assert await ledger.schema_version() == SCHEMA_VERSION == 7
        await ledger.notify(at=2, kind="refresh_failing", provider="oura", data={"attempts": 3})
        with pytest.raises(ValueError, match="token"):
            await ledger.notify(at=3, kind="expired", provider="oura", data={"token": "x"})
        old, new = await ledger.undelivered()
        assert (old.kind, old.data, old.message) == (
            "reconnect_soon",
            {},
            "Spotify needs reconnecting by then",
        )
        assert (new.kind, new.data, new.message) == ("refresh_failing", {"attempts": 3}, "")
    finally:
        await ledger.close()
