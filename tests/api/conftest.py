"""Fixtures for the API tests: a real ledger file, the engine, the app and its test client."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from api.app import create_app
from api.settings import ApiSettings
from api.tailscale import LocalAPI
from flowengine.catalog import Catalog, load_catalog
from flowengine.clock import ManualClock
from flowengine.engine import FlowEngine
from flowengine.models import StartedFlow

from .fake_tailscale import FakeTailnet, run_localapi

TOKEN = "test-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(name="ledger_file")
def _ledger_file(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture(name="engine")
async def _engine(ledger_file: Path, clock: ManualClock) -> AsyncIterator[FlowEngine]:
    engine = await FlowEngine.open(ledger_file, clock=clock, poll_interval=0.05)
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture(name="catalog")
def _catalog() -> Catalog:
    return load_catalog(None)


@pytest.fixture(name="settings")
def _settings() -> ApiSettings:
    return ApiSettings(mode="plain-test", port=0, api_token=TOKEN)


@pytest.fixture(name="app")
def _app(engine: FlowEngine, settings: ApiSettings, catalog: Catalog) -> Quart:
    return create_app(engine, settings=settings, catalog=catalog)


@pytest.fixture(name="client")
def _client(app: Quart) -> Client:
    return app.test_client()


async def start_flow(
    engine: FlowEngine, provider: str = "dexcom", *, exchange: str = "daemon"
) -> StartedFlow:
    """A flow waiting for its callback (awaiting_code)."""
    started = await engine.start(
        provider,
        redirect_uri="https://host.tailnet.ts.net:8400/oauth/callback",
        actor="test",
        exchange=exchange,
    )
    await engine.issue_url(started.flow.id, actor="test")
    return started


def count_rows(ledger_file: Path) -> dict[str, int]:
    """Rows per table, read with a separate connection (what is really on disk)."""
    with sqlite3.connect(ledger_file) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("flows", "flow_events", "oauth_pending")
        }


@pytest.fixture(name="tailnet")
def _tailnet() -> FakeTailnet:
    return FakeTailnet()


@pytest.fixture(name="localapi_socket")
async def _localapi_socket(tailnet: FakeTailnet) -> AsyncIterator[Path]:
    # unix socket paths are limited to ~108 bytes: keep it short, outside tmp_path
    with tempfile.TemporaryDirectory(prefix="ts") as tmp:
        async with run_localapi(tailnet, Path(tmp) / "tailscaled.sock") as path:
            yield path


@pytest.fixture(name="localapi")
async def _localapi(localapi_socket: Path) -> AsyncIterator[LocalAPI]:
    async with LocalAPI(localapi_socket, timeout=10) as client:
        yield client
