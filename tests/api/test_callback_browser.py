"""The callback page in headless Chromium: what a person sees, plus screenshots.

Screenshots go to test-artifacts/ (gitignored). Served over plain HTTP on loopback
(plain-test mode), so no certificate trust is involved.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import anyio
import pytest

from api.app import create_app
from api.serve import ServePlan, serve
from api.settings import ApiSettings
from flowengine.catalog import Catalog
from flowengine.engine import FlowEngine
from flowengine.states import FlowState
from tests.conftest import real_peer_missing

from .conftest import TOKEN, start_flow

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
_PROFILES = itertools.count()
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:  # pragma: no cover
    pytest.skip(real_peer_missing("chromium", "apt-get install chromium"), allow_module_level=True)


@pytest.fixture(name="server")
async def _server(engine: FlowEngine, catalog: Catalog) -> AsyncIterator[ServePlan]:
    settings = ApiSettings(mode="plain-test", port=0, api_token=TOKEN)
    app = create_app(engine, settings=settings, catalog=catalog)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        plan = await tg.start(partial(serve, app, settings, shutdown_trigger=stop.wait))
        yield plan
        stop.set()


async def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    profile = tmp_path / f"profile-{next(_PROFILES)}"
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=800,560",
        *extra,
        url,
    ]
    with anyio.fail_after(90):
        proc = await anyio.run_process(args, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode()


def callback_url(plan: ServePlan, **params: str) -> str:
    return f"{plan.redirect_uri}?{urlencode(params)}"


async def test_authorized_page_as_a_person_sees_it(
    server: ServePlan, engine: FlowEngine, tmp_path: Path
) -> None:
    first = await start_flow(engine, "dexcom")
    dom = await chromium(
        tmp_path, callback_url(server, code="browser-code", state=first.state), "--dump-dom"
    )
    assert "Authorized Dexcom — you can close this tab" in dom
    assert "browser-code" not in dom
    assert (await engine.get_flow(first.flow.id)).state is FlowState.CODE_RECEIVED

    ARTIFACTS.mkdir(exist_ok=True)
    second = await start_flow(engine, "dexcom")
    shot = ARTIFACTS / "callback-authorized.png"
    shot.unlink(missing_ok=True)
    await chromium(
        tmp_path,
        callback_url(server, code="browser-code-2", state=second.state),
        f"--screenshot={shot}",
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await engine.get_flow(second.flow.id)).state is FlowState.CODE_RECEIVED


async def test_denied_and_invalid_pages(
    server: ServePlan, engine: FlowEngine, tmp_path: Path
) -> None:
    flow = await start_flow(engine, "oura")
    url = callback_url(
        server,
        error="access_denied",
        error_description="The user denied access <script>alert(1)</script>",
        state=flow.state,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "callback-denied.png"
    await chromium(tmp_path, url, f"--screenshot={shot}")
    assert (await engine.get_flow(flow.flow.id)).state is FlowState.FAILED
    # the same link again: the flow is over, a person reads why
    dom = await chromium(tmp_path, url, "--dump-dom")
    assert "This authorization has failed" in dom
    assert "<script>alert(1)" not in dom
    invalid = await chromium(tmp_path, callback_url(server, code="x", state="u" * 43), "--dump-dom")
    assert "This link is not valid" in invalid
