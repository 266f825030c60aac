"""The Broker with its vault: outcomes, lineage in the ledger, recovery, repair, bad disks.

In-process, against the FakeProvider on httpx.MockTransport, a real ledger, real vault
files and a real auth.json. The crash tests with real processes and SIGKILL are in
test_vault_crash.py.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from bot import texts
from flowengine import vault as vault_module
from flowengine.broker import Broker, Outcome
from flowengine.catalog import Catalog
from flowengine.clock import ManualClock
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.errors import (
    NotConnectedError,
    ProviderTransientError,
    ReauthorizationRequired,
    StorageError,
)
from flowengine.ledger import check_detail
from flowengine.protocol import parse_callback
from flowengine.schedule import TimerPolicy
from flowengine.states import FlowState, FlowTrigger
from flowengine.timer import RefreshTimer
from flowengine.tokens import TokenSet, TokenStore
from flowengine.vault import Intent, Vault, token_hash
from tests.fakes import FakeProvider

REDIRECT = "https://broker.example.ts.net/oauth/callback"
START = 1_800_000_000.0


@dataclass
class Rig:
    root: Path
    broker: Broker
    engine: FlowEngine
    fake: FakeProvider
    clock: ManualClock
    tokens: TokenStore
    vault: Vault
    http: httpx.AsyncClient

    def refreshes(self) -> int:
        return self.fake.grants("refresh_token")

    async def second_broker(self) -> Broker:
        """Another process on the same files (its own engine, no shared memory)."""
        engine = await FlowEngine.open(self.root / "ledger.sqlite3", clock=self.clock)
        return Broker(
            engine,
            catalog=self.broker.catalog,
            credentials=self.broker.credentials,
            tokens=TokenStore(self.tokens.path),
            vault=Vault(self.vault.root),
            http=self.http,
        )


def _catalog(fake: FakeProvider, *ids: str) -> Catalog:
    catalog = Catalog().with_override(fake.spec())
    for provider in ids:
        catalog.register(fake.spec(provider, name=provider.title()))
    return catalog


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture(name="rig")
async def _rig(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[Rig]:
    clock = ManualClock(START)
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
        creds = CredentialStore(tmp_path / "credentials.json")
        for provider in ("fake", "other"):
            creds.put(provider, fake.credentials())
        tokens = TokenStore(tmp_path / "auth.json")
        broker = Broker(
            engine,
            catalog=_catalog(fake, "other"),
            credentials=creds,
            tokens=tokens,
            http=http,
        )
        try:
            yield Rig(tmp_path, broker, engine, fake, clock, tokens, broker.vault, http)
        finally:
            await engine.close()


async def _connect(rig: Rig, provider: str = "fake", *, chat_id: int | None = 42) -> TokenSet:
    start = await rig.broker.begin(provider, redirect_uri=REDIRECT, actor="bot", chat_id=chat_id)
    verifier = await rig.engine.code_verifier(start.flow.id)
    code = rig.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
    await rig.engine.record_callback(parse_callback({"state": [start.state], "code": [code]}))
    return await rig.broker.complete_state(start.state, actor="bot")


def _vault_tokens(rig: Rig, provider: str = "fake") -> TokenSet | None:
    record = rig.vault.read(provider)
    return record.tokens if record is not None else None


# ------------------------------------------------------------------------ outcomes


@pytest.mark.anyio
async def test_renew_says_what_happened(rig: Rig) -> None:
    missing = await rig.broker.renew("fake", actor="cli")
    assert (missing.outcome, missing.reason, missing.usable) == (
        Outcome.NOT_CONNECTED,
        "not_connected",
        False,
    )
    assert isinstance(missing.error, NotConnectedError)
    first = await _connect(rig)
    valid = await rig.broker.renew("fake", actor="cli")
    assert (valid.outcome, valid.usable, valid.flow_id) == (
        Outcome.STILL_VALID,
        True,
        first.flow_id,
    )
    assert valid.times is not None
    assert valid.times.expires == first.expires
    rig.clock.advance(3600 - 30)
    refreshed = await rig.broker.renew("fake", actor="cli")
    assert refreshed.outcome is Outcome.REFRESHED
    assert refreshed.tokens is not None
    assert refreshed.tokens.access != first.access
    assert refreshed.tokens.flow_id == first.flow_id
    assert first.access not in repr(refreshed)
    assert (refreshed.tokens.refresh or "") not in repr(refreshed)
    rig.clock.advance(4000)
    rig.fake.fail_next(httpx.Response(429, headers={"Retry-After": "90"}))
    retry = await rig.broker.renew("fake", actor="cli")
    assert (retry.outcome, retry.reason, retry.usable) == (
        Outcome.RETRY,
        "provider_unavailable",
        False,
    )
    assert retry.retry_at == rig.clock.now() + 90
    assert isinstance(retry.error, ProviderTransientError)
    rig.fake.valid_refresh.clear()
    gone = await rig.broker.renew("fake", actor="cli")
    assert (gone.outcome, gone.reason) == (Outcome.REAUTHORIZE, "invalid_grant")
    assert isinstance(gone.error, ReauthorizationRequired)


@pytest.mark.anyio
async def test_the_vault_holds_the_pair_and_auth_json_shows_it(rig: Rig) -> None:
    first = await _connect(rig)
    assert _vault_tokens(rig) == first
    assert rig.tokens.read("fake") == first
    rig.clock.advance(3590)
    token = await rig.broker.get_token("fake")
    new = _vault_tokens(rig)
    assert new is not None
    assert new.access == token
    assert rig.tokens.read("fake") == new
    assert rig.vault.provider("fake").published_seq() == rig.vault.read("fake").seq  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_refresh_events_name_the_tokens_by_short_hash(rig: Rig) -> None:
    first = await _connect(rig)
    rig.clock.advance(3590)
    await rig.broker.get_token("fake")
    second = _vault_tokens(rig)
    assert second is not None
    assert first.refresh is not None
    assert second.refresh is not None
    record = await rig.engine.inspect(first.flow_id or "")
    begin = [e for e in record.events if e.trigger is FlowTrigger.BEGIN_REFRESH][-1]
    done = [e for e in record.events if e.trigger is FlowTrigger.REFRESHED][-1]
    exchanged = [e for e in record.events if e.trigger is FlowTrigger.EXCHANGE][-1]
    assert exchanged.detail["refresh_sha"] == token_hash(first.refresh)
    assert begin.detail["refresh_sha"] == token_hash(first.refresh)  # the token sent
    assert done.detail["refresh_sha"] == token_hash(second.refresh)  # the token received
    assert done.detail["rotated"] is True
    assert all(len(e.detail.get("refresh_sha") or "12345678") == 8 for e in record.events)


@pytest.mark.parametrize(
    "detail",
    [
        {"refresh_sha": "r-" + "x" * 30},  # a whole token under a hash key
        {"refresh_sha": "0123456789abcdef"},  # too long a hash
        {"nested": [{"access_sha": "ABCDEF12"}]},  # not lower-case hex
        {"refresh_sha": 12345678},
    ],
)
def test_the_ledger_refuses_anything_but_a_short_hash_under_sha_keys(
    detail: dict[str, object],
) -> None:
    with pytest.raises(ValueError, match="may not hold secrets"):
        check_detail(detail)
    assert check_detail({"refresh_sha": "0a1b2c3d", "x_sha": None})


@pytest.mark.anyio
async def test_no_token_reaches_the_ledger_or_its_wal(rig: Rig) -> None:
    first = await _connect(rig)
    rig.clock.advance(4000)
    await rig.broker.get_token("fake")
    rig.fake.valid_refresh.clear()
    rig.clock.advance(4000)
    with pytest.raises(ReauthorizationRequired):
        await rig.broker.get_token("fake")
    second = _vault_tokens(rig)
    assert second is not None
    blob = b"".join(p.read_bytes() for p in rig.root.glob("ledger.sqlite3*"))
    for secret in (first.access, first.refresh, second.access, second.refresh):
        assert secret
        assert secret.encode() not in blob


# ------------------------------------------------------------- single flight


@pytest.mark.anyio
async def test_two_hundred_callers_cause_one_refresh(rig: Rig) -> None:
    await _connect(rig)
    rig.clock.advance(3600)
    rig.fake.delay = 0.05
    results: list[str] = []

    async def one() -> None:
        results.append(await rig.broker.get_token("fake"))

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert rig.refreshes() == 1
    assert len(set(results)) == 1


@pytest.mark.anyio
async def test_a_provider_refreshing_elsewhere_does_not_block_another(rig: Rig) -> None:
    await _connect(rig)
    await _connect(rig, "other")
    rig.clock.advance(3600)
    held = threading.Event()
    release = threading.Event()

    def other_process_holds_fake() -> None:
        with rig.vault.provider("fake").locked():
            held.set()
            release.wait(30)

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, other_process_holds_fake)
        await anyio.to_thread.run_sync(held.wait, 30)
        # "other" refreshes while "fake" is locked by someone else
        other = await rig.broker.renew("other", actor="cli")
        assert other.outcome is Outcome.REFRESHED
        fake_done = anyio.Event()

        async def fake_waits() -> None:
            await rig.broker.renew("fake", actor="cli")
            fake_done.set()

        tg.start_soon(fake_waits)
        await anyio.wait_all_tasks_blocked()
        assert not fake_done.is_set()
        release.set()
    assert fake_done.is_set()
    assert rig.refreshes() == 2


@pytest.mark.anyio
async def test_short_lived_tokens_are_not_refreshed_again_by_the_next_caller(
    tmp_path: Path,
) -> None:
    fake = FakeProvider(expires_in=10)
    clock = ManualClock(START)
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
        creds = CredentialStore(tmp_path / "credentials.json")
        creds.put("fake", fake.credentials())
        broker = Broker(
            engine,
            catalog=_catalog(fake),
            credentials=creds,
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )
        rig = Rig(tmp_path, broker, engine, fake, clock, broker.tokens, broker.vault, http)
        try:
            await _connect(rig)
            clock.advance(8)  # 2 s left of 10: inside the 2.5 s margin
            await broker.get_token("fake")
            assert fake.grants("refresh_token") == 1
            for _ in range(5):  # later callers see a fresh 10 s token: no request
                clock.advance(1)
                await broker.get_token("fake")
            assert fake.grants("refresh_token") == 1
        finally:
            await engine.close()


# ------------------------------------------------------------------- recovery


async def _interrupt_after_intent(rig: Rig) -> TokenSet:
    """Leave the vault and ledger as a process killed right after sending its request."""
    current = _vault_tokens(rig)
    assert current is not None
    assert current.refresh is not None
    record = rig.vault.read("fake")
    assert record is not None
    flow_id = record.flow_id or ""
    await rig.engine.begin_refresh(
        flow_id, actor="cli", detail={"refresh_sha": token_hash(current.refresh)}
    )
    intent = Intent("refresh", rig.engine.now_ms(), token_hash(current.refresh), flow_id)
    rig.vault.provider("fake").write(
        current, flow_id=flow_id, lineage=record.lineage, intent=intent
    )
    return current


@pytest.mark.anyio
async def test_a_lost_answer_with_a_reuse_grace_is_retried_once_and_nothing_is_lost(
    rig: Rig,
) -> None:
    first = await _connect(rig)
    await _interrupt_after_intent(rig)
    # the provider took the request, rotated, but the answer never arrived; this provider
    # keeps the previous refresh token valid for a while (a reuse grace)
    rig.fake.rotate = False
    rig.clock.advance(10)
    outcome = await rig.broker.renew("fake", actor="cli")
    assert outcome.outcome is Outcome.REFRESHED
    assert rig.refreshes() == 1
    flow = await rig.engine.get_flow(first.flow_id or "")
    assert flow.state is FlowState.STORED
    record = await rig.engine.inspect(flow.id)
    begins = [e for e in record.events if e.trigger is FlowTrigger.BEGIN_REFRESH]
    assert [e.detail.get("attempt") for e in begins] == [None, 2]


@pytest.mark.anyio
async def test_a_lost_answer_without_grace_expires_with_reason_answer_lost(rig: Rig) -> None:
    first = await _connect(rig, chat_id=7)
    old = await _interrupt_after_intent(rig)
    assert old.refresh is not None
    rig.fake.valid_refresh.discard(old.refresh)  # rotated away by the lost refresh
    rig.clock.advance(10)
    outcome = await rig.broker.renew("fake", actor="timer")
    assert (outcome.outcome, outcome.reason) == (Outcome.REAUTHORIZE, "answer_lost")
    assert "lost in transit" in str(outcome.error)
    assert outcome.error is not None
    assert 'say "connect fake"' in texts.error(outcome.error)  # as the bot words it
    flow = await rig.engine.get_flow(first.flow_id or "")
    assert (flow.state, flow.error_code) == (FlowState.EXPIRED, "answer_lost")
    notes = await rig.engine.notifications()
    assert [(n.kind, n.reason, n.chat_id) for n in notes] == [("expired", "answer_lost", 7)]
    assert rig.refreshes() == 1  # retried exactly once
    await rig.broker.renew("fake", actor="timer")
    assert rig.refreshes() == 1  # and never again


def _answer_body(access: str, refresh: str, expires_in: int = 3600) -> bytes:
    return json.dumps(
        {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": expires_in,
            "token_type": "Bearer",
        }
    ).encode()


@pytest.mark.anyio
async def test_a_captured_answer_is_finished_by_the_next_process_without_a_request(
    rig: Rig,
) -> None:
    first = await _connect(rig)
    old = await _interrupt_after_intent(rig)
    assert old.refresh is not None
    # the provider rotated and answered; the answer was captured; then the process died
    rig.fake.valid_refresh.discard(old.refresh)
    new_refresh = rig.fake.issue_refresh()
    pv = rig.vault.provider("fake")
    pending = pv.read()
    assert pending is not None
    capture = pv.capture(pending, op="refresh", intent=pending.intent, now_ms=rig.engine.now_ms())
    capture.begin(200, "application/json;charset=UTF-8")
    body = _answer_body("a-captured", new_refresh)
    capture.write(body[:20])
    capture.write(body[20:])
    assert capture.finish()
    capture.sync()
    other = await rig.second_broker()
    try:
        assert await other.get_token("fake") == "a-captured"
    finally:
        await other.engine.close()
    assert rig.refreshes() == 0
    stored = _vault_tokens(rig)
    assert stored is not None
    assert (stored.refresh, stored.flow_id) == (new_refresh, first.flow_id)
    assert rig.tokens.read("fake") == stored
    flow = await rig.engine.get_flow(first.flow_id or "")
    assert flow.state is FlowState.STORED
    events = (await rig.engine.inspect(flow.id)).events
    assert events[-1].trigger is FlowTrigger.REFRESHED
    assert events[-1].detail["reconciled"] is True


@pytest.mark.anyio
async def test_a_read_timeout_after_sending_makes_the_next_refresh_a_retry(rig: Rig) -> None:
    first = await _connect(rig)
    rig.clock.advance(3000)  # ten minutes left: the timer refreshes, a caller would not
    old = _vault_tokens(rig)
    assert old is not None
    assert old.refresh is not None
    rig.fake.fail_next(httpx.ReadTimeout("no answer"))
    outcome = await rig.broker.renew("fake", actor="timer", min_valid=900)
    assert (outcome.outcome, outcome.usable) == (Outcome.RETRY, True)
    record = rig.vault.read("fake")
    assert record is not None
    assert record.settled
    assert record.doubt is not None  # it may have arrived: the next attempt knows
    assert await rig.broker.get_token("fake") == old.access  # still valid: served
    assert rig.refreshes() == 1  # and no hammering of a struggling provider
    # the provider did rotate: the retry is refused, and the owner is told why
    rig.fake.valid_refresh.discard(old.refresh)
    rig.clock.advance(580)
    outcome = await rig.broker.renew("fake", actor="cli")
    assert (outcome.outcome, outcome.reason) == (Outcome.REAUTHORIZE, "answer_lost")
    assert (await rig.engine.get_flow(first.flow_id or "")).error_code == "answer_lost"
    assert rig.refreshes() == 2


@pytest.mark.anyio
async def test_a_connect_error_clears_the_intent(rig: Rig) -> None:
    await _connect(rig)
    rig.clock.advance(3590)
    rig.fake.fail_next(httpx.ConnectError("refused"))
    outcome = await rig.broker.renew("fake", actor="cli")
    assert outcome.outcome is Outcome.RETRY
    record = rig.vault.read("fake")
    assert record is not None
    assert record.settled
    assert (await rig.broker.renew("fake", actor="cli")).outcome is Outcome.REFRESHED


@pytest.mark.anyio
async def test_reconcile_finishes_every_interrupted_provider_and_cleans_up(rig: Rig) -> None:
    first = await _connect(rig)
    await _connect(rig, "other")
    await _interrupt_after_intent(rig)
    orphan = rig.root / ".auth.json.dead1234.tmp"
    orphan.write_text('{"fake": {"access": "half a file"}}')
    report = await rig.broker.reconcile()
    assert report.recovered == ["fake"]
    assert report.orphans_removed == 1
    assert not orphan.exists()
    assert rig.refreshes() == 1  # the retry of the interrupted refresh
    flow = await rig.engine.get_flow(first.flow_id or "")
    assert flow.state is FlowState.STORED
    assert rig.tokens.read("fake") == _vault_tokens(rig)


@pytest.mark.anyio
async def test_reconcile_takes_over_pairs_from_before_the_vault(rig: Rig) -> None:
    first = await _connect(rig)
    rig.vault.provider("fake").remove()  # as if written by a version without a vault
    other = await rig.second_broker()
    try:
        report = await other.reconcile()
        assert report.republished == []
        assert _vault_tokens(rig) == first
        rig.clock.advance(3590)
        assert await other.get_token("fake") != first.access
    finally:
        await other.engine.close()


# -------------------------------------------------------------- rollback repair


@pytest.mark.anyio
async def test_a_rolled_back_entry_is_republished_on_the_next_read(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await _connect(rig)
    stale = rig.tokens.path.read_bytes()
    rig.clock.advance(3590)
    new_access = await rig.broker.get_token("fake")
    # another program writes back the copy it read before the refresh, without the lock
    rig.tokens.path.write_bytes(stale)
    caplog.set_level(logging.WARNING, "flowengine.broker")
    assert await rig.broker.get_token("fake") == new_access
    assert rig.tokens.read("fake") == _vault_tokens(rig)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "auth.json entry for fake was rolled back by another writer; re-published from the vault"
    ]
    stale_entry = json.loads(stale)["fake"]
    for secret in (stale_entry["access"], stale_entry["refresh"], new_access):
        assert secret not in caplog.text
    assert rig.refreshes() == 1  # the stale refresh token was never used


@pytest.mark.anyio
async def test_foreign_entries_written_meanwhile_are_kept_by_the_repair(rig: Rig) -> None:
    await _connect(rig)
    stale = json.loads(rig.tokens.path.read_text())
    rig.clock.advance(3590)
    await rig.broker.get_token("fake")
    stale["anthropic"] = {"type": "api", "key": "sk-foreign"}
    rig.tokens.path.write_text(json.dumps(stale))
    await rig.broker.publish()
    data = json.loads(rig.tokens.path.read_text())
    assert data["anthropic"] == {"type": "api", "key": "sk-foreign"}
    assert data["fake"]["access"] == _vault_tokens(rig).access  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_disconnect_leaves_a_tombstone_that_outlives_a_stale_copy(rig: Rig) -> None:
    first = await _connect(rig)
    stale = rig.tokens.path.read_bytes()
    await rig.broker.disconnect("fake", actor="cli")
    assert rig.tokens.read("fake") is None
    record = rig.vault.read("fake")
    assert record is not None
    assert record.tokens is None
    rig.tokens.path.write_bytes(stale)  # the old pair put back by another writer
    with pytest.raises(NotConnectedError):
        await rig.broker.get_token("fake")
    await rig.broker.publish()
    assert rig.tokens.read("fake") is None  # removed again
    # a pair the vault never saw (connected with another tool) is taken over
    rig.tokens.write("fake", TokenSet(access="elsewhere", refresh="r-x", obtained_at=1))
    assert await rig.broker.get_token("fake") == "elsewhere"
    assert first.access != "elsewhere"


@pytest.mark.anyio
async def test_an_auth_json_pair_is_taken_over_by_the_vault(rig: Rig) -> None:
    rig.tokens.write(
        "fake",
        TokenSet(access="hand-made", refresh=rig.fake.issue_refresh(), obtained_at=1),
    )
    assert await rig.broker.get_token("fake") == "hand-made"
    assert _vault_tokens(rig) == rig.tokens.read("fake")
    assert (await rig.broker.refresh("fake", actor="cli", force=True)).access != "hand-made"


# --------------------------------------------------------------- a failing disk


@pytest.mark.anyio
async def test_a_vault_write_failing_a_few_times_is_retried(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _connect(rig)
    rig.clock.advance(3590)
    real = vault_module._pwrite
    calls = {"n": 0}

    def flaky(fd: int, data: bytes, offset: int) -> int:
        calls["n"] += 1
        # the intent and the capture go through; the new pair's first two writes fail
        if calls["n"] in (6, 7):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(vault_module, "_pwrite", flaky)
    outcome = await rig.broker.renew("fake", actor="cli")
    assert outcome.outcome is Outcome.REFRESHED
    assert calls["n"] >= 7
    assert _vault_tokens(rig) == outcome.tokens
    assert rig.broker._stranded == {}


@pytest.mark.anyio
async def test_a_vault_that_refuses_every_write_loses_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await _connect(rig)
    rig.clock.advance(3590)
    real = vault_module._pwrite
    failing = {"on": False}
    writes = {"n": 0}

    def disk(fd: int, data: bytes, offset: int) -> int:
        writes["n"] += 1
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    # the intent is written, then the disk refuses everything: no capture, no pair
    original_write = vault_module.ProviderVault.write

    def write_then_fail(self: vault_module.ProviderVault, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        record = original_write(self, *args, **kw)  # type: ignore[arg-type]
        if kw.get("intent") is not None:
            failing["on"] = True
        return record

    monkeypatch.setattr(vault_module, "_pwrite", disk)
    monkeypatch.setattr(vault_module.ProviderVault, "write", write_then_fail)
    outcome = await rig.broker.renew("fake", actor="cli")
    assert outcome.outcome is Outcome.REFRESHED
    new = outcome.tokens
    assert new is not None
    # the vault still says "in flight" ...
    record = rig.vault.read("fake")
    assert record is not None
    assert record.intent is not None
    # ... the new pair is served from memory and was published to auth.json
    assert await rig.broker.get_token("fake") == new.access
    on_disk = rig.tokens.read("fake")
    assert on_disk is not None
    assert (on_disk.access, on_disk.refresh) == (new.access, new.refresh)
    assert rig.refreshes() == 1
    # another process (this one died) finds the answer in auth.json, not the provider
    monkeypatch.undo()
    other = await rig.second_broker()
    try:
        assert await other.get_token("fake") == new.access
    finally:
        await other.engine.close()
    assert rig.refreshes() == 1
    stored = _vault_tokens(rig)
    assert stored is not None
    assert (stored.access, stored.refresh) == (new.access, new.refresh)
    flow = await rig.engine.get_flow(first.flow_id or "")
    assert flow.state is FlowState.STORED


@pytest.mark.anyio
async def test_no_room_before_the_request_means_no_request(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await _connect(rig)
    rig.clock.advance(3590)

    def full(self: vault_module.ProviderVault, record: object = None) -> None:
        raise StorageError("cannot reserve space: No space left on device")

    monkeypatch.setattr(vault_module.ProviderVault, "reserve", full)
    outcome = await rig.broker.renew("fake", actor="cli")
    assert (outcome.outcome, outcome.reason, outcome.usable) == (
        Outcome.RETRY,
        "storage_error",
        True,
    )
    assert rig.refreshes() == 0
    assert _vault_tokens(rig) == first


# ------------------------------------------------------------------- the timer


@pytest.mark.anyio
async def test_the_timer_refreshes_due_providers_concurrently_and_publishes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20
    ids = [f"p{i:02d}" for i in range(n)]
    fake = FakeProvider()
    in_flight = {"now": 0, "max": 0}
    gate = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        form = request.content.decode()
        if "grant_type=refresh_token" in form:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            if in_flight["now"] >= 8:
                gate.set()
            with anyio.fail_after(10):
                await gate.wait()  # every refresh waits until 8 are in flight at once
            in_flight["now"] -= 1
        return await fake.handle(request)

    clock = ManualClock(START)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
        creds = CredentialStore(tmp_path / "credentials.json")
        for provider in ids:
            creds.put(provider, fake.credentials())
        broker = Broker(
            engine,
            catalog=_catalog(fake, *ids),
            credentials=creds,
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )
        rig = Rig(tmp_path, broker, engine, fake, clock, broker.tokens, broker.vault, http)
        try:
            for provider in ids:
                await _connect(rig, provider)
            rewrites = {"n": 0}
            publish = TokenStore.publish

            def counting(self: TokenStore, *args: object, **kw: object):  # type: ignore[no-untyped-def]
                result = publish(self, *args, **kw)  # type: ignore[arg-type]
                rewrites["n"] += int(result[2])
                return result

            monkeypatch.setattr(TokenStore, "publish", counting)
            timer = RefreshTimer(broker, policy=TimerPolicy(concurrency=8))
            clock.advance(3600 - 600)  # every one due
            flows = [await engine.connection(p) for p in ids]
            report = await timer.sweep()
            assert sorted(report.refreshed) == sorted(f.id for f in flows if f is not None)
            assert fake.grants("refresh_token") == n
            assert in_flight["max"] == 8  # bounded, and really concurrent
            assert rewrites["n"] == 1  # one auth.json rewrite for the whole sweep
            assert report.published == n
            data = json.loads(rig.tokens.path.read_text())
            for provider in ids:
                assert data[provider]["access"] == _vault_tokens(rig, provider).access  # type: ignore[union-attr]
        finally:
            await engine.close()


@pytest.mark.anyio
async def test_reconnecting_over_a_connection_left_refreshing_supersedes_it(rig: Rig) -> None:
    first = await _connect(rig)
    await _interrupt_after_intent(rig)  # a process died mid-refresh
    second = await _connect(rig)  # the owner connects again
    assert (await rig.engine.get_flow(first.flow_id or "")).state is FlowState.SUPERSEDED
    assert (await rig.engine.get_flow(second.flow_id or "")).state is FlowState.STORED
    record = rig.vault.read("fake")
    assert record is not None
    assert record.settled
    assert record.tokens == second
    assert rig.refreshes() == 0  # the dead refresh is not retried for a replaced pair


@pytest.mark.anyio
async def test_the_timer_settles_a_stale_refreshing_flow_once(rig: Rig) -> None:
    current = await _connect(rig)
    # an older connection of the same provider left in "refreshing" by a dead process
    # (a bare STORE: record_stored would have superseded it)
    started = await rig.engine.start("fake", redirect_uri=REDIRECT, actor="cli")
    old = started.flow.id
    await rig.engine.issue_url(old, actor="cli")
    await rig.engine.record_callback(parse_callback({"state": [started.state], "code": ["c"]}))
    await rig.engine.take_code(started.state)
    await rig.engine.record_exchange(old, actor="cli")
    await rig.engine.ledger.transition(old, FlowTrigger.STORE, actor="cli", at=1)
    await rig.engine.begin_refresh(old, actor="cli")
    await rig.engine.set_next_check(old, rig.engine.now_ms())
    report = await RefreshTimer(rig.broker).sweep()
    assert report.checked == 1
    flow = await rig.engine.get_flow(old)
    assert flow.state is FlowState.SUPERSEDED
    assert await rig.engine.next_check_at(old) is None
    assert (await rig.engine.get_flow(current.flow_id or "")).state is FlowState.STORED
    assert rig.refreshes() == 0
