"""The Broker's connect-anything paths on a simulated resource and authorization server.

What the real servers in tests/e2e/test_anything.py cannot easily show: a server without a
registration endpoint (credentials stored by hand), a server that cannot be reached when a
connect validates its metadata again, a token endpoint that moved (seen after a failed
refresh), and a provider another process discovered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from flowengine.broker import Broker, Outcome
from flowengine.catalog import Catalog, load_catalog
from flowengine.clock import ManualClock
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.engine import FlowEngine
from flowengine.errors import CredentialsMissingError, UnknownProviderError
from flowengine.protocol import CallbackParams
from flowengine.tokens import TokenStore

pytestmark = pytest.mark.anyio

RESOURCE = "https://mcp.test/mcp"
ISSUER = "https://auth.test"
REDIRECT = "https://box.tailnet.ts.net:8400/oauth/callback"


@dataclass
class Site:
    """An MCP server and its authorization server, answering from mutable tables."""

    registration: bool = True
    token_path: str = "/token"
    down: bool = False
    seen: list[tuple[str, str]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    issued: int = 0

    def metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "issuer": ISSUER,
            "authorization_endpoint": f"{ISSUER}/authorize",
            "token_endpoint": f"{ISSUER}{self.token_path}",
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["offline_access"],
        }
        if self.registration:
            data["registration_endpoint"] = f"{ISSUER}/register"
        return data

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url).split("?")[0]
        self.seen.append((request.method, url))
        if self.down:
            raise httpx.ConnectError("unreachable", request=request)
        if url == RESOURCE:
            return httpx.Response(
                401,
                headers={"WWW-Authenticate": 'Bearer resource_metadata="https://mcp.test/prm"'},
            )
        if url == "https://mcp.test/prm":
            return httpx.Response(
                200,
                json={"resource": RESOURCE, "authorization_servers": [ISSUER]},
            )
        if url == f"{ISSUER}/.well-known/oauth-authorization-server":
            return httpx.Response(200, json=self.metadata())
        if url == f"{ISSUER}/register" and self.registration:
            return httpx.Response(
                201,
                json={
                    "client_id": "dyn-1",
                    "token_endpoint_auth_method": "none",
                    **json.loads(request.content),
                },
            )
        if request.method == "POST" and url == f"{ISSUER}{self.token_path}":
            form = dict(parse_qsl(request.content.decode()))
            self.forms.append(form)
            self.issued += 1
            return httpx.Response(
                200,
                json={
                    "access_token": f"at-{self.issued}",
                    "refresh_token": f"rt-{self.issued}",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                },
            )
        return httpx.Response(404, json={"error": "not_found"})


@dataclass
class Rig:
    broker: Broker
    site: Site
    root: Path
    clock: ManualClock


@pytest.fixture(name="site")
def _site() -> Site:
    return Site()


@pytest.fixture(name="rig")
async def _rig(tmp_path: Path, site: Site) -> AsyncIterator[Rig]:
    clock = ManualClock(1_800_000_000.0)
    engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
    async with httpx.AsyncClient(transport=httpx.MockTransport(site.handler)) as http:
        broker = Broker(
            engine,
            catalog=Catalog(),
            credentials=CredentialStore(tmp_path / "credentials.json"),
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )
        try:
            yield Rig(broker, site, tmp_path, clock)
        finally:
            await engine.close()


async def connect(rig: Rig, provider: str) -> None:
    start = await rig.broker.begin(provider, redirect_uri=REDIRECT, actor="test")
    await rig.broker.engine.record_callback(CallbackParams(state=start.state, code="c-1"))
    await rig.broker.complete_state(start.state, actor="test")


async def test_provider_for_takes_ids_and_urls(rig: Rig) -> None:
    rig.broker.catalog.register(load_catalog().get("dexcom"))
    assert await rig.broker.provider_for("dexcom", redirect_uri=None, actor="test") == "dexcom"
    with pytest.raises(UnknownProviderError):
        await rig.broker.provider_for("dexcomm", redirect_uri=None, actor="test")
    pid = await rig.broker.provider_for(RESOURCE, redirect_uri=REDIRECT, actor="test")
    assert pid == "mcp-test"
    assert rig.broker.is_discovered(pid)
    assert not rig.broker.is_discovered("dexcom")


async def test_without_a_registration_endpoint_credentials_are_stored_by_hand(
    rig: Rig, site: Site
) -> None:
    site.registration = False
    with pytest.raises(CredentialsMissingError) as info:
        await rig.broker.adopt(RESOURCE, redirect_uri=REDIRECT, actor="test")
    assert info.value.provider == "mcp-test"
    assert info.value.needs_secret is False  # the server takes public clients
    # the entry is kept: the owner stores the client under its id, then connects
    assert rig.broker.catalog.get("mcp-test").resource == RESOURCE
    assert json.loads((rig.root / "discovered.json").read_text())["providers"]["mcp-test"]
    with pytest.raises(CredentialsMissingError):
        await rig.broker.begin("mcp-test", redirect_uri=REDIRECT, actor="test")
    rig.broker.credentials.put("mcp-test", ClientCredentials("by-hand"))
    adopted = await rig.broker.adopt(RESOURCE, redirect_uri=REDIRECT, actor="test")
    assert adopted.registration is None
    assert adopted.spec.token_auth_method == "none"
    await connect(rig, "mcp-test")
    assert site.forms[-1]["client_id"] == "by-hand"
    assert site.forms[-1]["resource"] == RESOURCE


async def test_an_unreachable_server_does_not_stop_a_connect(rig: Rig, site: Site) -> None:
    await rig.broker.adopt(RESOURCE, redirect_uri=REDIRECT, actor="test")
    site.down = True
    rig.broker._validated.clear()
    start = await rig.broker.begin("mcp-test", redirect_uri=REDIRECT, actor="test")
    assert start.authorize_url.startswith(f"{ISSUER}/authorize?")
    assert "resource=https%3A%2F%2Fmcp.test%2Fmcp" in start.authorize_url


async def test_a_moved_token_endpoint_is_found_after_a_failed_refresh(rig: Rig, site: Site) -> None:
    await rig.broker.adopt(RESOURCE, redirect_uri=REDIRECT, actor="test")
    await connect(rig, "mcp-test")
    site.token_path = "/v2/token"  # the old one answers 404 now
    outcome = await rig.broker.renew("mcp-test", actor="timer", force=True)
    assert outcome.outcome is Outcome.REFRESHED
    assert rig.broker.catalog.get("mcp-test").token_url == f"{ISSUER}/v2/token"
    assert site.forms[-1]["grant_type"] == "refresh_token"
    assert site.forms[-1]["resource"] == RESOURCE
    stored = json.loads((rig.root / "discovered.json").read_text())["providers"]["mcp-test"]
    assert stored["spec"]["token_url"] == f"{ISSUER}/v2/token"
    # the same failure again within ten minutes is not looked into again
    site.token_path = "/v3/token"
    again = await rig.broker.renew("mcp-test", actor="timer", force=True)
    assert again.outcome is Outcome.RETRY
    metadata_fetches = [u for _, u in site.seen if u.endswith("oauth-authorization-server")]
    assert len(metadata_fetches) == 2  # adopt, then once after the first failure


async def test_a_provider_another_process_discovered_is_loaded(rig: Rig, tmp_path: Path) -> None:
    other_engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=rig.clock)
    try:
        other = Broker(
            other_engine,
            catalog=Catalog(),
            credentials=CredentialStore(tmp_path / "credentials.json"),
            tokens=TokenStore(tmp_path / "auth.json"),
            http=rig.broker._client(),
        )
        await other.adopt(RESOURCE, redirect_uri=REDIRECT, actor="test")
    finally:
        await other_engine.close()
    assert "mcp-test" not in rig.broker.catalog
    start = await rig.broker.begin("mcp-test", redirect_uri=REDIRECT, actor="test")
    assert start.spec.resource == RESOURCE
    assert len([u for _, u in rig.site.seen if u.endswith("/register")]) == 1
