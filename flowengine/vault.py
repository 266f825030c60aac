"""The token vault: the durable source of truth for every connection's token pair.

auth.json is shared with other programs that write it without locking, and it holds every
provider in one file, so it cannot be the place a freshly rotated refresh token lives: a
stale copy put back by another writer, a full disk or a kill in the middle of a rewrite
loses the only valid refresh token there is. The vault is private to this program; a
token answer is written here before anything else happens, and auth.json is published
from it (tokens.py).

Layout, in the state directory (0700 directories, 0600 files)::

    vault/
      .published         signature of auth.json as this program last wrote it
      <provider>/        one directory per provider id
        lock             flock: one refresher per provider across processes
        slot-0, slot-1   two alternating fixed-size records, written in place
        published        sequence number of the record last published to auth.json

A record is a 24-byte header and a payload::

    "AGVT" | version u8 | kind u8 | 0 u16 | seq u64 | length u32 | crc32 u32

Why this design:

* **Two alternating slots, sequence number and checksum.** A write goes to the slot that
  does not hold the newest valid record, as one ``pwrite`` followed by ``fdatasync``. A
  write torn by a crash or power loss fails its CRC and readers fall back to the other
  slot, which still holds the previous complete record. No rename and no directory fsync
  on the hot path; the state is never "between two files".
* **Space is written before it is needed.** Slots are created at full size with real
  zero bytes (not ``fallocate``, whose unwritten extents may still need metadata blocks)
  and grown, if a record got large, before a refresh request goes out. Every write after
  the provider answered is an in-place overwrite of blocks the file already owns, which
  needs no free space on ext4, xfs or tmpfs (copy-on-write filesystems such as btrfs or
  ZFS may still need some; see README).
* **The answer is captured as it arrives.** A token response is streamed into the free
  slot chunk by chunk while it is read from the socket (``answer`` record: the raw bytes
  after a JSON line of context), and only then parsed and written as the new ``pair``
  record into the other slot. A kill at any point after the last byte was read leaves
  either the captured answer or the new pair in the vault.
* **One provider, its own files.** A refresh reads and writes two small files whatever
  the number of connections; ``agentd token <p>`` reads two files of its provider.
* **A lock that cannot expire.** Single flight across processes is an ``flock`` on the
  provider's ``lock`` file. The kernel releases it when its holder dies, so there is no
  lease to time out under a slow provider and no stale-lock guessing: whoever holds the
  lock and finds an ``intent`` knows the refresh that wrote it died.
* Not SQLite: a token table would put secrets into the ledger (and its WAL), which the
  ledger refuses by design, and a database cannot reserve the space its next write needs.

Record kinds: ``pair`` holds the current tokens (``null`` after a disconnect: a
tombstone), the connection's flow id, the lineage (hash prefixes of earlier tokens, to
recognise a rolled-back copy) and, while a refresh is in flight, its ``intent``.
``answer`` holds a captured token answer and the pair it answers.

Standard library only, and cheap to import (records are named tuples, hashing is imported
when used): ``agentd token`` reads the vault on its cold-start fast path. Nothing here
logs or raises a token.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import fcntl
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .errors import StorageError
from .tokens import TokenSet, releasing

__all__ = [
    "Answer",
    "AnswerCapture",
    "Intent",
    "ProviderVault",
    "Record",
    "Vault",
    "checkpoint",
    "token_hash",
    "vault_root",
]

MAGIC = b"AGVT"
VERSION = 1
KIND_PAIR = 1
KIND_ANSWER = 2
#: magic, version, kind, reserved, seq, length (the CRC follows)
_HEAD = struct.Struct("<4sBBHQI")
HEADER_SIZE = _HEAD.size + 4
SLOTS = ("slot-0", "slot-1")
#: smallest slot; slots grow to at least four times the largest record before a request
MIN_CAPACITY = 8192
_PAGE = 4096
#: earlier token hashes kept per provider (rollback recognition)
LINEAGE = 16
#: environment variable of the crash-test hook (see :func:`checkpoint`)
STOP_AT_ENV = "AGENTD_TEST_STOP_AT"


def vault_root(state_dir: str | os.PathLike[str]) -> Path:
    """Where the vault lives in a state directory."""
    return Path(state_dir) / "vault"


def token_hash(token: str, length: int = 8) -> str:
    """A short hex prefix of the token's SHA-256: names a token without revealing it."""
    import hashlib  # not at import time: the fast path of ``agentd token`` never hashes

    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:length]


