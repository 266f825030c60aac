"""Shared fixtures: asyncio as the only anyio backend, isolated XDG directories."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(name="anyio_backend")
def _anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(name="isolated_env", autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every XDG path (and auth.json) into tmp_path so no test touches the real home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    for name in ("AGENT_AUTH_FILE", "AGENTD_CONFIG", "AGENTD_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home
