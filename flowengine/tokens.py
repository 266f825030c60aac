"""auth.json: the token file shared with the agent runtime, published from the vault.

The file is one JSON object keyed by provider id. Each entry is the runtime's format::

    {"dexcom": {"access": "...", "refresh": "...", "expires": 1790000000000,
                "type": "oauth", "token_type": "Bearer", "scope": "offline_access",
                "obtained_at": 1789992800000, "flow_id": "9f2c..."}}

``expires`` and ``obtained_at`` are epoch milliseconds; ``expires`` is null when the
provider did not say (unknown, not eternal). Entries of providers this program does not
know, and fields it does not know, are preserved on every write.

auth.json is a *view*: the source of truth for this program's connections is the token
vault (vault.py), written before anything else. The broker publishes vault records here
(:meth:`TokenStore.publish`) and puts them back when another writer rolled an entry back.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
directory) and mode 0600. When auth.json is a symbolic link the write goes through to the
link's target: the link stays a link. Every read-modify-write holds an exclusive
``fcntl.flock`` on the sibling ``auth.json.lock``, so cooperating writers never lose each
other's updates (writers that do not take it are repaired after the fact, see broker.py).
A file that does not parse is never overwritten: the write fails with
TokenFileCorruptError naming the path and the file stays as it was.

The file is written one entry per line (the C JSON encoder; a 10k-entry file is written
several times faster than with ``indent``), sorted by provider id.

This module imports only the standard library at import time: ``agentd token`` reads it
on its cold-start fast path. No token ever reaches a log line or an exception message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StorageError, TokenFileCorruptError

__all__ = [
    "TokenSet",
    "TokenStore",
    "atomic_write_json",
    "entry_matches",
    "read_json_object",
    "releasing",
    "signature_of",
    "write_target",
    "write_without",
]

#: entry keys this module manages; everything else in an entry is kept as it was
_KNOWN = frozenset({"access", "refresh", "expires", "type", "token_type", "scope", "obtained_at"})


@dataclass(frozen=True, slots=True)
class TokenSet:
    """One provider's tokens. ``repr`` hides the secrets."""

    access: str = field(repr=False)
    refresh: str | None = field(default=None, repr=False)
    expires: int | None = None  # epoch ms; None = unknown
    token_type: str = "Bearer"
    scope: str | None = None
    obtained_at: int | None = None  # epoch ms
    extra: Mapping[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------- conversions

    @classmethod
    def from_response(
        cls,
        data: Mapping[str, Any],
        *,
        now_ms: int,
        previous_refresh: str | None = None,
        default_lifetime: int | None = None,
    ) -> TokenSet:
        """Build from a validated token response (RFC 6749 §5.1).

        ``expires_in`` missing: ``default_lifetime`` seconds if given, else unknown (None).
        ``refresh_token`` missing: ``previous_refresh`` is kept.
        """
        access = data.get("access_token")
        if not isinstance(access, str) or not access:
            raise ValueError("token response has no access_token")
        expires: int | None = None
        raw_expires = data.get("expires_in")
        lifetime: float | None = None
        if raw_expires is not None and not isinstance(raw_expires, bool):
            try:
                lifetime = float(raw_expires)
            except (TypeError, ValueError):
                lifetime = None
        if lifetime is None and default_lifetime is not None:
            lifetime = float(default_lifetime)
        if lifetime is not None and lifetime > 0:
            expires = now_ms + int(lifetime * 1000)
        refresh = data.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            refresh = previous_refresh
        scope = data.get("scope")
        if isinstance(scope, list):
            scope = " ".join(str(s) for s in scope)
        return cls(
            access=access,
            refresh=refresh,
            expires=expires,
            token_type=str(data.get("token_type") or "Bearer"),
            scope=str(scope) if scope else None,
            obtained_at=now_ms,
        )

    def to_entry(self) -> dict[str, Any]:
        """The auth.json entry (extra fields first, ours win)."""
        entry: dict[str, Any] = dict(self.extra)
        entry.update(
            {
                "type": "oauth",
                "access": self.access,
                "refresh": self.refresh,
                "expires": self.expires,
                "token_type": self.token_type,
                "scope": self.scope,
                "obtained_at": self.obtained_at,
            }
        )
        return entry

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> TokenSet | None:
        """Parse an auth.json entry; None if it holds no usable access token."""
        access = entry.get("access")
        if not isinstance(access, str) or not access:
            return None
        refresh = entry.get("refresh")
        expires = entry.get("expires")
        obtained = entry.get("obtained_at")
        return cls(
            access=access,
            refresh=refresh if isinstance(refresh, str) and refresh else None,
            expires=_ms(expires),
            token_type=str(entry.get("token_type") or "Bearer"),
            scope=entry.get("scope") if isinstance(entry.get("scope"), str) else None,
            obtained_at=_ms(obtained),
            extra={k: v for k, v in entry.items() if k not in _KNOWN},
        )

    # ------------------------------------------------------------------ queries

    @property
    def flow_id(self) -> str | None:
        value = self.extra.get("flow_id")
        return value if isinstance(value, str) else None

    def is_valid(self, now_ms: int, *, leeway_ms: int = 0) -> bool:
        """Usable for at least ``leeway_ms`` more. Unknown expiry counts as valid."""
        return self.expires is None or self.expires - leeway_ms > now_ms

    def expires_in(self, now_ms: int) -> float | None:
        return None if self.expires is None else (self.expires - now_ms) / 1000.0


def _ms(value: Any) -> int | None:
    """An epoch-ms number from JSON, or None (missing, null, bool, text)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    return None


# ------------------------------------------------------------------ file helpers


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} if missing or empty; TokenFileCorruptError otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise StorageError(f"cannot read {path}: {err.strerror or err}", path=str(path)) from err
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenFileCorruptError(
            f"{path} is not valid JSON (line {getattr(err, 'lineno', '?')}); it was left"
            " untouched: fix or move it away",
            path=str(path),
        ) from None
    if not isinstance(data, dict):
        raise TokenFileCorruptError(
            f"{path} does not hold a JSON object; it was left untouched: fix or move it away",
            path=str(path),
        )
    return data


def _dumps(data: Mapping[str, Any]) -> bytes:
    """JSON text with one top-level entry per line (C encoder; sorted keys)."""
    if not data:
        return b"{}\n"
    encode = json.JSONEncoder(sort_keys=True).encode  # one encoder, not one per entry
    lines = [
        f"  {encode(str(key))}: {encode(value)}"
        for key, value in sorted(data.items(), key=lambda kv: str(kv[0]))
    ]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


def write_target(path: Path) -> Path:
    """Where a write of ``path`` lands: the final target when ``path`` is a symlink."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def write_without(path: Path, data: dict[str, Any], key: str) -> bool:
    """Write ``data`` (just read from ``path``) back without ``key``; False (nothing written)
    when it has no such entry. The caller holds the file's lock."""
    if key not in data:
        return False
    del data[key]
    atomic_write_json(path, data)
    return True


def atomic_write_json(
    path: Path,
    data: Mapping[str, Any],
    *,
    before_replace: Callable[[], None] | None = None,
) -> list[int]:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync dir; 0600.

    A symbolic link is written through: its target is replaced, the link stays.
    ``before_replace`` runs after the temp file is durable and before the rename.
    Returns the signature (see :func:`signature_of`) of the file written.
    """
    import tempfile  # not at import time: ``agentd token`` reads, it does not write

    target = write_target(path)
    directory = target.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        payload = _dumps(data)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
                st = os.fstat(fh.fileno())
            if before_replace is not None:
                before_replace()
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}", path=str(path)) from err
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


class _FileLock:
    """An exclusive flock on ``<path>.lock``, re-entrant within one thread of one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        fd = _open_lock_file(self.path)
        with releasing(fd):
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0


def _open_lock_file(path: Path) -> int:
    """Open a lock file (creating it and its directory, owner only) for flock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise StorageError(
            f"cannot open lock file {path}: {err.strerror or err}", path=str(path)
        ) from err


@contextlib.contextmanager
def releasing(fd: int) -> Iterator[int]:
    """Own ``fd``, a lock file's descriptor: leaving the block unlocks and closes it."""
    try:
        yield fd
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def entry_matches(entry: Any, tokens: TokenSet | None) -> bool:
    """Does an auth.json entry hold exactly these tokens (None: no entry)?"""
    if tokens is None:
        return entry is None
    if not isinstance(entry, dict):
        return False
    return (
        entry.get("access") == tokens.access
        and entry.get("refresh") == tokens.refresh
        and _ms(entry.get("expires")) == tokens.expires
    )


def signature_of(path: Path) -> list[int] | None:
    """(device, inode, size, mtime ns) of the file behind ``path``; None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


#: what a publish sets for one provider: its tokens and flow id, or None to remove it
Update = tuple[TokenSet, str | None] | None


class TokenStore:
    """auth.json: read entries, publish the vault's pairs, keep everyone else's entries."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            from .paths import auth_file

            path = auth_file()
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = _FileLock(self.lock_path)

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r})"

    # -------------------------------------------------------------------- locks

    def locked_sync(self) -> contextlib.AbstractContextManager[None]:
        """Hold the cross-process lock (blocking). Re-entrant in the same thread."""
        return self._lock.hold()

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the cross-process lock without blocking the event loop.

        The flock is taken on its own descriptor in a worker thread; other coroutines keep
        running meanwhile. Not re-entrant: inside this block use the ``*_unlocked`` methods.
        """
        import anyio

        fd = _open_lock_file(self.lock_path)
        with releasing(fd):
            await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=False)
            yield

    # -------------------------------------------------------------------- reads

    def read_all(self) -> dict[str, Any]:
        """The whole file as a dict (raw entries, foreign ones included)."""
        return read_json_object(self.path)

    def read(self, provider: str) -> TokenSet | None:
        """The provider's tokens, or None if it has no (usable) entry."""
        entry = self.read_all().get(provider)
        if not isinstance(entry, dict):
            return None
        return TokenSet.from_entry(entry)

    def signature(self) -> list[int] | None:
        """Identity of the file's current content (changes with every rewrite)."""
        return signature_of(self.path)

    # ------------------------------------------------------------------ publish

    def publish(
        self,
        compute: Callable[[dict[str, Any], list[int] | None], Mapping[str, Update]],
        *,
        before_replace: Callable[[], None] | None = None,
    ) -> tuple[list[str], list[int] | None, bool]:
        """Set or remove entries in one rewrite, under the lock.

        ``compute`` gets the file's content and signature (both read under the lock) and
        returns the updates: provider -> (tokens, flow id), or None to remove the entry.
        Entries that already hold those tokens are left alone and nothing is written when
        nothing changes. Returns the providers whose entry changed, the signature of the
        file afterwards and whether it was rewritten.
        """
        with self.locked_sync():
            self._remove_orphans_unlocked()
            signature = self.signature()
            data = self.read_all()  # raises on a corrupt file: nothing is overwritten
            changed: list[str] = []
            for provider, update in compute(data, signature).items():
                old = data.get(provider)
                if update is None:
                    if provider in data:
                        del data[provider]
                        changed.append(provider)
                    continue
                tokens, flow_id = update
                entry: dict[str, Any] = dict(old) if isinstance(old, dict) else {}
                entry.update(tokens.to_entry())
                if flow_id is not None:
                    entry["flow_id"] = flow_id
                if entry != old:
                    data[provider] = entry
                    changed.append(provider)
            if not changed:
                return changed, signature, False
            written = atomic_write_json(self.path, data, before_replace=before_replace)
            return changed, written, True

    def remove_orphans(self) -> int:
        """Delete temp files a killed writer left next to auth.json (under the lock)."""
        with self.locked_sync():
            return self._remove_orphans_unlocked()

    def _remove_orphans_unlocked(self) -> int:
        # every writer that names its temp file like this holds the lock while it exists,
        # so with the lock held any such file belongs to a writer that died
        target = write_target(self.path)
        try:
            names = os.listdir(target.parent)
        except OSError:
            return 0
        prefix = f".{target.name}."
        removed = 0
        for name in names:
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(target.parent / name)
                    removed += 1
        return removed

    # ------------------------------------------------------------------- writes

    def write(self, provider: str, tokens: TokenSet, *, flow_id: str | None = None) -> None:
        """Set the provider's entry directly (a foreign writer's view; the broker publishes)."""
        with self.locked_sync():
            self.write_unlocked(provider, tokens, flow_id=flow_id)

    def write_unlocked(
        self, provider: str, tokens: TokenSet, *, flow_id: str | None = None
    ) -> None:
        """``write`` for a caller that already holds the lock."""
        data = self.read_all()  # raises on a corrupt file: nothing is overwritten
        old = data.get(provider)
        entry: dict[str, Any] = dict(old) if isinstance(old, dict) else {}
        entry.update(tokens.to_entry())
        if flow_id is not None:
            entry["flow_id"] = flow_id
        data[provider] = entry
        atomic_write_json(self.path, data)

    def delete(self, provider: str) -> bool:
        """Remove the provider's entry; False if it had none."""
        with self.locked_sync():
            return self.delete_unlocked(provider)

    def delete_unlocked(self, provider: str) -> bool:
        return write_without(self.path, self.read_all(), provider)