def checkpoint(name: str) -> None:
    """Crash-test hook: with ``AGENTD_TEST_STOP_AT=<name>`` the process stops itself here.

    The test that set the variable sees the child stop (``waitpid(WUNTRACED)``) and kills
    it with SIGKILL at exactly this step. Without the variable this does nothing.
    """
    if os.environ.get(STOP_AT_ENV) == name:
        import signal
        import threading

        # directed at this thread: it stops before running another line (a process-wide
        # SIGSTOP may be taken by another thread while this one races ahead)
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


# the write primitives, indirected so tests can inject a failing disk
_pwrite = os.pwrite
_fdatasync = os.fdatasync


def _dirname(provider: str) -> str:
    """The provider's directory name: the id itself when it is a plain lower-case name."""
    plain = (
        0 < len(provider) <= 64
        and provider[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in provider)
        and not any(c.isupper() for c in provider)
    )
    return provider if plain else _hexname(provider)


def _hexname(provider: str) -> str:
    return "x-" + provider.encode("utf-8").hex()


def _provider_of(dirname: str) -> str | None:
    if dirname.startswith("x-"):
        try:
            return bytes.fromhex(dirname[2:]).decode("utf-8")
        except ValueError:
            return None
    return dirname if dirname and not dirname.startswith(".") else None


def _storage_error(what: str, path: Path, err: OSError) -> StorageError:
    text = f"cannot {what} {path}: {err.strerror or err}"
    error = StorageError(text, path=str(path))
    error.errno = err.errno  # type: ignore[attr-defined]
    return error


# ---------------------------------------------------------------------- records


class Intent(NamedTuple):
    """A refresh in flight: written (durably) before the request goes out."""

    op: str  # "refresh"
    at: int  # epoch ms
    refresh_sha: str | None  # token_hash of the refresh token sent
    flow_id: str | None = None
    #: 1 for the first request with this refresh token, 2+ for a retry after a lost answer
    attempt: int = 1

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Intent:
        return cls(
            op=str(data["op"]),
            at=int(data["at"]),
            refresh_sha=data.get("refresh_sha"),
            flow_id=data.get("flow_id"),
            attempt=int(data.get("attempt") or 1),
        )


class Answer(NamedTuple):
    """A token answer as it came off the wire (before parsing). ``repr`` hides the body."""

    status: int
    content_type: str | None
    body: bytes
    at: int = 0
    op: str = "refresh"

    def __repr__(self) -> str:
        size = len(self.body)
        return f"Answer(status={self.status}, op={self.op!r}, at={self.at}, body=<{size} bytes>)"


class Record(NamedTuple):
    """The newest valid record of one provider.

    For a ``pair`` record, ``tokens`` is the current pair (None: disconnected) and
    ``intent`` is set while a refresh is in flight. For an ``answer`` record, ``answer``
    holds the captured response and the other fields describe the pair it answers.
    """

    provider: str
    seq: int
    tokens: TokenSet | None
    flow_id: str | None = None
    lineage: tuple[str, ...] = ()
    intent: Intent | None = None
    answer: Answer | None = None
    at: int = 0
    size: int = 0  # payload bytes
    slot: int = 0
    #: a settled refresh whose answer may have been lost on the way (a read timeout
    #: after sending): the next refresh with the same token is a retry
    doubt: Intent | None = None

    @property
    def settled(self) -> bool:
        """No refresh in flight and no answer waiting to be parsed."""
        return self.intent is None and self.answer is None

    def knows(self, token: str | None) -> bool:
        """Was ``token`` one of this connection's earlier (or current) tokens?"""
        if not token:
            return False
        digest = token_hash(token, 16)
        if digest in self.lineage:
            return True
        current = self.tokens
        return current is not None and token in (current.access, current.refresh)


def _tokens_json(tokens: TokenSet | None) -> dict[str, Any] | None:
    if tokens is None:
        return None
    return {
        "access": tokens.access,
        "refresh": tokens.refresh,
        "expires": tokens.expires,
        "token_type": tokens.token_type,
        "scope": tokens.scope,
        "obtained_at": tokens.obtained_at,
        "extra": dict(tokens.extra),
    }


def _tokens_from(data: Any) -> TokenSet | None:
    if not isinstance(data, dict):
        return None
    return TokenSet(
        access=str(data["access"]),
        refresh=data.get("refresh"),
        expires=data.get("expires"),
        token_type=str(data.get("token_type") or "Bearer"),
        scope=data.get("scope"),
        obtained_at=data.get("obtained_at"),
        extra=dict(data.get("extra") or {}),
    )


