"""Tokens that survive: real processes killed with SIGKILL at every step of a refresh.

Against the project's simulated provider with strict rotation (a used refresh token is
dead), the real ``agentd token`` command, real files. See crash_rig.py for how each kill
point is reached deterministically. Also: a full disk (a small tmpfs), a foreign writer
without the lock, a symlinked auth.json, and 30 processes with 10-second tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from agentd.config import load_config
from agentd.context import open_context
from flowengine.broker import Outcome
from flowengine.catalog import load_catalog
from flowengine.states import FlowState
from flowengine.vault import Vault, vault_root
from tests.flowengine.crash_rig import (
    EXCHANGE_POINT,
    HOLD,
    REFRESH_POINTS,
    CrashRig,
)

pytestmark = pytest.mark.slow


@pytest.fixture(name="rig")
def _rig(tmp_path: Path) -> Iterator[CrashRig]:
    rig = CrashRig(tmp_path / "agentd")
    try:
        rig.connected()
        yield rig
    finally:
        rig.close()


def _flow_state(rig: CrashRig) -> tuple[FlowState, str | None]:
    async def read() -> tuple[FlowState, str | None]:
        config = load_config(rig.instance.config_file, env=rig.env())
        async with open_context(config) as ctx:
            flow = await ctx.engine.connection("dexcom")
            assert flow is not None
            return flow.state, flow.error_code

    return anyio.run(read)


def _notifications(rig: CrashRig) -> list[tuple[str, str | None]]:
    async def read() -> list[tuple[str, str | None]]:
        config = load_config(rig.instance.config_file, env=rig.env())
        async with open_context(config) as ctx:
            return [(n.kind, n.reason) for n in await ctx.engine.notifications()]

    return anyio.run(read)


@pytest.mark.parametrize(
    ("label", "stop_at"), [p for p in REFRESH_POINTS if p[1] != HOLD], ids=lambda x: str(x)
)
def test_a_kill_after_the_answer_reached_the_process_loses_nothing(
    rig: CrashRig, label: str, stop_at: str
) -> None:
    rig.make_due()
    before = rig.refreshes()
    rig.kill_at(stop_at)
    sent = rig.refreshes() - before
    assert sent == (0 if stop_at == "refresh.intent" else 1)
    verdict = rig.judge(label)
    assert not verdict.lost, verdict.detail
    # the recovery sent the request only when the dead process had not (then the judge's
    # own refresh): a captured answer is used, never asked for twice
    assert rig.refreshes() - before == 2
    assert _flow_state(rig) == (FlowState.STORED, None)
    assert _notifications(rig) == []


def test_an_answer_lost_on_the_wire_ends_in_expired_with_a_reason(rig: CrashRig) -> None:
    """The window that remains: the provider rotated, the answer never reached us."""
    rig.make_due()
    before = rig.refreshes()
    rig.kill_at(HOLD)
    result = rig.token()
    assert result.returncode == 4, result.stderr  # re-authorization required
    assert "lost in transit" in result.stderr
    assert "agentd connect dexcom" in result.stderr
    assert rig.refreshes() - before == 2  # the lost one and exactly one retry
    assert _flow_state(rig) == (FlowState.EXPIRED, "answer_lost")
    assert _notifications(rig) == [("expired", "answer_lost")]
    # never again: asking once more does not hammer the provider
    assert rig.token().returncode == 4
    assert rig.refreshes() - before == 2


def test_a_kill_right_after_the_exchange_answer_keeps_the_new_connection(
    rig: CrashRig,
) -> None:
    label, stop_at = EXCHANGE_POINT
    rig.kill_connect_at(stop_at)  # a second connect (reconnect), killed after its answer
    verdict = rig.judge(label)
    assert not verdict.lost, verdict.detail
    assert _flow_state(rig) == (FlowState.STORED, None)


# ------------------------------------------------------------------ a full disk


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> Path:
    """Fill the filesystem of ``path`` to the last byte; the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            block = bytes(size)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="No space left"):
        (path / "probe").write_bytes(b"x")
    return filler


def test_a_full_disk_after_the_provider_rotated_loses_nothing(tmp_path: Path) -> None:
    small = tmp_path / "small"
    with _tmpfs(small, "2m"):
        rig = CrashRig(
            tmp_path / "agentd", state_dir=small / "state", auth_file=small / "auth.json"
        )
        try:
            rig.connected()
            rig.make_due()
            old = rig.instance.auth_entries()["dexcom"]
            rig.holder.holding.clear()
            rig.holder.release.clear()
            rig.holder.armed = True
            process = rig.token_process()
            assert rig.holder.holding.wait(60), "the refresh never reached the provider"
            # the provider has rotated and holds the answer: now the disk is full
            filler = _fill(small)
            rig.holder.release.set()
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            access = out.strip()
            assert access != old["access"]
            assert rig.works_at_provider(access)
            record = Vault(vault_root(small / "state")).read("dexcom")
            assert record is not None
            assert record.tokens is not None
            assert record.tokens.access == access  # in the vault, on the full disk
            assert "cannot publish to auth.json" in err  # the view could not follow
            assert rig.instance.auth_entries()["dexcom"]["access"] == old["access"]
            # space again: the next read publishes, the ledger catches up, refresh works
            filler.unlink()
            verdict = rig.judge("full disk")
            assert not verdict.lost, verdict.detail
            assert _flow_state(rig)[0] is FlowState.STORED
        finally:
            rig.close()


