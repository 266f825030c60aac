"""The token vault on real files: slots, checksums, torn writes, capture, space, names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flowengine import vault as vault_module
from flowengine.tokens import TokenSet
from flowengine.vault import (
    HEADER_SIZE,
    MIN_CAPACITY,
    Intent,
    ProviderVault,
    Record,
    Vault,
    token_hash,
)

NOW = 1_800_000_000_000


def pair(n: int, *, size: int = 0) -> TokenSet:
    return TokenSet(
        access=f"access-{n}" + "a" * size,
        refresh=f"refresh-{n}",
        expires=NOW + 3_600_000,
        scope="read",
        obtained_at=NOW + n,
        extra={"custom": [n]},
    )


@pytest.fixture(name="vault")
def _vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "state" / "vault")


@pytest.fixture(name="pv")
def _pv(vault: Vault) -> ProviderVault:
    return vault.provider("dexcom")


def test_round_trip_with_private_modes_and_preallocated_slots(
    vault: Vault, pv: ProviderVault
) -> None:
    assert pv.read() is None
    record = pv.write(pair(1), flow_id="f1", lineage=("abc",), now_ms=NOW)
    back = pv.read()
    assert back == record
    assert back is not None
    assert back.tokens == pair(1)
    assert (back.seq, back.flow_id, back.lineage, back.intent, back.answer) == (
        1,
        "f1",
        ("abc",),
        None,
        None,
    )
    assert back.settled
    assert stat.S_IMODE(vault.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(pv.dir.stat().st_mode) == 0o700
    for i in (0, 1):
        path = pv.slot_path(i)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_size == MIN_CAPACITY
    # the unused slot is real zero bytes, not a hole
    assert pv.slot_path(1).read_bytes() == bytes(MIN_CAPACITY)
    assert pv.slot_path(1).stat().st_blocks * 512 >= MIN_CAPACITY
    assert vault.providers() == ["dexcom"]


def test_writes_alternate_slots_in_place(pv: ProviderVault) -> None:
    first = pv.write(pair(1), flow_id="f", now_ms=NOW)
    inodes = [os.stat(pv.slot_path(i)).st_ino for i in (0, 1)]
    slots = []
    for n in range(2, 8):
        record = pv.write(pair(n), flow_id="f", now_ms=NOW + n)
        slots.append(record.slot)
        assert pv.read() == record
        assert record.seq == n
    assert first.slot == 0
    assert slots == [1, 0, 1, 0, 1, 0]
    # overwritten where they are: same files, same size, no new blocks needed
    assert [os.stat(pv.slot_path(i)).st_ino for i in (0, 1)] == inodes
    assert {os.stat(pv.slot_path(i)).st_size for i in (0, 1)} == {MIN_CAPACITY}


def _damage(path: Path, how: str, record: Record) -> None:
    data = bytearray(path.read_bytes())
    end = HEADER_SIZE + record.size
    if how == "payload byte":
        data[HEADER_SIZE + record.size // 2] ^= 0x01
    elif how == "seq byte":
        data[8] ^= 0x01
    elif how == "torn second half":
        data[end // 2 : end] = bytes(end - end // 2)
    elif how == "zero header":
        data[:HEADER_SIZE] = bytes(HEADER_SIZE)
    elif how == "length too large":
        data[16:20] = (len(data)).to_bytes(4, "little")
    elif how == "bad magic":
        data[0:4] = b"XXXX"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how",
    [
        "payload byte",
        "seq byte",
        "torn second half",
        "zero header",
        "length too large",
        "bad magic",
    ],
)
def test_a_damaged_newest_slot_falls_back_to_the_previous_record(
    pv: ProviderVault, how: str
) -> None:
    older = pv.write(pair(1), flow_id="f", now_ms=NOW)
    newer = pv.write(pair(2), flow_id="f", now_ms=NOW + 1)
    _damage(pv.slot_path(newer.slot), how, newer)
    assert pv.read() == older
    # the next write goes to the damaged slot, with the next sequence number
    again = pv.write(pair(3), flow_id="f", now_ms=NOW + 2)
    assert (again.slot, again.seq) == (newer.slot, older.seq + 1)
    assert pv.read() == again


def test_both_slots_damaged_reads_as_no_record(pv: ProviderVault) -> None:
    one = pv.write(pair(1), flow_id="f")
    two = pv.write(pair(2), flow_id="f")
    _damage(pv.slot_path(one.slot), "payload byte", one)
    _damage(pv.slot_path(two.slot), "payload byte", two)
    assert pv.read() is None


def test_intent_and_tombstone_records(pv: ProviderVault) -> None:
    pv.write(pair(1), flow_id="f")
    intent = Intent("refresh", NOW, token_hash("refresh-1"), "f", attempt=2)
    pending = pv.write(pair(1), flow_id="f", intent=intent)
    assert pv.read() == pending
    assert pending.intent == intent
    assert not pending.settled
    gone = pv.write(None, flow_id="f", lineage=(token_hash("access-1", 16),))
    back = pv.read()
    assert back == gone
    assert back is not None
    assert back.tokens is None
    assert back.knows("access-1")
    assert not back.knows("access-2")
    assert not back.knows(None)


def _capture(pv: ProviderVault, body: bytes, *, status: int = 200, chunks: int = 3) -> bool:
    current = pv.read()
    assert current is not None
    intent = Intent("refresh", NOW, "deadbeef", "f")
    capture = pv.capture(current, op="refresh", intent=intent, now_ms=NOW + 5)
    capture.begin(status, "application/json")
    step = max(1, len(body) // chunks)
    for i in range(0, len(body), step):
        capture.write(body[i : i + step])
    done = capture.finish()
    capture.sync()
    return done


def test_a_captured_answer_is_the_newest_record_with_its_context(pv: ProviderVault) -> None:
    pv.write(pair(1), flow_id="f", lineage=("l1",))
    pending = pv.write(
        pair(1), flow_id="f", lineage=("l1",), intent=Intent("refresh", NOW, "deadbeef", "f")
    )
    body = b'{"access_token": "new-a", "refresh_token": "new-r", "expires_in": 60}'
    assert _capture(pv, body)
    record = pv.read()
    assert record is not None
    assert record.seq == pending.seq + 1
    assert record.slot != pending.slot
    assert record.answer is not None
    assert (record.answer.status, record.answer.content_type, record.answer.body) == (
        200,
        "application/json",
        body,
    )
    assert record.answer.op == "refresh"
    assert record.answer.at == NOW + 5
    assert record.tokens == pair(1)  # the pair the answer answers
    assert (record.flow_id, record.lineage) == ("f", ("l1",))
    assert record.intent == Intent("refresh", NOW, "deadbeef", "f")
    assert not record.settled
    assert "new-r" not in repr(record)


def test_error_and_oversized_answers_are_not_captured(pv: ProviderVault) -> None:
    pv.write(pair(1), flow_id="f")
    pending = pv.write(pair(1), flow_id="f", intent=Intent("refresh", NOW, "x", "f"))
    assert not _capture(pv, b'{"error": "invalid_grant"}', status=400)
    assert pv.read() == pending
    assert not _capture(pv, b"x" * (MIN_CAPACITY * 2))
    assert pv.read() == pending


def test_an_interrupted_capture_leaves_the_intent_record(pv: ProviderVault) -> None:
    pv.write(pair(1), flow_id="f")
    pending = pv.write(pair(1), flow_id="f", intent=Intent("refresh", NOW, "x", "f"))
    capture = pv.capture(pending, op="refresh", intent=pending.intent, now_ms=NOW)
    capture.begin(200, "application/json")
    capture.write(b'{"access_token": "half')
    capture.close()  # the process died here: no header was written
    assert pv.read() == pending


def test_reserve_grows_slots_for_large_records_keeping_them(pv: ProviderVault) -> None:
    small = pv.write(pair(1), flow_id="f")
    pv.reserve(small)
    assert pv.slot_path(0).stat().st_size == MIN_CAPACITY
    big = pv.write(pair(2, size=3000), flow_id="f")
    assert pv.read() == big
    pv.reserve(big)  # room for four such records before the next request
    sizes = {pv.slot_path(i).stat().st_size for i in (0, 1)}
    assert len(sizes) == 1
    assert sizes.pop() >= 4 * big.size
    assert pv.read() == big
    huge = pv.write(pair(3, size=MIN_CAPACITY * 3), flow_id="f")  # grows on the spot
    assert pv.read() == huge
    assert not list(pv.dir.glob(".*grow"))


@pytest.mark.parametrize(
    ("provider", "dirname"),
    [
        ("dexcom", "dexcom"),
        ("p00042", "p00042"),
        ("my-health_2", "my-health_2"),
        ("Dexcom", "x-446578636f6d"),  # case-insensitive filesystems: no collisions
        ("../etc", "x-2e2e2f657463"),
        (".published", "x-2e7075626c6973686564"),
        ("", "x-"),
    ],
)
def test_provider_directory_names(vault: Vault, provider: str, dirname: str) -> None:
    pv = vault.provider(provider)
    assert pv.dir == vault.root / dirname
    pv.write(pair(1), flow_id=None)
    assert provider in vault.providers()
    assert vault.read(provider) is not None


def test_published_markers(vault: Vault, pv: ProviderVault) -> None:
    assert pv.published_seq() is None
    assert vault.published_signature() is None
    pv.write(pair(1), flow_id="f")
    pv.set_published_seq(1)
    vault.set_published_signature([1, 2, 3, 4])
    assert pv.published_seq() == 1
    assert vault.published_signature() == [1, 2, 3, 4]
    vault.set_published_signature(None)
    assert vault.published_signature() is None
    pv.published_path.write_text("garbage")
    assert pv.published_seq() is None


def test_token_hash_is_a_short_stable_prefix() -> None:
    assert token_hash("abc") == "ba7816bf"
    assert len(token_hash("abc", 16)) == 16
    assert token_hash("abc") != token_hash("abd")


def test_a_failing_disk_raises_storage_error_and_keeps_the_old_record(
    pv: ProviderVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowengine.errors import StorageError

    good = pv.write(pair(1), flow_id="f")

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vault_module, "_pwrite", full)
    with pytest.raises(StorageError) as info:
        pv.write(pair(2), flow_id="f")
    assert "No space left" in str(info.value)
    assert "refresh-2" not in str(info.value)
    monkeypatch.undo()
    assert pv.read() == good


def test_remove_forgets_the_provider(vault: Vault, pv: ProviderVault) -> None:
    pv.write(pair(1), flow_id="f")
    pv.set_published_seq(1)
    with pv.locked():
        pass
    pv.remove()
    assert pv.read() is None
    assert vault.providers() == []