def _pair_payload(
    provider: str,
    tokens: TokenSet | None,
    flow_id: str | None,
    lineage: Sequence[str],
    intent: Intent | None,
    at: int,
    doubt: Intent | None = None,
) -> dict[str, Any]:
    payload = {
        "provider": provider,
        "tokens": _tokens_json(tokens),
        "flow_id": flow_id,
        "lineage": list(lineage)[:LINEAGE],
        "intent": intent.to_json() if intent else None,
        "at": at,
    }
    if doubt is not None:
        payload["doubt"] = doubt.to_json()
    return payload


def _encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def _record_from(provider: str, kind: int, seq: int, payload: bytes, slot: int) -> Record:
    if kind == KIND_PAIR:
        data = json.loads(payload)
        meta = data
        answer = None
    elif kind == KIND_ANSWER:
        line, _, body = payload.partition(b"\n")
        meta = json.loads(line)
        data = meta["prior"]
        answer = Answer(
            status=int(meta["status"]),
            content_type=meta.get("content_type"),
            body=body,
            at=int(meta.get("at") or 0),
            op=str(meta.get("op") or "refresh"),
        )
    else:
        raise ValueError("unknown record kind")
    intent = meta.get("intent")
    doubt = data.get("doubt")
    return Record(
        provider=provider,
        seq=seq,
        tokens=_tokens_from(data.get("tokens")),
        flow_id=data.get("flow_id"),
        lineage=tuple(str(x) for x in data.get("lineage") or ()),
        intent=Intent.from_json(intent) if isinstance(intent, dict) else None,
        answer=answer,
        at=int(data.get("at") or 0),
        size=len(payload),
        slot=slot,
        doubt=Intent.from_json(doubt) if isinstance(doubt, dict) else None,
    )


def _head(kind: int, seq: int, length: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, kind, 0, seq, length)


def _frame(kind: int, seq: int, payload: bytes) -> bytes:
    head = _head(kind, seq, len(payload))
    crc = binascii.crc32(head, binascii.crc32(payload))
    return head + crc.to_bytes(4, "little") + payload


