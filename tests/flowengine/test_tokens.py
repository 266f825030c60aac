from __future__ import annotations

import json
import multiprocessing
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from flowengine import paths
from flowengine.errors import TokenFileCorruptError
from flowengine.tokens import TokenSet, TokenStore

NOW = 1_800_000_000_000


def _tokens(
    access: str = "acc-1", refresh: str | None = "ref-1", expires: int | None = NOW
) -> TokenSet:
    return TokenSet(access=access, refresh=refresh, expires=expires, obtained_at=NOW - 1000)


def test_from_response_full() -> None:
    t = TokenSet.from_response(
        {
            "access_token": "a",
            "refresh_token": "r",
            "expires_in": 7200,
            "token_type": "bearer",
            "scope": "offline_access",
        },
        now_ms=NOW,
    )
    assert (t.access, t.refresh, t.expires, t.token_type, t.scope, t.obtained_at) == (
        "a",
        "r",
        NOW + 7_200_000,
        "bearer",
        "offline_access",
        NOW,
    )


@pytest.mark.parametrize(
    ("data", "default", "expected"),
    [
        ({"access_token": "a"}, None, None),
        ({"access_token": "a"}, 3600, NOW + 3_600_000),
        ({"access_token": "a", "expires_in": "60"}, None, NOW + 60_000),
        ({"access_token": "a", "expires_in": "soon"}, None, None),
        ({"access_token": "a", "expires_in": 0}, None, None),
    ],
)
def test_from_response_expiry(
    data: dict[str, object], default: int | None, expected: int | None
) -> None:
    assert TokenSet.from_response(data, now_ms=NOW, default_lifetime=default).expires == expected


def test_from_response_keeps_previous_refresh_when_none_returned() -> None:
    t = TokenSet.from_response({"access_token": "a"}, now_ms=NOW, previous_refresh="old")
    assert t.refresh == "old"
    t = TokenSet.from_response(
        {"access_token": "a", "refresh_token": "new"}, now_ms=NOW, previous_refresh="old"
    )
    assert t.refresh == "new"


def test_from_response_without_access_token_is_refused() -> None:
    with pytest.raises(ValueError, match="access_token"):
        TokenSet.from_response({"refresh_token": "r"}, now_ms=NOW)


def test_repr_hides_tokens() -> None:
    text = repr(_tokens("ACCESS-SECRET", "REFRESH-SECRET"))
    assert "ACCESS-SECRET" not in text
    assert "REFRESH-SECRET" not in text


def test_validity_with_leeway() -> None:
    t = _tokens(expires=NOW + 30_000)
    assert t.is_valid(NOW)
    assert not t.is_valid(NOW, leeway_ms=60_000)
    assert _tokens(expires=None).is_valid(NOW, leeway_ms=10**9)


def test_write_read_round_trip_in_runtime_format() -> None:
    store = TokenStore()
    assert store.path == paths.auth_file()
    assert store.read("dexcom") is None
    store.write("dexcom", _tokens(), flow_id="f1")
    raw = json.loads(store.path.read_text(encoding="utf-8"))
    assert raw == {
        "dexcom": {
            "type": "oauth",
            "access": "acc-1",
            "refresh": "ref-1",
            "expires": NOW,
            "token_type": "Bearer",
            "scope": None,
            "obtained_at": NOW - 1000,
            "flow_id": "f1",
        }
    }
    back = store.read("dexcom")
    assert back is not None
    assert (back.access, back.refresh, back.expires, back.flow_id) == ("acc-1", "ref-1", NOW, "f1")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["auth.json", "auth.json.lock"]


def test_foreign_entries_and_unknown_fields_are_preserved(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(
        json.dumps(
            {
                "anthropic": {"type": "api", "key": "k"},
                "dexcom": {"access": "x", "refresh": "y", "expires": 1, "custom": [1, 2]},
            }
        ),
        encoding="utf-8",
    )
    store = TokenStore(path)
    store.write("dexcom", _tokens("new-a", "new-r"))
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["anthropic"] == {"type": "api", "key": "k"}
    assert raw["dexcom"]["custom"] == [1, 2]
    assert raw["dexcom"]["access"] == "new-a"
    assert store.delete("dexcom") is True
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "anthropic": {"type": "api", "key": "k"}
    }
    assert store.delete("dexcom") is False


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", "\xff\xfe"])
def test_corrupt_file_is_never_overwritten(tmp_path: Path, content: str) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(content.encode("latin-1"))
    store = TokenStore(path)
    with pytest.raises(TokenFileCorruptError) as info:
        store.write("dexcom", _tokens())
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content.encode("latin-1")
    with pytest.raises(TokenFileCorruptError):
        store.delete("dexcom")
    assert path.read_bytes() == content.encode("latin-1")


def test_entry_without_access_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text('{"dexcom": {"refresh": "r"}, "x": 3}', encoding="utf-8")
    store = TokenStore(path)
    assert store.read("dexcom") is None
    assert store.read("x") is None


