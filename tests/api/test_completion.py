"""The daemon completes the flows it owns: the callback page, /oauth/pending, starting and
waiting through the API. The provider is tests/fakes.FakeProvider behind httpx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from quart import Quart

from api.app import create_app
from api.serve import ServePlan, serve
from api.settings import ApiSettings
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.states import FlowState
from flowengine.tokens import TokenStore
from tests.fakes import FakeProvider

from .conftest import AUTH, TOKEN

pytestmark = pytest.mark.anyio

REDIRECT = "https://host.tailnet.ts.net:8400/oauth/callback"


@dataclass
class Rig:
    app: Quart
    broker: Broker
    engine: FlowEngine
    fake: FakeProvider
    auth_file: Path

    async def begin(self, **kwargs: Any) -> tuple[str, str, str]:
        """A started flow: (flow id, state, a code the fake provider will accept)."""
        start = await self.broker.begin("fake", redirect_uri=REDIRECT, actor="test", **kwargs)
        verifier = await self.engine.code_verifier(start.flow.id)
        code = self.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
        return start.flow.id, start.state, code

    async def callback(self, state: str, code: str) -> tuple[int, str]:
        response = await self.app.test_client().get(
            "/oauth/callback",
            query_string={"code": code, "state": state},
            scope_base={"client": ("100.90.1.2", 1)},
        )
        return response.status_code, await response.get_data(as_text=True)


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture(name="rig")
async def _rig(engine: FlowEngine, fake: FakeProvider, tmp_path: Path) -> AsyncIterator[Rig]:
    creds = CredentialStore(tmp_path / "credentials.json")
    creds.put("fake", fake.credentials())
    auth_file = tmp_path / "auth.json"
    catalog = Catalog().with_override(fake.spec())
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        broker = Broker(
            engine, catalog=catalog, credentials=creds, tokens=TokenStore(auth_file), http=http
        )
        settings = ApiSettings(mode="tls", api_token=TOKEN, callback_wait=10)
        app = create_app(
            engine, settings=settings, catalog=catalog, broker=broker, redirect_uri=REDIRECT
        )
        async with app.test_app():
            yield Rig(app, broker, engine, fake, auth_file)


async def test_callback_exchanges_at_once_and_shows_connected(rig: Rig) -> None:
    flow_id, state, code = await rig.begin()
    status, page = await rig.callback(state, code)
    assert status == 200
    assert "Fake connected — you can close this tab" in page
    assert code not in page
    flow = await rig.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED
    assert rig.fake.grants("authorization_code") == 1
    entry = json.loads(rig.auth_file.read_text())["fake"]
    assert entry["access"].startswith("a-")
    events = [e.trigger and e.trigger.value for e in (await rig.engine.inspect(flow_id)).events[1:]]
    assert events == ["issue_url", "receive_code", "exchange", "store"]
    assert {e.actor for e in (await rig.engine.inspect(flow_id)).events[2:]} == {"api"}


async def test_callback_shows_why_the_exchange_failed(rig: Rig) -> None:
    flow_id, state, code = await rig.begin()
    rig.fake.fail_next(
        httpx.Response(400, json={"error": "invalid_grant", "error_description": "code expired"})
    )
    status, page = await rig.callback(state, code)
    assert status == 200
    assert "Fake was not connected" in page
    assert "invalid_grant" in page
    assert "Fake connected" not in page
    assert (await rig.engine.get_flow(flow_id)).state is FlowState.FAILED


async def test_a_slow_exchange_gets_a_received_page_then_completes(
    rig: Rig, engine: FlowEngine
) -> None:
    rig.fake.delay = 1.0
    rig.app.extensions["agentd"].settings = ApiSettings(
        mode="tls", api_token=TOKEN, callback_wait=0.05
    )
    flow_id, state, code = await rig.begin()
    status, page = await rig.callback(state, code)
    assert status == 200
    assert "Authorization received" in page
    assert "agentd is finishing the connection to Fake" in page
    # nobody waits on the page any more; the daemon finishes on its own
    flow = await engine.wait_flow(flow_id, until=lambda f: f.state is FlowState.STORED, timeout=30)
    assert flow.state is FlowState.STORED


async def test_pending_answers_the_outcome_and_never_the_code(rig: Rig) -> None:
    rig.fake.scope = "read extra"  # the provider grants more than was asked for
    flow_id, state, code = await rig.begin()
    client = rig.app.test_client()
    waiting = await client.get(f"/oauth/pending/{state}", headers=AUTH)
    assert waiting.status_code == 202
    await rig.callback(state, code)
    done = await client.get(f"/oauth/pending/{state}", query_string={"wait": "5"}, headers=AUTH)
    assert done.status_code == 200
    body = await done.get_json()
    assert (body["status"], body["outcome"], body["flow_id"]) == ("connected", "connected", flow_id)
    assert (body["scopes"], body["scope_source"]) == (["read", "extra"], "granted")
    assert "code" not in body
    assert code not in json.dumps(body)


async def test_pending_hands_the_code_once_to_a_client_that_exchanges_itself(rig: Rig) -> None:
    flow_id, state, code = await rig.begin(exchange="client")
    status, page = await rig.callback(state, code)
    assert "The app that asked for it is finishing the connection" in page
    assert (await rig.engine.get_flow(flow_id)).state is FlowState.CODE_RECEIVED
    assert rig.fake.grants("authorization_code") == 0  # the daemon did not exchange it
    client = rig.app.test_client()
    first = await client.get(f"/oauth/pending/{state}", headers=AUTH)
    assert (first.status_code, (await first.get_json())["code"]) == (200, code)
    again = await client.get(f"/oauth/pending/{state}", headers=AUTH)
    assert again.status_code == 410
    tokens = await rig.broker.complete(flow_id, code, actor="cli")
    assert tokens.access.startswith("a-")


async def test_start_a_flow_and_wait_for_its_outcome_through_the_api(rig: Rig) -> None:
    client = rig.app.test_client()
    peer = {"client": ("100.90.1.2", 1)}
    refused = await client.post("/oauth/flows", json={"provider": "fake"}, scope_base=peer)
    assert refused.status_code == 401
    created = await client.post(
        "/oauth/flows", json={"provider": "fake"}, headers=AUTH, scope_base=peer
    )
    assert created.status_code == 201
    data = await created.get_json()
    assert data["authorize_url"].startswith("https://fake.test/authorize?")
    assert data["redirect_uri"] == REDIRECT
    flow_id = data["flow_id"]
    pending = await client.get(f"/oauth/flows/{flow_id}/outcome", headers=AUTH, scope_base=peer)
    assert (pending.status_code, (await pending.get_json())["outcome"]) == (202, "pending")

    state = dict(httpx.URL(data["authorize_url"]).params)["state"]
    code = rig.fake.issue_code(
        redirect_uri=REDIRECT, code_verifier=await rig.engine.code_verifier(flow_id)
    )

    async def open_link() -> None:
        await anyio.sleep(0.2)
        await rig.callback(state, code)

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_link)
        done = await client.get(
            f"/oauth/flows/{flow_id}/outcome",
            query_string={"wait": "20"},
            headers=AUTH,
            scope_base=peer,
        )
    assert done.status_code == 200
    body = await done.get_json()
    assert (body["outcome"], body["flow_state"], body["provider"]) == (
        "connected",
        "stored",
        "fake",
    )
    flow = await rig.engine.get_flow(flow_id)
    assert flow.actor == "api"


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"provider": 3},
        {"provider": "fake", "scopes": "read"},
        {"provider": "fake", "scopes": [1]},
    ],
)
async def test_start_rejects_bad_bodies(rig: Rig, body: Any) -> None:
    response = await rig.app.test_client().post(
        "/oauth/flows", json=body, headers=AUTH, scope_base={"client": ("100.90.1.2", 1)}
    )
    assert response.status_code == 400


async def test_start_an_unknown_provider_is_an_error(rig: Rig) -> None:
    response = await rig.app.test_client().post(
        "/oauth/flows",
        json={"provider": "nope"},
        headers=AUTH,
        scope_base={"client": ("100.90.1.2", 1)},
    )
    assert response.status_code in (400, 404)
    assert (await response.get_json())["error"] == "unknown_provider"


# ------------------------------------------------------------- real Hypercorn


@pytest.fixture(name="served")
async def _served(rig: Rig, tmp_path: Path) -> AsyncIterator[ServePlan]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ag") as short:
        settings = ApiSettings(
            mode="plain-test", port=0, api_token=TOKEN, local_socket=Path(short) / "agentd.sock"
        )
        rig.app.extensions["agentd"].settings = settings
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            plan = await tg.start(partial(serve, rig.app, settings, shutdown_trigger=stop.wait))
            yield plan
            stop.set()


async def test_the_exchange_survives_the_browser_going_away(rig: Rig, served: ServePlan) -> None:
    """The browser drops the connection mid-exchange; the daemon completes the flow anyway."""
    rig.fake.delay = 1.0
    flow_id, state, code = await rig.begin()
    async with httpx.AsyncClient(base_url=served.base_url) as browser:
        with pytest.raises(httpx.ReadTimeout):
            await browser.get("/oauth/callback", params={"code": code, "state": state}, timeout=0.2)
    flow = await rig.engine.wait_flow(
        flow_id, until=lambda f: f.state is FlowState.STORED, timeout=30
    )
    assert flow.state is FlowState.STORED
    assert rig.fake.grants("authorization_code") == 1


async def test_the_local_socket_needs_no_bearer(rig: Rig, served: ServePlan) -> None:
    transport = httpx.AsyncHTTPTransport(uds=served.local_socket)
    async with httpx.AsyncClient(transport=transport, base_url="http://agentd") as local:
        created = await local.post("/oauth/flows", json={"provider": "fake"})
        assert created.status_code == 201
        flow_id = (await created.aread(), created.json()["flow_id"])[1]
        outcome = await local.get(f"/oauth/flows/{flow_id}/outcome")
        assert outcome.status_code == 202
        assert (await rig.engine.get_flow(flow_id)).actor == "cli"
    mode = (await anyio.Path(served.local_socket).stat()).st_mode
    assert mode & 0o777 == 0o600
    # the same requests over TCP still need the token
    async with httpx.AsyncClient(base_url=served.base_url) as remote:
        assert (await remote.post("/oauth/flows", json={"provider": "fake"})).status_code == 401
