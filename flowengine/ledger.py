"""The flow ledger: one SQLite file, the only SQL for flows.

Tables (schema version in ``schema_migrations``):

``flows``          one row per authorization; no tokens, the OAuth state only as a hash
``flow_events``    append-only, one row per transition (flow_id, seq) with actor and detail
``flow_secrets``   the PKCE verifier, or the device code and user code of the device grant
                   (RFC 8628), while a flow needs them; deleted at the exchange or end
``oauth_pending``  the callback's code, keyed by the SHA-256 of the OAuth state (the raw
                   state is never stored); the code is wiped when it is handed out
``notifications``  connection events for the owner (expired, refresh failing, an identity's
                   first token hand-out) as a kind, a reason code and data (JSON), read by
                   the bot, possibly from another process, which words them
``token_handouts`` the audit of access tokens handed to other machines (audit.py): who,
                   node, address, provider, an 8-hex SHA-256 prefix of the token; pruned
``token_recipients`` (identity, provider) pairs that have had a token: first hand-outs

Every transition is one ``BEGIN IMMEDIATE`` transaction: read the row, ask the machine,
update it conditionally on its version, append the event, commit. Two writers (tasks,
connections or processes) racing on one flow serialise on SQLite's write lock; the
second sees the first one's result and gets InvalidTransition or ConcurrentUpdateError
and writes nothing.

Secrets at rest. A flow's verifier and code (or its device code) live here while the flow
needs them: they are written in the same transaction as the transition they belong to (the
code with ``receive_code``, the device code with ``issue_device_code``), which is what
makes a crash leave nothing half-done, so they share the ledger's write-ahead log. Keeping
them out of the WAL would mean a second database file outside those transactions (and its
rollback journal would hold the same pages), so the ledger scrubs instead:
``secure_delete`` zeroes wiped values in the main file and its free pages, and every
transaction that wipes one (the code handed out, a verifier or a device code dropped) is
followed by ``PRAGMA wal_checkpoint(TRUNCATE)``, which copies the zeroed pages into the main
file and empties the ``-wal`` file. When another connection keeps the checkpoint from
finishing, it is retried after the next write and at close.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

import aiosqlite
import anyio

from .audit import FIRST_HANDOUT, HandOutRecord, Retention
from .errors import ConcurrentUpdateError, FlowNotFound, StorageError
from .machine import FlowMachine
from .models import Flow, FlowEvent
from .protocol import hash_state
from .states import Condition, FlowState, FlowTrigger

__all__ = ["GRANTS", "Ledger", "Notification", "SECRET_KEYS"]

log = logging.getLogger("flowengine.ledger")

#: keys refused in event detail: the ledger never holds these
SECRET_KEYS = frozenset(
    {
        "code",
        "code_verifier",
        "verifier",
        "device_code",
        "user_code",
        "verification_uri_complete",
        "state",
        "access",
        "access_token",
        "refresh",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "secret",
        "password",
    }
)

#: the grants a flow can use: the authorization code (RFC 6749 §4.1), the device grant (RFC 8628)
GRANTS = ("code", "device")

#: columns a transition may change besides state/version/updated_at
_UPDATABLE = frozenset(
    {"deadline", "token_expires_at", "next_check_at", "error_code", "error_description"}
)

_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE flows (
            id                TEXT PRIMARY KEY,
            provider          TEXT NOT NULL,
            state             TEXT NOT NULL,
            version           INTEGER NOT NULL,
            created_at        INTEGER NOT NULL,
            updated_at        INTEGER NOT NULL,
            redirect_uri      TEXT NOT NULL,
            scopes            TEXT NOT NULL,
            actor             TEXT NOT NULL,
            chat_id           INTEGER,
            state_hash        TEXT NOT NULL UNIQUE,
            uses_pkce         INTEGER NOT NULL,
            deadline          INTEGER,
            token_expires_at  INTEGER,
            next_check_at     INTEGER,
            error_code        TEXT,
            error_description TEXT
        );
        CREATE INDEX flows_provider_created ON flows(provider, created_at);
        CREATE INDEX flows_state_updated ON flows(state, updated_at);
        CREATE INDEX flows_deadline ON flows(deadline) WHERE deadline IS NOT NULL;
        CREATE INDEX flows_next_check ON flows(next_check_at) WHERE next_check_at IS NOT NULL;
        CREATE TABLE flow_events (
            flow_id    TEXT NOT NULL REFERENCES flows(id),
            seq        INTEGER NOT NULL,
            at         INTEGER NOT NULL,
            from_state TEXT,
            to_state   TEXT NOT NULL,
            trigger    TEXT,
            actor      TEXT NOT NULL,
            detail     TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (flow_id, seq)
        ) WITHOUT ROWID;
        CREATE TABLE flow_secrets (
            flow_id       TEXT PRIMARY KEY REFERENCES flows(id),
            code_verifier TEXT
        );
        CREATE TABLE oauth_pending (
            state       TEXT PRIMARY KEY,
            flow_id     TEXT NOT NULL UNIQUE REFERENCES flows(id),
            code        TEXT,
            received_at INTEGER NOT NULL,
            consumed_at INTEGER
        );
        CREATE TABLE notifications (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            at           INTEGER NOT NULL,
            kind         TEXT NOT NULL,
            provider     TEXT NOT NULL,
            flow_id      TEXT,
            chat_id      INTEGER,
            message      TEXT NOT NULL,
            delivered_at INTEGER
        );
        CREATE INDEX notifications_undelivered ON notifications(id) WHERE delivered_at IS NULL;
        """,
    ),
    (
        2,
        """
        CREATE INDEX flows_created ON flows(created_at);
        """,
    ),
    (
        3,
        # oauth_pending held the raw OAuth state: key it by the flow's state hash instead
        """
        CREATE TABLE oauth_pending_v3 (
            state_hash  TEXT PRIMARY KEY,
            flow_id     TEXT NOT NULL UNIQUE REFERENCES flows(id),
            code        TEXT,
            received_at INTEGER NOT NULL,
            consumed_at INTEGER
        );
        INSERT INTO oauth_pending_v3
            SELECT f.state_hash, p.flow_id, p.code, p.received_at, p.consumed_at
            FROM oauth_pending p JOIN flows f ON f.id = p.flow_id;
        DROP TABLE oauth_pending;
        ALTER TABLE oauth_pending_v3 RENAME TO oauth_pending;
        """,
    ),
    (
        4,
        # notifications say why as a code (e.g. "answer_lost"); the bot and CLI word it
        """
        ALTER TABLE notifications ADD COLUMN reason TEXT;
        """,
    ),
    (
        5,
        # remote token hand-outs (audit.py): the audit, and who has had which provider
        """
        CREATE TABLE token_handouts (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            at        INTEGER NOT NULL,
            who       TEXT NOT NULL,
            node      TEXT NOT NULL,
            provider  TEXT NOT NULL,
            token_sha TEXT NOT NULL,
            address   TEXT NOT NULL,
            flow_id   TEXT
        );
        CREATE INDEX token_handouts_at ON token_handouts(at);
        CREATE INDEX token_handouts_provider ON token_handouts(provider, id);
        CREATE TABLE token_recipients (
            who      TEXT NOT NULL,
            provider TEXT NOT NULL,
            first_at INTEGER NOT NULL,
            PRIMARY KEY (who, provider)
        ) WITHOUT ROWID;
        """,
    ),
    (
        6,
        # the device authorization grant (RFC 8628): which grant a flow uses, and its
        # device code and user code kept with the other secrets while it polls
        """
        ALTER TABLE flows ADD COLUMN grant_type TEXT NOT NULL DEFAULT 'code';
        ALTER TABLE flow_secrets ADD COLUMN device_code TEXT;
        ALTER TABLE flow_secrets ADD COLUMN user_code TEXT;
        """,
    ),
    (
        7,
        # notifications carry data (JSON) for the bot to word; ``message`` stays for rows an
        # older version wrote (new rows leave it empty)
        """
        ALTER TABLE notifications ADD COLUMN data TEXT NOT NULL DEFAULT '{}';
        """,
    ),
)