def _parse_slot(provider: str, data: bytes, slot: int) -> Record | None:
    if len(data) < HEADER_SIZE:
        return None
    magic, version, kind, _, seq, length = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or length > len(data) - HEADER_SIZE:
        return None
    crc = int.from_bytes(data[_HEAD.size : HEADER_SIZE], "little")
    payload = data[HEADER_SIZE : HEADER_SIZE + length]
    if binascii.crc32(data[: _HEAD.size], binascii.crc32(payload)) != crc:
        return None
    try:
        return _record_from(provider, kind, seq, payload, slot)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _capacity_for(size: int) -> int:
    want = max(MIN_CAPACITY, 4 * (size + HEADER_SIZE) + _PAGE)
    return -(-want // _PAGE) * _PAGE


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = _pwrite(fd, view, offset)
        view = view[written:]
        offset += written


#: marker files are overwritten in place at this fixed size (a truncate frees blocks, which
#: is slow on filesystems mounted with ``discard``)
_MARKER_SIZE = 128


def _overwrite(path: Path, text: bytes) -> None:
    """Write a small marker in place, padded with spaces (parsers ignore them)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, text.ljust(_MARKER_SIZE), 0)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- capture


class AnswerCapture:
    """Streams a token answer into the free slot while it is read off the socket.

    ``begin`` (status and content type known), ``write`` for every body chunk, then
    ``finish`` writes the header that makes the record valid (page cache: it survives
    the process); ``sync`` makes it durable. Only 2xx answers are captured. An answer
    larger than the slot is not captured (``captured`` stays False) and is handled in
    memory like before.
    """

    def __init__(
        self,
        vault: ProviderVault,
        *,
        slot: int,
        seq: int,
        capacity: int,
        context: Mapping[str, Any],
    ) -> None:
        self._vault = vault
        self._slot = slot
        self._seq = seq
        self._capacity = capacity
        self._context = dict(context)
        self._fd: int | None = None
        self._offset = HEADER_SIZE
        self._crc = 0
        self.active = False
        self.captured = False

    def begin(self, status: int, content_type: str | None) -> None:
        if not 200 <= status < 300:
            return
        meta = dict(self._context, status=status, content_type=content_type)
        line = _encode(meta) + b"\n"
        if HEADER_SIZE + len(line) > self._capacity:
            return
        path = self._vault.slot_path(self._slot)
        try:
            self._fd = os.open(path, os.O_RDWR)
            # the slot's old (older) record stops being valid before its bytes change
            _write_all(self._fd, bytes(HEADER_SIZE), 0)
            _write_all(self._fd, line, self._offset)
        except OSError:
            self._close()
            return
        self._offset += len(line)
        self._crc = binascii.crc32(line)
        self.active = True

    def write(self, chunk: bytes) -> None:
        if not self.active or self._fd is None:
            return
        if self._offset + len(chunk) > self._capacity:
            self.active = False  # too large for the slot: the caller keeps it in memory
            return
        try:
            _write_all(self._fd, chunk, self._offset)
        except OSError:
            self.active = False
            return
        self._offset += len(chunk)
        self._crc = binascii.crc32(chunk, self._crc)

    def finish(self) -> bool:
        """Write the header: from here on the answer survives the process."""
        if not self.active or self._fd is None:
            self._close()
            return False
        length = self._offset - HEADER_SIZE
        head = _head(KIND_ANSWER, self._seq, length)
        crc = binascii.crc32(head, self._crc)
        try:
            _write_all(self._fd, head + crc.to_bytes(4, "little"), 0)
        except OSError:
            self._close()
            return False
        self.active = False
        self.captured = True
        return True

    def sync(self) -> None:
        """fdatasync the captured answer (survives power loss); closes the file."""
        try:
            if self.captured and self._fd is not None:
                _fdatasync(self._fd)
        except OSError as err:
            self.captured = False
            raise _storage_error("sync", self._vault.slot_path(self._slot), err) from None
        finally:
            self._close()

    def close(self) -> None:
        """Release the slot (idempotent); an unfinished capture stays invalid."""
        self.active = False
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------- vaults


class ProviderVault:
    """One provider's directory in the vault. Writers hold its lock (see ``lock_fd``)."""

    def __init__(self, root: Path, provider: str) -> None:
        self.provider = provider
        self.root = root
        self.dir = root / _dirname(provider)
        self.lock_path = self.dir / "lock"
        self.published_path = self.dir / "published"

    def __repr__(self) -> str:
        return f"ProviderVault({str(self.dir)!r})"

    def slot_path(self, slot: int) -> Path:
        return self.dir / SLOTS[slot]

    # ---------------------------------------------------------------- reading

    def _slots(self) -> tuple[list[Record | None], list[int]]:
        records: list[Record | None] = []
        sizes: list[int] = []
        for i in (0, 1):
            try:
                with open(self.slot_path(i), "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                records.append(None)
                sizes.append(0)
                continue
            except OSError as err:
                raise _storage_error("read", self.slot_path(i), err) from None
            sizes.append(len(data))
            records.append(_parse_slot(self.provider, data, i))
        return records, sizes

    def read(self) -> Record | None:
        """The newest valid record, or None when the provider has none."""
        records, _ = self._slots()
        valid = [r for r in records if r is not None]
        return max(valid, key=lambda r: r.seq) if valid else None

    def published_seq(self) -> int | None:
        try:
            with open(self.published_path, "rb") as fh:
                return int(fh.read().strip() or b"-1")
        except (OSError, ValueError):
            return None

    def set_published_seq(self, seq: int) -> None:
        """A hint for readers (not fsynced: a lost hint only costs a re-check)."""
        with contextlib.suppress(OSError):
            _overwrite(self.published_path, str(seq).encode())

    # ---------------------------------------------------------------- locking

    def lock_fd(self) -> int:
        """Open (creating the directory) the provider's lock file; the caller flocks it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dir.mkdir(exist_ok=True, mode=0o700)
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise _storage_error("open the lock", self.lock_path, err) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the provider's lock (blocking); released by the kernel if the process dies."""
        with releasing(self.lock_fd()) as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield

    # ---------------------------------------------------------------- space

    def reserve(self, record: Record | None = None) -> None:
        """Make both slots exist with room for this provider's records (lock held).

        Called before a request goes out: when this fails (a full disk), nothing was sent.
        A slot is grown by writing a complete larger copy and renaming it over the old one,
        so at every moment each slot file holds its record in full.
        """
        need = _capacity_for(record.size if record is not None else 0)
        _, sizes = self._slots()
        changed = False
        try:
            # mkdir(parents=True) ignores the mode for the parents: make each one private
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dir.mkdir(exist_ok=True, mode=0o700)
            for i in (0, 1):
                if sizes[i] >= need:
                    continue
                path = self.slot_path(i)
                try:
                    with open(path, "rb") as fh:
                        old = fh.read()
                except FileNotFoundError:
                    old = b""
                capacity = max(need, sizes[i])
                tmp = path.with_name(f".{path.name}.grow")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    _write_all(fd, old + bytes(capacity - len(old)), 0)
                    _fdatasync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                changed = True
            if changed:
                _fsync_dir(self.dir)
                _fsync_dir(self.root)
        except OSError as err:
            raise _storage_error("reserve space in", self.dir, err) from None

    # ---------------------------------------------------------------- writing

    def _target(
        self, slots: tuple[list[Record | None], list[int]] | None = None
    ) -> tuple[int, int, int]:
        """(slot to write, next seq, its capacity)."""
        records, sizes = slots or self._slots()
        valid = [r for r in records if r is not None]
        if not valid:
            return 0, 1, sizes[0]
        newest = max(valid, key=lambda r: r.seq)
        slot = 1 - newest.slot
        return slot, newest.seq + 1, sizes[slot]

    def write(
        self,
        tokens: TokenSet | None,
        *,
        flow_id: str | None,
        lineage: Sequence[str] = (),
        intent: Intent | None = None,
        now_ms: int = 0,
        torn_at: str | None = None,
        doubt: Intent | None = None,
    ) -> Record:
        """Write a pair record durably (pwrite + fdatasync) into the free slot.

        ``torn_at``: name of a crash-test checkpoint; when that hook is armed the write
        stops half-way (half the bytes written and synced) before the process is stopped,
        which is what a crash mid-write can leave behind.
        """
        payload = _encode(
            _pair_payload(self.provider, tokens, flow_id, lineage, intent, now_ms, doubt)
        )
        slot, seq, capacity = self._target()
        if capacity < HEADER_SIZE + len(payload):
            self.reserve(Record(self.provider, 0, None, size=len(payload)))
            slot, seq, capacity = self._target()
        blob = _frame(KIND_PAIR, seq, payload)
        path = self.slot_path(slot)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as err:
            raise _storage_error("open", path, err) from None
        try:
            if torn_at is not None and os.environ.get(STOP_AT_ENV) == torn_at:
                _write_all(fd, blob[: len(blob) // 2], 0)
                _fdatasync(fd)
                checkpoint(torn_at)
            _write_all(fd, blob, 0)
            _fdatasync(fd)
        except OSError as err:
            raise _storage_error("write", path, err) from None
        finally:
            os.close(fd)
        return Record(
            provider=self.provider,
            seq=seq,
            tokens=tokens,
            flow_id=flow_id,
            lineage=tuple(lineage)[:LINEAGE],
            intent=intent,
            at=now_ms,
            size=len(payload),
            slot=slot,
            doubt=doubt,
        )

    def capture(
        self, current: Record, *, op: str, intent: Intent | None, now_ms: int
    ) -> AnswerCapture:
        """An :class:`AnswerCapture` into the slot that does not hold ``current``."""
        slot, seq, capacity = self._target()
        context = {
            "op": op,
            "at": now_ms,
            "intent": intent.to_json() if intent else None,
            "prior": _pair_payload(
                self.provider, current.tokens, current.flow_id, current.lineage, None, current.at
            ),
        }
        return AnswerCapture(self, slot=slot, seq=seq, capacity=capacity, context=context)

    def remove(self) -> None:
        """Forget the provider entirely (tests and tools; a disconnect writes a tombstone)."""
        for name in (*SLOTS, "published", "lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


class Vault:
    """The vault directory: one :class:`ProviderVault` per provider id."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.signature_path = self.root / ".published"

    def __repr__(self) -> str:
        return f"Vault({str(self.root)!r})"

    def provider(self, provider: str) -> ProviderVault:
        return ProviderVault(self.root, provider)

    def read(self, provider: str) -> Record | None:
        return self.provider(provider).read()

    def providers(self) -> list[str]:
        """Every provider id with a directory in the vault, sorted."""
        try:
            entries = [e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _storage_error("list", self.root, err) from None
        found = (_provider_of(name) for name in entries)
        return sorted(p for p in found if p is not None)

    # the signature of auth.json as this program last published it (see tokens.py)

    def published_signature(self) -> list[int] | None:
        try:
            with open(self.signature_path, "rb") as fh:
                value = json.loads(fh.read())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, list) else None

    def set_published_signature(self, signature: Sequence[int] | None) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if signature is None:
                self.signature_path.unlink(missing_ok=True)
                return
            _overwrite(self.signature_path, json.dumps(list(signature)).encode())
        except OSError:
            return  # a hint only: without it readers re-check auth.json


def is_enospc(err: BaseException) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
