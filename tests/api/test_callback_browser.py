"""The callback page in headless Chromium: what a person sees, plus screenshots.

The daemon completes the flow itself (a Broker with tests/fakes.FakeProvider as the token
endpoint): the page shows connected or why not ❌, and never claims success before the
tokens are stored. Screenshots go to test-artifacts/ (gitignored). Served over plain
HTTP on loopback (plain-test mode), so no certificate trust is involved.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import anyio
import httpx
import pytest

from api.app import create_app
from api.serve import ServePlan, serve
from api.settings import ApiSettings
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.states import FlowState
from flowengine.tokens import TokenStore
from tests.conftest import real_peer_missing
from tests.e2e.browser import HEADLESS
from tests.fakes import FakeProvider

from .conftest import TOKEN, start_flow

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
_PROFILES = itertools.count()
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:  # pragma: no cover
    pytest.skip(real_peer_missing("chromium", "apt-get install chromium"), allow_module_level=True)


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture(name="broker")
async def _broker(
    engine: FlowEngine, catalog: Catalog, fake: FakeProvider, tmp_path: Path
) -> AsyncIterator[Broker]:
    creds = CredentialStore(tmp_path / "credentials.json")
    creds.put("fake", fake.credentials())
    catalog = catalog.with_override(fake.spec(name="Dexcom Sandbox"))
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        yield Broker(
            engine,
            catalog=catalog,
            credentials=creds,
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )


@pytest.fixture(name="server")
async def _server(engine: FlowEngine, broker: Broker) -> AsyncIterator[ServePlan]:
    settings = ApiSettings(mode="plain-test", port=0, api_token=TOKEN)
    app = create_app(engine, settings=settings, catalog=broker.catalog, broker=broker)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        plan = await tg.start(partial(serve, app, settings, shutdown_trigger=stop.wait))
        yield plan
        stop.set()


async def daemon_flow(broker: Broker, fake: FakeProvider, plan: ServePlan) -> tuple[str, str, str]:
    """A flow the daemon completes; (flow id, state, the code the provider redirects with)."""
    start = await broker.begin("fake", redirect_uri=plan.redirect_uri, actor="test")
    verifier = await broker.engine.code_verifier(start.flow.id)
    code = fake.issue_code(redirect_uri=plan.redirect_uri, code_verifier=verifier)
    return start.flow.id, start.state, code


async def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    profile = tmp_path / f"profile-{next(_PROFILES)}"
    args = [
        CHROMIUM,
        *HEADLESS,
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


async def test_connected_page_shows_only_after_the_tokens_are_stored(
    server: ServePlan, broker: Broker, fake: FakeProvider, engine: FlowEngine, tmp_path: Path
) -> None:
    flow_id, state, code = await daemon_flow(broker, fake, server)
    dom = await chromium(tmp_path, callback_url(server, code=code, state=state), "--dump-dom")
    assert "Dexcom Sandbox connected — you can close this tab" in dom
    assert code not in dom
    # the page was rendered after the exchange: the flow was stored by then
    assert (await engine.get_flow(flow_id)).state is FlowState.STORED
    assert fake.grants("authorization_code") == 1

    ARTIFACTS.mkdir(exist_ok=True)
    flow_id, state, code = await daemon_flow(broker, fake, server)
    shot = ARTIFACTS / "callback-connected.png"
    shot.unlink(missing_ok=True)
    await chromium(tmp_path, callback_url(server, code=code, state=state), f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await engine.get_flow(flow_id)).state is FlowState.STORED


async def test_a_failed_exchange_shows_the_reason(
    server: ServePlan, broker: Broker, fake: FakeProvider, engine: FlowEngine, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    flow_id, state, code = await daemon_flow(broker, fake, server)
    fake.fail_next(
        httpx.Response(
            400, json={"error": "invalid_grant", "error_description": "The code has expired"}
        )
    )
    shot = ARTIFACTS / "callback-exchange-failed.png"
    shot.unlink(missing_ok=True)
    await chromium(tmp_path, callback_url(server, code=code, state=state), f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await engine.get_flow(flow_id)).state is FlowState.FAILED
    flow_id, state, code = await daemon_flow(broker, fake, server)
    fake.fail_next(
        httpx.Response(
            400, json={"error": "invalid_grant", "error_description": "The code has expired"}
        )
    )
    dom = await chromium(tmp_path, callback_url(server, code=code, state=state), "--dump-dom")
    assert "Dexcom Sandbox was not connected" in dom
    assert "exchanging the authorization with Dexcom Sandbox failed" in dom
    assert "invalid_grant" in dom
    assert "refused the code exchange" in dom
    assert "connected — you can close" not in dom


async def test_received_page_when_the_client_exchanges_itself(
    server: ServePlan, engine: FlowEngine, tmp_path: Path
) -> None:
    """A flow started with exchange="client": the page can only say it was received."""
    first = await start_flow(engine, "dexcom", exchange="client")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "callback-received.png"
    shot.unlink(missing_ok=True)
    await chromium(
        tmp_path,
        callback_url(server, code="browser-code", state=first.state),
        f"--screenshot={shot}",
    )
    assert (await engine.get_flow(first.flow.id)).state is FlowState.CODE_RECEIVED
    second = await start_flow(engine, "dexcom", exchange="client")
    dom = await chromium(
        tmp_path, callback_url(server, code="browser-code-2", state=second.state), "--dump-dom"
    )
    assert "Authorization received" in dom
    assert "connected —" not in dom
    assert "browser-code" not in dom


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
