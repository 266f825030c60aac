"""Seeding many stored connections at once (benchmarks): ledger rows, vault, auth.json.

``seed`` writes N connections as a running installation would have them: a ``stored`` flow
per provider in the ledger (bulk SQL, the product's schema), a vault record per provider,
auth.json holding every pair, and the publish markers in sync, so ``agentd token`` takes
its fast path. Per-record fsyncs are skipped while seeding (one ``os.sync`` at the end):
this is set-up, not what is measured.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import anyio

from flowengine import vault as vault_module
from flowengine.engine import FlowEngine
from flowengine.tokens import TokenSet, atomic_write_json
from flowengine.vault import Vault, vault_root

__all__ = ["flow_id", "provider_id", "seed", "seed_one", "unsynced"]

REDIRECT = "https://broker.example.ts.net/oauth/callback"


def provider_id(i: int) -> str:
    return f"p{i:05d}"


def flow_id(i: int) -> str:
    return f"f{i:015d}"


@contextmanager
def unsynced() -> Iterator[None]:
    """No fsync per vault write (bulk set-up); everything is synced once afterwards."""
    with (
        mock.patch.object(vault_module, "_fdatasync", return_value=None),
        mock.patch.object(vault_module, "_fsync_dir", return_value=None),
    ):
        yield
    os.sync()


def seed(
    state_dir: Path,
    auth_file: Path,
    n: int,
    *,
    refresh_tokens: list[str],
    now_ms: int,
    lifetime_s: int = 3600,
    next_check_ms: int | None = None,
) -> Vault:
    """N stored connections p00000.. with the given refresh tokens; returns the vault."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ledger = state_dir / "ledger.sqlite3"

    async def schema() -> None:
        engine = await FlowEngine.open(ledger)
        await engine.close()

    anyio.run(schema)
    rows = []
    events = []
    for i in range(n):
        fid = flow_id(i)
        rows.append(
            (
                fid,
                provider_id(i),
                "stored",
                1,
                now_ms,
                now_ms,
                REDIRECT,
                "read",
                "cli",
                hashlib.sha256(fid.encode()).hexdigest(),
                1,
                now_ms + lifetime_s * 1000,
                next_check_ms,
            )
        )
        events.append((fid, now_ms, "stored", "cli"))
    db = sqlite3.connect(ledger)
    with db:
        db.executemany(
            "INSERT INTO flows (id, provider, state, version, created_at, updated_at,"
            " redirect_uri, scopes, actor, state_hash, uses_pkce, token_expires_at,"
            " next_check_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.executemany("INSERT INTO flow_events VALUES (?, 1, ?, NULL, ?, NULL, ?, '{}')", events)
    db.close()
    vault = Vault(vault_root(state_dir))
    entries = {}
    with unsynced():
        for i in range(n):
            tokens = TokenSet(
                access=f"a-{i:05d}-" + "x" * 40,
                refresh=refresh_tokens[i],
                expires=now_ms + lifetime_s * 1000,
                scope="read",
                obtained_at=now_ms,
                extra={"flow_id": flow_id(i)},
            )
            pv = vault.provider(provider_id(i))
            record = pv.write(tokens, flow_id=flow_id(i), now_ms=now_ms)
            pv.set_published_seq(record.seq)
            entry = tokens.to_entry()
            entries[provider_id(i)] = entry
        signature = atomic_write_json(auth_file, entries)
    vault.set_published_signature(signature)
    return vault


def seed_one(state_dir: Path, auth_file: Path, provider: str, tokens: TokenSet) -> Vault:
    """One connection's pair in the vault and in auth.json, the publish markers in sync."""
    vault = Vault(vault_root(state_dir))
    pv = vault.provider(provider)
    record = pv.write(tokens, flow_id=tokens.flow_id, now_ms=tokens.obtained_at or 0)
    pv.set_published_seq(record.seq)
    vault.set_published_signature(atomic_write_json(auth_file, {provider: tokens.to_entry()}))
    return vault
