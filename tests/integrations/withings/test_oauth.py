"""Withings' OAuth quirks through the REAL broker (engine, ledger, auth.json) against the
simulated Withings: every quirk is catalog data read by generic engine hooks, and the
simulator's dialect is written from Withings' documentation, not from the catalog."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from flowengine.broker import Broker
from flowengine.catalog import Catalog, load_catalog
from flowengine.clock import ManualClock
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.engine import FlowEngine
from flowengine.errors import ProviderTransientError, ReauthorizationRequired
from flowengine.protocol import parse_callback
from flowengine.states import FlowState
from flowengine.tokens import TokenStore
from integrations.withings.client import WithingsClient
from integrations.withings.sim import WithingsSim
from tests.fakes import asgi

pytestmark = pytest.mark.anyio

BASE = "https://wbsapi.test"
REDIRECT = "https://broker.example.ts.net/oauth/callback"
NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)


@dataclass
class Stack:
    broker: Broker
    engine: FlowEngine
    sim: SimOAuth
    api: WithingsSim
    clock: ManualClock
    tokens: TokenStore
    http: httpx.AsyncClient


@pytest.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    clock = ManualClock(NOW.timestamp())
    api = WithingsSim(clock=clock)
    app = create_sim_app(
        api=api,
        clock=clock,
        clients={"wid": "wsecret"},
        redirect_uris=[REDIRECT],
        consent="allow",
        refresh_ttl=365 * 86_400,
    )
    spec = dataclasses.replace(
        load_catalog().get("withings"),
        authorize_url=f"{BASE}/oauth2_user/authorize2",
        token_url=f"{BASE}/v2/oauth2",
        api_base_url=BASE,
    )
    engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
    credentials = CredentialStore(tmp_path / "credentials.json")
    credentials.put("withings", ClientCredentials("wid", "wsecret"))
    tokens = TokenStore(tmp_path / "auth.json")
    async with httpx.AsyncClient(transport=asgi(app)) as http:
        broker = Broker(
            engine,
            catalog=Catalog({"withings": spec}),
            credentials=credentials,
            tokens=tokens,
            http=http,
        )
        try:
            yield Stack(broker, engine, get_sim(app), api, clock, tokens, http)
        finally:
            await engine.close()


async def _connect(stack: Stack) -> str:
    start = await stack.broker.begin("withings", redirect_uri=REDIRECT, actor="bot", chat_id=7)
    query = parse_qs(urlsplit(start.authorize_url).query)
    assert query["scope"] == ["user.metrics"]  # comma-separated, no partner-only user.info
    assert "code_challenge" not in query  # Withings documents no PKCE
    redirected = await stack.http.get(start.authorize_url)
    assert redirected.status_code == 302
    # what the daemon's callback route does with the redirect, then the bot's exchange
    callback = parse_qs(urlsplit(redirected.headers["location"]).query)
    await stack.engine.record_callback(parse_callback(callback))
    await stack.broker.complete_state(start.state, actor="bot")
    return str(start.flow.id)


async def test_connect_and_refresh_speak_withings(stack: Stack) -> None:
    flow_id = await _connect(stack)
    stored = stack.tokens.read("withings")
    assert stored is not None
    assert stored.expires == int((NOW + timedelta(hours=3)).timestamp() * 1000)  # expires_in
    assert stored.scope == "user.metrics"
    # the sim refuses a token request without action=requesttoken: both went through
    assert stack.sim.counters.token_requests == {"authorization_code": 1}
    assert stack.sim.counters.token_errors == {}
    rotated = await stack.broker.refresh("withings", actor="timer", force=True)
    assert rotated.refresh != stored.refresh
    assert stack.sim.counters.token_requests["refresh_token"] == 1
    assert stack.sim.counters.token_errors == {}
    flow = await stack.engine.get_flow(flow_id)
    assert flow.state is FlowState.STORED


async def test_a_non_zero_status_in_http_200_is_transient_or_fatal_by_the_catalog(
    stack: Stack,
) -> None:
    flow_id = await _connect(stack)
    before = stack.tokens.read("withings")
    stack.sim.inject(601, in_envelope=True, path_prefix="/v2/oauth2")
    with pytest.raises(ProviderTransientError) as busy:
        await stack.broker.refresh("withings", actor="timer", force=True)
    assert busy.value.oauth_error == "status_601"
    assert busy.value.provider_status == 200
    assert stack.tokens.read("withings") == before  # tokens kept
    flow = await stack.engine.get_flow(flow_id)
    assert (flow.state, flow.error_code) == (FlowState.STORED, "status_601")

    # a year without refreshing: the refresh token is dead, Withings says 503 in the envelope
    stack.clock.advance(366 * 86_400)
    with pytest.raises(ReauthorizationRequired) as gone:
        await stack.broker.refresh("withings", actor="timer", force=True)
    assert gone.value.oauth_error == "status_503"
    flow = await stack.engine.get_flow(flow_id)
    assert flow.state is FlowState.EXPIRED
    (note,) = await stack.engine.notifications()
    assert (note.kind, note.provider, note.chat_id) == ("expired", "withings", 7)


async def test_the_data_api_refreshes_on_a_401_status_and_retries(stack: Stack) -> None:
    await _connect(stack)
    stack.sim.expire_access_tokens()  # auth.json still believes the token is valid
    client = WithingsClient.from_spec(
        stack.broker.catalog.get("withings"),
        stack.broker,
        http=stack.http,
        clock=stack.clock,
        actor="cli",
    )
    weight, pressure = await client.latest()
    assert weight is not None
    assert weight.weight_kg is not None
    assert pressure is not None
    assert pressure.has_blood_pressure
    statuses = [r.status for r in stack.api.requests]
    assert statuses[:2] == [401, 0]  # then the other pages of the year
    assert set(statuses[2:]) <= {0}
    assert stack.sim.counters.token_requests["refresh_token"] == 1