# -------------------------------------------------------- a foreign writer, no lock


FOREIGN_WRITER = r"""
import json, os, sys, random
path, stop = sys.argv[1], sys.argv[2]
random.seed(7)
seen, n = [], 0
while not os.path.exists(stop):
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        continue
    seen = (seen + [data])[-20:]
    n += 1
    # half the time a stale copy from a while ago is put back (the rollback)
    out = random.choice(seen) if random.random() < 0.5 else data
    out = dict(out, runtime={"type": "api", "key": "k", "n": n})
    tmp = path + ".runtime-tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh)
    os.replace(tmp, path)
print(n)
"""


def test_a_foreign_writer_without_the_lock_during_200_refreshes(rig: CrashRig) -> None:
    stop = rig.root / "stop-writer"
    writer = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_WRITER, str(rig.instance.auth_file), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )

    async def refresh_200() -> list[Outcome]:
        config = load_config(rig.instance.config_file, env=rig.env())
        catalog = load_catalog(rig.instance.config_home / "agent" / "providers.toml")
        async with (
            httpx.AsyncClient(verify=rig.instance.ssl_context()) as http,
            open_context(config, http=http, catalog=catalog) as ctx,
        ):
            outcomes = []
            for _ in range(200):
                outcome = await ctx.broker.renew("dexcom", actor="cli", force=True)
                outcomes.append(outcome.outcome)
            return outcomes

    try:
        before = rig.refreshes()
        outcomes = anyio.run(refresh_200)
    finally:
        stop.touch()
        writes = int(writer.communicate(timeout=30)[0] or 0)
    assert writes > 0
    assert outcomes.count(Outcome.REAUTHORIZE) == 0
    assert outcomes == [Outcome.REFRESHED] * 200
    assert rig.refreshes() - before == 200
    # the next read puts our entry back and keeps the runtime's
    verdict = rig.judge("foreign writer")
    assert not verdict.lost, verdict.detail
    assert rig.instance.auth_entries()["runtime"]["type"] == "api"


# --------------------------------------------------------------- a symlinked file


def test_a_symlinked_auth_json_keeps_its_link(tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "agent-auth.json"
    target.parent.mkdir()
    link = tmp_path / "agentd" / "data" / "auth.json"
    rig = CrashRig(tmp_path / "agentd")
    try:
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        target.write_text(json.dumps({"runtime": {"type": "api", "key": "k"}}))
        rig.connected()
        rig.make_due()
        result = rig.token()
        assert result.returncode == 0, result.stderr
        assert link.is_symlink()
        data = json.loads(target.read_text())
        assert data["dexcom"]["access"] == result.stdout.strip()
        assert data["runtime"] == {"type": "api", "key": "k"}
        rig.make_due()
        rig.kill_at("publish.rename")  # a kill mid-publish does not break the link either
        verdict = rig.judge("symlink")
        assert not verdict.lost, verdict.detail
        assert link.is_symlink()
        disconnect = rig.instance.run("disconnect", "dexcom", env=rig.env())
        assert disconnect.returncode == 0, disconnect.stderr
        assert link.is_symlink()
        assert "dexcom" not in json.loads(target.read_text())
    finally:
        rig.close()


# ------------------------------------------------------- short tokens, many callers


def test_thirty_processes_and_ten_second_tokens_make_one_refresh(tmp_path: Path) -> None:
    rig = CrashRig(tmp_path / "agentd", access_ttl=10)
    try:
        rig.connected()
        rig.make_due()
        go = tmp_path / "go"
        processes = [
            rig.helper("token", str(rig.instance.config_file), "dexcom", str(go)) for _ in range(30)
        ]
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        before = rig.refreshes()
        started = time.monotonic()
        go.touch()
        outputs = [p.communicate(timeout=120) for p in processes]
        elapsed = time.monotonic() - started
        assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
        tokens = {out.strip() for out, _ in outputs}
        # all of them within the new token's 7.5 s before its margin: one refresh
        assert elapsed < 7.5, f"the 30 processes took {elapsed:.1f} s: too slow to judge"
        assert rig.refreshes() - before == 1
        assert len(tokens) == 1
        assert rig.works_at_provider(tokens.pop())
    finally:
        rig.close()