SCHEMA_VERSION = _MIGRATIONS[-1][0]

_FLOW_COLUMNS = (
    "id, provider, state, version, created_at, updated_at, redirect_uri, scopes, actor,"
    " chat_id, state_hash, uses_pkce, deadline, token_expires_at, error_code,"
    " error_description, grant_type"
)


class NoteFields(TypedDict, total=False):
    """What a queued notification says: a kind, a provider, a reason code and data, no text."""

    kind: Required[str]
    provider: Required[str]
    flow_id: str | None
    chat_id: int | None
    reason: str | None
    data: Mapping[str, Any] | None


def _flow_from_row(row: Sequence[Any]) -> Flow:
    return Flow(
        id=row[0],
        provider=row[1],
        state=FlowState(row[2]),
        version=row[3],
        created_at=row[4],
        updated_at=row[5],
        redirect_uri=row[6],
        scopes=tuple(row[7].split()) if row[7] else (),
        actor=row[8],
        chat_id=row[9],
        state_hash=row[10],
        uses_pkce=bool(row[11]),
        deadline=row[12],
        token_expires_at=row[13],
        error_code=row[14],
        error_description=row[15],
        grant=row[16],
    )


def _event_from_row(row: Sequence[Any]) -> FlowEvent:
    return FlowEvent(
        flow_id=row[0],
        seq=row[1],
        at=row[2],
        from_state=FlowState(row[3]) if row[3] else None,
        to_state=FlowState(row[4]),
        trigger=FlowTrigger(row[5]) if row[5] else None,
        actor=row[6],
        detail=json.loads(row[7]),
    )