def _writer(path: str, worker: int, count: int) -> None:
    store = TokenStore(path)
    for i in range(count):
        store.write(f"p{worker}-{i}", TokenSet(access=f"a{worker}-{i}"))


def test_concurrent_writers_in_several_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    ctx: Any = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    _writer(str(path), 9, 15)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    data = json.loads(path.read_text(encoding="utf-8"))
    assert len(data) == 75
    assert data["p3-14"]["access"] == "a3-14"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.anyio
async def test_async_lock_excludes_a_sync_holder(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "auth.json")
    order: list[str] = []
    holding = threading.Event()

    def sync_holder() -> None:
        with store.locked_sync():
            order.append("sync-in")
            holding.set()
            import time

            time.sleep(0.2)
            order.append("sync-out")

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, sync_holder)
        await anyio.to_thread.run_sync(holding.wait, 60)  # the thread holds the flock
        async with store.locked():
            order.append("async-in")
            store.write_unlocked("x", TokenSet(access="a"))
    assert order == ["sync-in", "sync-out", "async-in"]
    assert store.read("x") is not None


# ------------------------------------------------------------------ the published view


def _publish(store: TokenStore, updates: dict[str, object]) -> tuple[list[str], bool]:
    changed, signature, wrote = store.publish(lambda data, sig: updates)  # type: ignore[arg-type,return-value]
    assert signature == store.signature()
    return changed, wrote


def test_publish_sets_and_removes_entries_keeping_everyone_elses(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(
        json.dumps(
            {
                "anthropic": {"type": "api", "key": "k"},
                "dexcom": {"access": "old", "refresh": "r", "expires": 1, "note": "mine"},
                "oura": {"access": "o"},
            }
        )
    )
    store = TokenStore(path)
    changed, wrote = _publish(store, {"dexcom": (_tokens("new-a", "new-r"), "f1"), "oura": None})
    assert (sorted(changed), wrote) == (["dexcom", "oura"], True)
    data = json.loads(path.read_text())
    assert data["anthropic"] == {"type": "api", "key": "k"}
    assert data["dexcom"]["note"] == "mine"
    assert (data["dexcom"]["access"], data["dexcom"]["flow_id"]) == ("new-a", "f1")
    assert "oura" not in data
    # one entry per line, sorted: readable, and fast to write with many entries
    assert path.read_text().splitlines()[1].startswith('  "anthropic": {')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_publish_without_a_change_does_not_rewrite(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "auth.json")
    _publish(store, {"dexcom": (_tokens(), "f1")})
    before = store.signature()
    changed, wrote = _publish(store, {"dexcom": (_tokens(), "f1"), "absent": None})
    assert (changed, wrote) == ([], False)
    assert store.signature() == before


def test_signature_changes_with_every_rewrite(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "auth.json")
    assert store.signature() is None
    _publish(store, {"dexcom": (_tokens("a1"), None)})
    first = store.signature()
    _publish(store, {"dexcom": (_tokens("a2"), None)})
    assert store.signature() != first


@pytest.mark.parametrize("relative", [True, False])
def test_a_symlinked_auth_json_keeps_its_link(tmp_path: Path, relative: bool) -> None:
    real_dir = tmp_path / "dotfiles"
    real_dir.mkdir()
    target = real_dir / "agent-auth.json"
    target.write_text(json.dumps({"anthropic": {"type": "api", "key": "k"}}))
    link = tmp_path / "data" / "auth.json"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(target, link.parent) if relative else target)
    store = TokenStore(link)
    store.write("dexcom", _tokens("a1"))
    _publish(store, {"dexcom": (_tokens("a2"), "f")})
    assert link.is_symlink()
    assert json.loads(target.read_text())["dexcom"]["access"] == "a2"
    assert json.loads(target.read_text())["anthropic"] == {"type": "api", "key": "k"}
    assert store.read("dexcom") == TokenSet.from_entry(json.loads(target.read_text())["dexcom"])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert store.delete("dexcom")
    assert link.is_symlink()
    assert [p.name for p in real_dir.iterdir()] == ["agent-auth.json"]  # no temp files left


def test_a_dangling_symlink_gets_its_target_created(tmp_path: Path) -> None:
    link = tmp_path / "auth.json"
    link.symlink_to(tmp_path / "elsewhere" / "auth.json")
    TokenStore(link).write("dexcom", _tokens())
    assert link.is_symlink()
    assert json.loads((tmp_path / "elsewhere" / "auth.json").read_text())["dexcom"]


def test_remove_orphans_deletes_only_temp_files_of_auth_json(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    store = TokenStore(path)
    store.write("dexcom", _tokens())
    leftovers = [tmp_path / ".auth.json.abc123.tmp", tmp_path / ".auth.json.zz.tmp"]
    for leftover in leftovers:
        leftover.write_text('{"dexcom": {"access": "half"}}')
    keep = [tmp_path / ".other.json.x.tmp", tmp_path / "auth.json.bak"]
    for other in keep:
        other.write_text("x")
    assert store.remove_orphans() == 2
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in keep)
    assert store.read("dexcom") is not None