def _create_private(file: Path) -> None:
    """Create the ledger file (and its directory) readable by the owner only."""
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(file, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def _keys_where(value: Any, named: Callable[[str, Any], bool]) -> set[str]:
    """Keys anywhere in ``value`` (nested mappings and lists included) for which
    ``named(key, item)`` holds."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            if named(str(key), item):
                found.add(str(key))
            found |= _keys_where(item, named)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= _keys_where(item, named)
    return found


def _secret_keys(value: Any) -> set[str]:
    """Keys naming a secret anywhere in ``value``."""
    return _keys_where(value, lambda key, _: key.lower() in SECRET_KEYS)


#: a ``*_sha`` detail value: a short hash prefix of a token, never more
_SHA_MAX = 12


def _long_hash(key: str, item: Any) -> bool:
    """A ``*_sha`` entry whose value is not a short lower-case hex prefix."""
    if not key.lower().endswith("_sha") or item is None:
        return False
    text = item if isinstance(item, str) else ""
    return not (0 < len(text) <= _SHA_MAX and all(c in "0123456789abcdef" for c in text))


def _long_hashes(value: Any) -> set[str]:
    """``*_sha`` keys anywhere in ``value`` whose value is not a short hex prefix."""
    return _keys_where(value, _long_hash)


def _json_object(text: str | None) -> dict[str, Any]:
    """A stored JSON object (``{}`` for anything else)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def check_detail(detail: Mapping[str, Any]) -> str:
    """Serialise event detail, refusing any key, at any depth, that names a secret.

    Token lineage is recorded as ``*_sha`` keys, which must hold a hash prefix of at most
    12 hex digits (a whole token or a long hash under such a key is refused too).
    """
    bad = sorted(_secret_keys(detail) | _long_hashes(detail))
    if bad:
        raise ValueError(f"event detail may not hold secrets: {', '.join(bad)}")
    return json.dumps(dict(detail), sort_keys=True, separators=(",", ":"))


class _Wipes:
    """Set by a transaction body that wiped a secret (a code or a verifier)."""

    __slots__ = ("wiped",)

    def __init__(self) -> None:
        self.wiped = False


@dataclass(frozen=True, slots=True)
class Notification:
    """A connection event for the owner (read by the bot, marked delivered once sent).

    No sentence: the bot words it from ``kind``, ``reason`` and ``data``.
    """

    id: int
    at: int
    kind: str
    provider: str
    flow_id: str | None
    chat_id: int | None
    #: why, as a code the bot and CLI word (e.g. "invalid_grant", "answer_lost")
    reason: str | None = None
    #: what the wording needs (a deadline, a count, who got a token); never a secret
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: the text an older version wrote instead of data ("" for new rows)
    message: str = field(default="", repr=False)


class Ledger:
    """Async access to the ledger file. One connection per process; writes serialised."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, machine: FlowMachine) -> None:
        self._conn = conn
        self.path = path
        self._machine = machine
        self._lock = anyio.Lock()
        #: a wiped secret may still be in the -wal file: checkpoint when possible
        self._scrub_due = False
        self.busy_timeout_ms = 10_000
        #: hand-outs recorded since the audit was last pruned, and when that was (ms)
        self._handouts_since_prune = 0
        self._pruned_at: int | None = None
        #: how long a scrubbing checkpoint waits for other connections' readers before it
        #: gives up for now (it is retried); shorter than the write timeout, so a wipe never
        #: stalls a command for long
        self.checkpoint_timeout_ms = 2_000

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000) -> Ledger:
        """Open (creating and migrating if needed) the ledger at ``path``, mode 0600."""
        file = Path(path)
        try:
            await anyio.to_thread.run_sync(_create_private, file)
            conn = await aiosqlite.connect(file, isolation_level=None)
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot open the ledger: {err}", path=str(file)) from err
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            # wiped codes and dropped verifiers are zeroed on disk, not left in free space
            # (Debian's SQLite defaults to this; other builds do not)
            await conn.execute("PRAGMA secure_delete = ON")
            ledger = cls(conn, file, FlowMachine())
            ledger.busy_timeout_ms = int(busy_timeout_ms)
            if await ledger._migrate():
                await ledger._scrub()  # a migration may have dropped secrets (raw states)
        except sqlite3.Error as err:
            await conn.close()
            raise StorageError(f"cannot prepare the ledger: {err}", path=str(file)) from err
        except BaseException:
            # e.g. a newer schema: an unclosed connection's thread would block interpreter exit
            await conn.close()
            raise
        return ledger

    async def close(self) -> None:
        try:
            if self._scrub_due:
                with anyio.CancelScope(shield=True):
                    await self._scrub()
        finally:
            await self._conn.close()

    async def _scrub(self) -> bool:
        """Empty the WAL after a secret was wiped (see the module docstring); True if done."""
        try:
            await self._conn.execute(
                f"PRAGMA busy_timeout = {min(self.checkpoint_timeout_ms, self.busy_timeout_ms)}"
            )
            try:
                async with self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    row = await cur.fetchone()
            finally:
                await self._conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        except sqlite3.Error as err:  # the write before it committed: retry later
            log.warning("ledger checkpoint failed (%s); retrying later", type(err).__name__)
            self._scrub_due = True
            return False
        self._scrub_due = bool(row and row[0])  # 1 = another connection kept it from finishing
        return not self._scrub_due

    async def _after_wipe(self, wiped: bool) -> None:
        """Called with the lock held, outside a transaction, after every write."""
        if wiped or self._scrub_due:
            await self._scrub()

    async def scrub(self) -> bool:
        """Checkpoint and truncate the WAL now; False if another connection prevented it."""
        async with self._lock:
            return await self._scrub()

    async def _migrate(self) -> bool:
        """Apply missing migrations; True if any ran."""
        applied = False
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                await self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations"
                    " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                async with self._conn.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
                ) as cur:
                    row = await cur.fetchone()
                current = int(row[0]) if row else 0
                if current > SCHEMA_VERSION:
                    raise StorageError(
                        f"ledger schema version {current} is newer than this program"
                        f" ({SCHEMA_VERSION}); upgrade agentd-oauth",
                        path=str(self.path),
                    )
                for version, script in _MIGRATIONS:
                    if version <= current:
                        continue
                    for statement in script.split(";"):
                        if statement.strip():
                            await self._conn.execute(statement)
                    await self._conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, datetime('now'))", (version,)
                    )
                    applied = True
                await self._conn.execute("COMMIT")
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
        return applied

    async def schema_version(self) -> int:
        async with self._conn.execute("SELECT MAX(version) FROM schema_migrations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # --------------------------------------------------------------- transactions

    async def _begin(self) -> None:
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise StorageError(f"ledger is busy: {err}", path=str(self.path)) from err

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Wipes]:
        """One ``BEGIN IMMEDIATE`` transaction, serialised in-process by the lock.

        Shielded from cancellation: a transition that has begun commits (or rolls back)
        even when its caller is cancelled, e.g. by a shutdown signal. The body notes in
        the yielded object whether it wiped a secret; the WAL is then scrubbed after the
        commit.
        """
        async with self._lock:
            with anyio.CancelScope(shield=True):
                await self._begin()
                wipes = _Wipes()
                try:
                    yield wipes
                    await self._conn.execute("COMMIT")
                except BaseException as err:
                    # a failed COMMIT (disk full) may have rolled back already
                    with suppress(sqlite3.Error):
                        await self._conn.execute("ROLLBACK")
                    if isinstance(err, sqlite3.OperationalError):  # disk full, I/O error
                        raise StorageError(
                            f"the ledger could not be written: {err}", path=str(self.path)
                        ) from err
                    raise
                await self._after_wipe(wipes.wiped)

    async def _fetch_flow(self, where: str, args: Sequence[Any]) -> Flow | None:
        async with self._conn.execute(
            f"SELECT {_FLOW_COLUMNS} FROM flows WHERE {where}", args
        ) as cur:
            row = await cur.fetchone()
        return _flow_from_row(row) if row else None

    async def create(
        self,
        *,
        flow_id: str,
        provider: str,
        at: int,
        redirect_uri: str,
        scopes: Sequence[str],
        actor: str,
        chat_id: int | None,
        state_hash: str,
        code_verifier: str | None,
        deadline: int | None,
        detail: Mapping[str, Any] | None = None,
        grant: str = "code",
    ) -> Flow:
        """Insert a new flow in ``initiated`` with its creating event (seq 1).

        ``grant``: "code" (authorization code, RFC 6749 §4.1) or "device" (RFC 8628).
        """
        if grant not in GRANTS:
            raise ValueError(f"grant must be one of {GRANTS}, not {grant!r}")
        detail_json = check_detail(detail or {})
        async with self._transaction():
            await self._conn.execute(
                "INSERT INTO flows (id, provider, state, version, created_at, updated_at,"
                " redirect_uri, scopes, actor, chat_id, state_hash, uses_pkce, deadline,"
                " grant_type)"
                " VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    flow_id,
                    provider,
                    FlowState.INITIATED.value,
                    at,
                    at,
                    redirect_uri,
                    " ".join(scopes),
                    actor,
                    chat_id,
                    state_hash,
                    int(code_verifier is not None),
                    deadline,
                    grant,
                ),
            )
            await self._conn.execute(
                "INSERT INTO flow_events VALUES (?, 1, ?, NULL, ?, NULL, ?, ?)",
                (flow_id, at, FlowState.INITIATED.value, actor, detail_json),
            )
            if code_verifier is not None:
                await self._conn.execute(
                    "INSERT INTO flow_secrets (flow_id, code_verifier) VALUES (?, ?)",
                    (flow_id, code_verifier),
                )
        flow = await self.get(flow_id)
        assert flow is not None
        return flow

    async def transition(
        self,
        flow_id: str,
        trigger: FlowTrigger,
        *,
        actor: str,
        at: int,
        condition: Condition | None = None,
        expected_version: int | None = None,
        updates: Mapping[str, Any] | None = None,
        detail: Mapping[str, Any] | None = None,
        pending_code: tuple[str, str] | None = None,
        device_secrets: tuple[str, str] | None = None,
        drop_verifier: bool = False,
    ) -> Flow:
        """Apply ``trigger`` to one flow in one transaction and return the new row.

        ``pending_code`` = (oauth state, code) also records the callback in
        ``oauth_pending`` (under the state's hash) in the same transaction;
        ``device_secrets`` = (device code, user code) keeps them in ``flow_secrets``.
        ``drop_verifier`` deletes every secret of the flow (verifier, device code, an
        unconsumed code). Raises FlowNotFound, InvalidTransition or ConcurrentUpdateError,
        having written nothing.
        """
        detail_json = check_detail(detail or {})
        changes = dict(updates or {})
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"a transition cannot set {sorted(unknown)}")
        async with self._transaction() as wipes:
            flow = await self._fetch_flow("id = ?", (flow_id,))
            if flow is None:
                raise FlowNotFound(f"no flow {flow_id}", flow_id=flow_id)
            if expected_version is not None and flow.version != expected_version:
                raise ConcurrentUpdateError(
                    flow_id=flow_id, expected=expected_version, actual=flow.version
                )
            dest = self._machine.fire(flow.state, trigger, condition=condition, flow_id=flow_id)
            assignments = ["state = ?", "version = version + 1", "updated_at = ?"]
            args: list[Any] = [dest.value, at]
            for column, value in sorted(changes.items()):
                assignments.append(f"{column} = ?")
                args.append(value)
            args += [flow_id, flow.version]
            cur = await self._conn.execute(
                f"UPDATE flows SET {', '.join(assignments)} WHERE id = ? AND version = ?",
                args,
            )
            if cur.rowcount != 1:  # pragma: no cover - guarded by the write lock
                raise ConcurrentUpdateError(flow_id=flow_id, expected=flow.version, actual=-1)
            await self._conn.execute(
                "INSERT INTO flow_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    flow_id,
                    flow.version + 1,
                    at,
                    flow.state.value,
                    dest.value,
                    trigger.value,
                    actor,
                    detail_json,
                ),
            )
            if pending_code is not None:
                await self._conn.execute(
                    "INSERT INTO oauth_pending (state_hash, flow_id, code, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    (hash_state(pending_code[0]), flow_id, pending_code[1], at),
                )
            if device_secrets is not None:
                await self._conn.execute(
                    "INSERT INTO flow_secrets (flow_id, device_code, user_code) VALUES (?, ?, ?)"
                    " ON CONFLICT(flow_id) DO UPDATE SET device_code = excluded.device_code,"
                    " user_code = excluded.user_code",
                    (flow_id, device_secrets[0], device_secrets[1]),
                )
            if drop_verifier:
                # the flow can no longer exchange: its verifier (or device code) and any
                # unconsumed code go
                cur = await self._conn.execute(
                    "DELETE FROM flow_secrets WHERE flow_id = ?", (flow_id,)
                )
                wipes.wiped = cur.rowcount > 0
                cur = await self._conn.execute(
                    "UPDATE oauth_pending SET code = NULL, consumed_at = COALESCE(consumed_at, ?)"
                    " WHERE flow_id = ? AND code IS NOT NULL",
                    (at, flow_id),
                )
                wipes.wiped = wipes.wiped or cur.rowcount > 0
        new = await self.get(flow_id)
        assert new is not None
        return new

    async def set_next_check(self, flow_id: str, at: int | None) -> None:
        """Schedule the timer's next look at a connection (not a transition: no event)."""
        async with self._lock:
            await self._conn.execute(
                "UPDATE flows SET next_check_at = ? WHERE id = ?", (at, flow_id)
            )
            await self._after_wipe(False)

    # --------------------------------------------------------------------- reads

    async def get(self, flow_id: str) -> Flow | None:
        async with self._lock:
            return await self._fetch_flow("id = ?", (flow_id,))

    async def by_state_hash(self, state_hash: str) -> Flow | None:
        async with self._lock:
            return await self._fetch_flow("state_hash = ?", (state_hash,))

    async def events(self, flow_id: str) -> list[FlowEvent]:
        async with (
            self._lock,
            self._conn.execute(
                "SELECT flow_id, seq, at, from_state, to_state, trigger, actor, detail"
                " FROM flow_events WHERE flow_id = ? ORDER BY seq",
                (flow_id,),
            ) as cur,
        ):
            rows = await cur.fetchall()
        return [_event_from_row(r) for r in rows]

    async def flows(
        self,
        *,
        provider: str | None = None,
        states: Sequence[FlowState] | None = None,
        limit: int = 50,
    ) -> list[Flow]:
        """Newest first."""
        where: list[str] = []
        args: list[Any] = []
        if provider:
            where.append("provider = ?")
            args.append(provider)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args += [s.value for s in states]
        return await self._select_flows(
            " AND ".join(where), args, order="created_at DESC, rowid DESC", limit=limit
        )

    async def due(self, now_ms: int, *, limit: int = 500) -> list[Flow]:
        """Pending flows whose deadline has passed (uses the partial deadline index)."""
        return await self._select_flows(
            "deadline IS NOT NULL AND deadline <= ?", [now_ms], order="deadline", limit=limit
        )

    async def due_checks(self, now_ms: int, *, limit: int = 500) -> list[Flow]:
        """Connections whose next timer check is due (uses the partial next_check index)."""
        return await self._select_flows(
            "next_check_at IS NOT NULL AND next_check_at <= ?",
            [now_ms],
            order="next_check_at",
            limit=limit,
        )

    async def _select_flows(
        self, where: str, args: Sequence[Any], *, order: str, limit: int
    ) -> list[Flow]:
        sql = f"SELECT {_FLOW_COLUMNS} FROM flows"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {order} LIMIT ?"
        async with self._lock, self._conn.execute(sql, [*args, int(limit)]) as cur:
            rows = await cur.fetchall()
        return [_flow_from_row(r) for r in rows]

    async def next_check_at(self, flow_id: str) -> int | None:
        async with (
            self._lock,
            self._conn.execute("SELECT next_check_at FROM flows WHERE id = ?", (flow_id,)) as cur,
        ):
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def verifier(self, flow_id: str) -> str | None:
        async with (
            self._lock,
            self._conn.execute(
                "SELECT code_verifier FROM flow_secrets WHERE flow_id = ?", (flow_id,)
            ) as cur,
        ):
            row = await cur.fetchone()
        return row[0] if row else None

    async def device_secrets(self, flow_id: str) -> tuple[str, str] | None:
        """(device code, user code) of a device flow still polling, else None."""
        async with (
            self._lock,
            self._conn.execute(
                "SELECT device_code, user_code FROM flow_secrets"
                " WHERE flow_id = ? AND device_code IS NOT NULL",
                (flow_id,),
            ) as cur,
        ):
            row = await cur.fetchone()
        return (str(row[0]), str(row[1] or "")) if row else None

    # -------------------------------------------------------------- oauth_pending

    async def pending(self, state: str) -> tuple[str, bool, int, int | None] | None:
        """(flow_id, has_code, received_at, consumed_at) for a callback state, or None."""
        async with (
            self._lock,
            self._conn.execute(
                "SELECT flow_id, code IS NOT NULL, received_at, consumed_at"
                " FROM oauth_pending WHERE state_hash = ?",
                (hash_state(state),),
            ) as cur,
        ):
            row = await cur.fetchone()
        if row is None:
            return None
        return row[0], bool(row[1]), int(row[2]), row[3]

    async def consume(self, state: str, at: int) -> tuple[str, str, int] | None:
        """Hand out the code once: (flow_id, code, received_at); wipes it from the table."""
        state_hash = hash_state(state)
        async with self._transaction() as wipes:
            # RETURNING would give the wiped value: read first, then wipe
            async with self._conn.execute(
                "SELECT flow_id, code, received_at FROM oauth_pending"
                " WHERE state_hash = ? AND consumed_at IS NULL AND code IS NOT NULL",
                (state_hash,),
            ) as cur:
                row = await cur.fetchone()
            if row is not None:
                await self._conn.execute(
                    "UPDATE oauth_pending SET consumed_at = ?, code = NULL WHERE state_hash = ?",
                    (at, state_hash),
                )
                wipes.wiped = True
        if row is None:
            return None
        return row[0], row[1], int(row[2])

    async def wipe_pending(self, flow_id: str, at: int) -> None:
        """Forget an unconsumed code (its flow ended)."""
        async with self._lock:
            cur = await self._conn.execute(
                "UPDATE oauth_pending SET code = NULL, consumed_at = COALESCE(consumed_at, ?)"
                " WHERE flow_id = ? AND code IS NOT NULL",
                (at, flow_id),
            )
            await self._after_wipe(cur.rowcount > 0)

    # --------------------------------------------------------------- notifications

    async def notify(self, *, at: int, **note: Unpack[NoteFields]) -> int:
        """Queue a notification; ``data`` is checked like event detail (no secrets)."""
        data_json = check_detail(note.get("data") or {})
        async with self._lock:
            cur = await self._conn.execute(
                "INSERT INTO notifications"
                " (at, kind, provider, flow_id, chat_id, message, reason, data)"
                " VALUES (?, ?, ?, ?, ?, '', ?, ?)",
                (
                    at,
                    note["kind"],
                    note["provider"],
                    note.get("flow_id"),
                    note.get("chat_id"),
                    note.get("reason"),
                    data_json,
                ),
            )
            return int(cur.lastrowid or 0)

    async def notified(self, flow_id: str, kind: str, *, since: int) -> bool:
        """True when a ``kind`` notification about ``flow_id`` was queued at ``since`` or later."""
        async with (
            self._lock,
            self._conn.execute(
                "SELECT 1 FROM notifications WHERE flow_id = ? AND kind = ? AND at >= ? LIMIT 1",
                (flow_id, kind, since),
            ) as cur,
        ):
            return await cur.fetchone() is not None

    async def undelivered(self, *, limit: int = 100) -> list[Notification]:
        async with (
            self._lock,
            self._conn.execute(
                "SELECT id, at, kind, provider, flow_id, chat_id, reason, data, message"
                " FROM notifications WHERE delivered_at IS NULL ORDER BY id LIMIT ?",
                (int(limit),),
            ) as cur,
        ):
            rows = await cur.fetchall()
        return [
            Notification(
                id=row[0],
                at=row[1],
                kind=row[2],
                provider=row[3],
                flow_id=row[4],
                chat_id=row[5],
                reason=row[6],
                data=_json_object(row[7]),
                message=row[8] or "",
            )
            for row in rows
        ]

    async def mark_delivered(self, notification_id: int, at: int) -> bool:
        async with self._lock:
            cur = await self._conn.execute(
                "UPDATE notifications SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
                (at, notification_id),
            )
            return cur.rowcount == 1

    # ----------------------------------------------------------- token hand-outs

    #: the audit is pruned on insert after this many hand-outs, or this long (ms)
    PRUNE_EVERY = 256
    PRUNE_INTERVAL_MS = 60_000

    async def record_handout(
        self,
        *,
        at: int,
        who: str,
        node: str,
        provider: str,
        token_sha: str,
        address: str,
        flow_id: str | None,
        first_data: Mapping[str, Any],
        retention: Retention | None = None,
    ) -> tuple[HandOutRecord, bool]:
        """Record one hand-out; the record and whether it is ``who``'s first of ``provider``.

        A first hand-out queues one ``first_handout`` notification in the same
        transaction (the primary key of ``token_recipients`` makes it exactly one, across
        processes too). ``token_sha`` must be a short hash prefix (the ``*_sha`` rule).
        With ``retention`` the audit is pruned now and then (see :meth:`prune_handouts`).
        """
        if _long_hashes({"token_sha": token_sha}):
            raise ValueError("token_sha must be a short hex prefix of the token's hash")
        async with self._transaction():
            cur = await self._conn.execute(
                "INSERT INTO token_handouts (at, who, node, provider, token_sha, address, flow_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (at, who, node, provider, token_sha, address, flow_id),
            )
            row_id = int(cur.lastrowid or 0)
            cur = await self._conn.execute(
                "INSERT OR IGNORE INTO token_recipients (who, provider, first_at) VALUES (?, ?, ?)",
                (who, provider, at),
            )
            first = cur.rowcount == 1
            if first:
                await self._conn.execute(
                    "INSERT INTO notifications (at, kind, provider, flow_id, chat_id, message,"
                    " reason, data) VALUES (?, ?, ?, ?, NULL, '', NULL, ?)",
                    (at, FIRST_HANDOUT, provider, flow_id, check_detail(first_data)),
                )
            self._handouts_since_prune += 1
            if retention is not None and (
                self._pruned_at is None
                or self._handouts_since_prune >= self.PRUNE_EVERY
                or at - self._pruned_at >= self.PRUNE_INTERVAL_MS
            ):
                await self._prune(retention, at)
        record = HandOutRecord(row_id, at, who, node, provider, token_sha, address, flow_id)
        return record, first

    async def _prune(self, retention: Retention, now_ms: int) -> int:
        cur = await self._conn.execute(
            "DELETE FROM token_handouts WHERE at <= ?", (retention.cutoff_ms(now_ms),)
        )
        removed = max(cur.rowcount, 0)
        cur = await self._conn.execute(
            "DELETE FROM token_handouts WHERE id <= (SELECT MAX(id) FROM token_handouts) - ?",
            (int(retention.max_rows),),
        )
        self._handouts_since_prune = 0
        self._pruned_at = now_ms
        return removed + max(cur.rowcount, 0)

    async def prune_handouts(self, retention: Retention, now_ms: int) -> int:
        """Drop hand-out records past ``retention`` (older than its days, beyond its newest
        ``max_rows``); how many went."""
        async with self._transaction():
            return await self._prune(retention, now_ms)

    async def handouts(
        self,
        *,
        provider: str | None = None,
        who: str | None = None,
        since: int | None = None,
        limit: int = 50,
    ) -> list[HandOutRecord]:
        """Hand-out records, newest first. ``who`` matches an identity or one tag of a
        device's tag list, ignoring case; ``since``: at or after this (epoch ms)."""
        where: list[str] = []
        args: list[Any] = []
        if provider:
            where.append("provider = ?")
            args.append(provider)
        if who:
            where.append("instr(',' || lower(who) || ',', ',' || lower(?) || ',') > 0")
            args.append(who)
        if since is not None:
            where.append("at >= ?")
            args.append(int(since))
        sql = "SELECT id, at, who, node, provider, token_sha, address, flow_id FROM token_handouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        async with self._lock, self._conn.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [HandOutRecord(*row) for row in rows]

    # ------------------------------------------------------------------- counting

    async def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes when another connection commits."""
        async with self._conn.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def versions(self, flow_ids: Sequence[str]) -> dict[str, int]:
        """The current version of each of these flows (one query; missing ids left out)."""
        found: dict[str, int] = {}
        ids = list(flow_ids)
        for at in range(0, len(ids), 500):
            chunk = ids[at : at + 500]
            marks = ",".join("?" * len(chunk))
            async with self._conn.execute(
                f"SELECT id, version FROM flows WHERE id IN ({marks})", chunk
            ) as cur:
                found.update({str(row[0]): int(row[1]) for row in await cur.fetchall()})
        return found

    async def counts(self) -> dict[str, int]:
        """Number of flows per state."""
        async with (
            self._lock,
            self._conn.execute("SELECT state, COUNT(*) FROM flows GROUP BY state") as cur,
        ):
            rows = await cur.fetchall()
        return {str(state): int(n) for state, n in rows}
