"""Connect anything (issue 13) against a real authorization server and a protected resource.

oidc-provider (tests/e2e/oidc/anything.mjs) with dynamic registration, resource indicators
and the device flow on, several issuers on one HTTPS origin with a private CA; the
protected resource (resource.py) answers 401 with ``resource_metadata`` and checks the
audience of the JWTs it is shown. Everything at the Broker, as the daemon, the bot and the
CLI use it:

* discovery through the resource's challenge and RFC 8414's inserted well-known path,
  through the resource's well-known document and OpenID Connect's appended path, and from
  a bare issuer; an issuer or a resource that is not the one fetched for is refused; plain
  http is refused before any request (the tests' loopback policy is the only way in);
* the registration is stored (0600, with its registration access token) and reused, by
  another Broker too; one that no longer fits is replaced;
* ``resource`` goes with the authorization, token and refresh requests (the provider's log
  says so) and the access token's audience is the resource (the resource accepts it, its
  neighbour does not);
* the device flow approved and denied in headless Chromium, expired, and ``slow_down``
  honoured: the provider's log shows the next poll came 5 s later;
* a discovered provider's metadata is validated again on connect: a change is taken (a new
  authorization server: a new registration there), a document that no longer validates
  stops the connect.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from flowengine.broker import Broker
from flowengine.catalog import load_catalog
from flowengine.credentials import CredentialStore
from flowengine.discovery import LOOPBACK_HTTP_FOR_TESTS, STRICT, DiscoveredStore, discover
from flowengine.engine import FlowEngine
from flowengine.errors import DiscoveryError
from flowengine.protocol import parse_callback
from flowengine.states import FlowState, FlowTrigger
from flowengine.tokens import TokenStore
from tests.e2e.browser import browser, chromium_path
from tests.e2e.conftest import AnythingServer
from tests.e2e.helpers import answer_device, follow_to_redirect
from tests.e2e.resource import ProtectedResource

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REDIRECT = "https://client.example.org/callback"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def claims(token: str) -> dict[str, Any]:
    """The payload of a JWT (the resource verified the signature; this only reads it)."""
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@dataclass
class Rig:
    root: Path
    broker: Broker
    http: httpx.AsyncClient
    server: AnythingServer
    resource: ProtectedResource
    #: how many log lines the server had when the test began
    mark: int

    def log(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.server.log()[self.mark :] if e.get("event") == event]

    def ledger_bytes(self) -> bytes:
        """The ledger file, its -wal and its -shm, as they are on disk."""
        return b"".join(p.read_bytes() for p in sorted(self.root.glob("ledger.sqlite3*")))

    def verify(self) -> Any:
        """The owner's browser trusts the private CA too."""
        return ssl.create_default_context(cafile=str(self.server.ca_file))

    async def another_broker(self) -> Broker:
        """A second Broker on the same files, as another process would open them."""
        engine = await FlowEngine.open(self.root / "ledger.sqlite3")
        return _broker(engine, self.root, self.http)


def _broker(engine: FlowEngine, root: Path, http: httpx.AsyncClient) -> Broker:
    return Broker(
        engine,
        catalog=load_catalog(root / "no-user-catalog.toml", discovered=root / "discovered.json"),
        credentials=CredentialStore(root / "credentials.json"),
        tokens=TokenStore(root / "auth.json"),
        http=http,
    )


@pytest.fixture(name="rig")
async def _rig(
    tmp_path: Path, anything_server: AnythingServer, protected_resource: ProtectedResource
) -> AsyncIterator[Rig]:
    assert anything_server.ca_file is not None
    verify = ssl.create_default_context(cafile=str(anything_server.ca_file))
    async with httpx.AsyncClient(verify=verify, timeout=30) as http:
        engine = await FlowEngine.open(tmp_path / "ledger.sqlite3")
        try:
            yield Rig(
                root=tmp_path,
                broker=_broker(engine, tmp_path, http),
                http=http,
                server=anything_server,
                resource=protected_resource,
                mark=len(anything_server.log()),
            )
        finally:
            await engine.close()


async def connect_code(rig: Rig, provider: str, broker: Broker | None = None) -> Any:
    broker = broker or rig.broker
    start = await broker.begin(provider, redirect_uri=REDIRECT, actor="test")
    query = await follow_to_redirect(start.authorize_url, REDIRECT, verify=rig.verify())
    await broker.engine.record_callback(parse_callback(query), actor="test")
    return await broker.complete_state(start.state, actor="test"), start


# ------------------------------------------------------------------------ discovery


async def test_a_protected_resource_is_discovered_through_its_challenge(rig: Rig) -> None:
    url = rig.resource.url("/mcp")
    seen = len(rig.resource.requests)
    adopted = await rig.broker.adopt(url, redirect_uri=REDIRECT, actor="test")
    found = adopted.discovery
    assert found.via == "challenge"
    # the metadata's location was named only by the 401's WWW-Authenticate
    assert found.resource_metadata_url == rig.resource.url("/meta/mcp")
    assert found.resource == url
    assert found.challenge_scopes == ("mcp:tools",)
    # RFC 8414 §3.1: /.well-known/oauth-authorization-server inserted before the path
    assert found.metadata_url == f"{rig.server.origin}/.well-known/oauth-authorization-server/oauth"
    assert found.issuer == rig.server.issuer("oauth")
    assert rig.resource.requests[seen] == ("GET", "/mcp", False)

    spec = adopted.spec
    host, port = url.split("//")[1].split("/")[0].split(":")
    assert spec.id == f"{host}-{port}"
    assert spec.name == "Test MCP server /mcp"
    assert spec.resource == url
    assert spec.authorize_url == f"{rig.server.issuer('oauth')}/auth"
    assert spec.token_url == f"{rig.server.issuer('oauth')}/token"
    assert spec.device_authorization_url == f"{rig.server.issuer('oauth')}/device/auth"
    assert spec.scopes == ("mcp:tools", "offline_access")
    assert spec.token_auth_method == "none"
    assert spec.use_pkce is True
    # persisted for the owner: a fresh catalog has it
    again = load_catalog(rig.root / "none.toml", discovered=rig.root / "discovered.json")
    assert again.get(spec.id) == spec


async def test_the_well_known_document_and_openid_discovery_are_the_fallbacks(rig: Rig) -> None:
    url = rig.resource.url("/quiet")
    found = await discover(url, client=rig.http)
    assert found.via == "well-known"
    assert found.resource_metadata_url == rig.resource.url(
        "/.well-known/oauth-protected-resource/quiet"
    )
    # /oidc serves neither RFC 8414 location: the OpenID Connect appended path it is
    assert found.metadata_url == f"{rig.server.issuer('oidc')}/.well-known/openid-configuration"
    assert found.issuer == rig.server.issuer("oidc")
    # the probe, the resource's document, the two inserted locations (404), the appended one
    assert found.requests == 5
    assert found.resource == url


async def test_a_bare_issuer_is_discovered_too(rig: Rig) -> None:
    found = await discover(rig.server.issuer("oauth"), client=rig.http)
    assert found.via == "issuer"
    assert found.resource is None
    assert found.issuer == rig.server.issuer("oauth")
    adopted = await rig.broker.adopt(rig.server.issuer("oidc"), redirect_uri=REDIRECT, actor="test")
    assert adopted.spec.resource is None
    assert adopted.spec.issuer == rig.server.issuer("oidc")
    assert adopted.spec.scopes == ("offline_access",)


async def test_an_issuer_that_is_not_the_one_fetched_for_is_refused(rig: Rig) -> None:
    liar = rig.server.issuer("liar")
    with pytest.raises(DiscoveryError) as info:
        await rig.broker.adopt(liar, redirect_uri=REDIRECT, actor="test")
    assert info.value.reason == "issuer_mismatch"
    assert rig.server.issuer("oauth") in info.value.message
    assert liar in info.value.message
    assert not (rig.root / "discovered.json").exists()
    assert rig.log("registration") == []


async def test_metadata_of_another_resource_is_refused(rig: Rig) -> None:
    with pytest.raises(DiscoveryError) as info:
        await rig.broker.adopt(rig.resource.url("/wrong"), redirect_uri=REDIRECT, actor="test")
    assert info.value.reason == "resource_mismatch"
    assert rig.resource.url("/elsewhere") in info.value.message
    assert not (rig.root / "discovered.json").exists()


async def test_only_https_is_fetched(rig: Rig, anything_http_server: AnythingServer) -> None:
    plain = anything_http_server.issuer("oauth")
    assert plain.startswith("http://127.0.0.1:")
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(str(request.url))

    async with httpx.AsyncClient(event_hooks={"request": [count]}, timeout=30) as http:
        with pytest.raises(DiscoveryError) as info:
            await discover(plain, client=http, policy=STRICT)
        assert info.value.reason == "not_https"
        assert sent == []  # refused before anything was sent
        # the same server is fine for the test suite's own policy (loopback only)
        found = await discover(plain, client=http, policy=LOOPBACK_HTTP_FOR_TESTS)
        assert found.issuer == plain
        assert sent
    # a document served over https that names a plain-http endpoint
    with pytest.raises(DiscoveryError) as info:
        await discover(rig.server.issuer("downgrade"), client=rig.http)
    assert info.value.reason == "not_https"
    assert "token_endpoint" in info.value.message


# --------------------------------------------------------------------- registration


async def test_the_registration_is_stored_and_reused(rig: Rig) -> None:
    url = rig.resource.url("/mcp")
    first = await rig.broker.adopt(url, redirect_uri=REDIRECT, actor="test")
    assert first.registered
    assert first.registration is not None
    registrations = rig.log("registration")
    assert [r["status"] for r in registrations] == [201]
    client_id = registrations[0]["client_id"]
    assert first.registration.client_id == client_id

    path = rig.root / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())[first.spec.id]
    assert stored["client_id"] == client_id
    assert "client_secret" not in stored  # a public client
    reg = stored["registration"]
    assert reg["issuer"] == rig.server.issuer("oauth")
    assert reg["token_endpoint_auth_method"] == "none"
    assert reg["redirect_uris"] == [REDIRECT]
    assert "urn:ietf:params:oauth:grant-type:device_code" in reg["grant_types"]
    assert reg["registration_access_token"]
    assert reg["registration_client_uri"].startswith(f"{rig.server.issuer('oauth')}/reg/")
    assert "registration_access_token" not in repr(first.registration)
    assert reg["registration_access_token"] not in (rig.root / "discovered.json").read_text()

    # connected, disconnected, connected again, by another Broker: the same client
    tokens, _ = await connect_code(rig, first.spec.id)
    assert claims(tokens.access)["client_id"] == client_id
    await rig.broker.disconnect(first.spec.id, actor="test")
    other = await rig.another_broker()
    try:
        again = await other.adopt(url, redirect_uri=REDIRECT, actor="test")
        assert not again.registered
        assert again.spec.id == first.spec.id
        tokens, _ = await connect_code(rig, first.spec.id, broker=other)
        assert claims(tokens.access)["client_id"] == client_id
    finally:
        await other.engine.close()
    assert len(rig.log("registration")) == 1

    # another callback (a new MagicDNS name): this registration does not fit, a new one does
    moved = "https://client.example.org/elsewhere/callback"
    replaced = await rig.broker.adopt(url, redirect_uri=moved, actor="test")
    assert replaced.registered
    assert replaced.registration is not None
    assert replaced.registration.client_id != client_id
    assert replaced.registration.redirect_uris == (moved,)
    assert len(rig.log("registration")) == 2


# --------------------------------------------------------------- resource indicators


async def test_resource_goes_with_every_request_and_is_the_audience(rig: Rig) -> None:
    url = rig.resource.url("/mcp")
    pid = await rig.broker.provider_for(url, redirect_uri=REDIRECT, actor="test")
    tokens, start = await connect_code(rig, pid)
    assert httpx.URL(start.authorize_url).params["resource"] == url
    first = claims(tokens.access)
    assert first["aud"] == url
    assert first["iss"] == rig.server.issuer("oauth")
    assert tokens.refresh

    refreshed = await rig.broker.refresh(pid, actor="test", force=True)
    assert claims(refreshed.access)["aud"] == url
    assert refreshed.access != tokens.access

    assert [a["resource"] for a in rig.log("authorize")] == [url]
    token_requests = [(t["grant_type"], t["resource"], t["status"]) for t in rig.log("token")]
    assert token_requests == [("authorization_code", url, 200), ("refresh_token", url, 200)]

    # the resource takes the token; its neighbour (another audience) does not
    ok = await rig.http.get(url, headers={"Authorization": f"Bearer {refreshed.access}"})
    assert ok.status_code == 200
    assert ok.json()["aud"] == url
    other = await rig.http.get(
        rig.resource.url("/quiet"), headers={"Authorization": f"Bearer {refreshed.access}"}
    )
    assert other.status_code == 401
    assert 'error="invalid_token"' in other.headers["www-authenticate"]


# ---------------------------------------------------------------------- device flow


def _secrets_of(rig: Rig, flow_id: str) -> list[tuple[Any, ...]]:
    db = f"file:{rig.root / 'ledger.sqlite3'}?mode=ro"
    with closing(sqlite3.connect(db, uri=True)) as conn:
        return conn.execute("SELECT * FROM flow_secrets WHERE flow_id = ?", (flow_id,)).fetchall()


needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")


async def _device_in_chromium(rig: Rig, *, approve: bool, shot: str) -> tuple[Any, str, str]:
    pid = await rig.broker.provider_for(
        rig.resource.url("/mcp"), redirect_uri=REDIRECT, actor="test", device=True
    )
    start = await rig.broker.begin_device(pid, actor="test")
    assert start.flow.state is FlowState.AWAITING_DEVICE
    assert start.verification_uri == f"{rig.server.issuer('oauth')}/device"
    assert start.verification_uri_complete is not None
    secrets = await rig.broker.engine.device_secrets(start.flow.id)
    assert secrets is not None
    device_code, user_code = secrets
    assert user_code == start.user_code
    pem = (rig.server.ca_file.parent / "cert.pem").read_bytes()  # type: ignore[union-attr]
    page: list[str] = []

    def owner() -> None:
        with browser(rig.root / "profile", trust_pems=(pem,)) as chrome:
            chrome.goto(start.verification_uri_complete or "")
            chrome.wait_for("#approve")
            page.append(chrome.text())
            ARTIFACTS.mkdir(exist_ok=True)
            chrome.screenshot(ARTIFACTS / shot)
            chrome.click("#approve" if approve else "#deny")
            chrome.wait_for("#done" if approve else "#denied")
            page.append(chrome.text())

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, owner)
        outcome = await rig.broker.complete_device(start.flow.id, actor="test")
    assert user_code in page[0]
    assert "agentd-oauth (personal AI agent)" in page[0]
    return outcome, device_code, user_code


@needs_chromium
async def test_device_flow_approved_in_chromium(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    from agentd.logs import QUIET_LIBRARIES

    # DEBUG everywhere, as `agentd -v` has it (libraries that log SQL parameters or request
    # details are held at WARNING by every entry point)
    caplog.set_level(logging.DEBUG)
    levels = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    try:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
        outcome, device_code, user_code = await _device_in_chromium(
            rig, approve=True, shot="device-confirm.png"
        )
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    # neither code reached a log line
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "device authorization" in logged
    assert device_code not in logged
    assert user_code not in logged
    assert outcome.status == "connected"
    assert outcome.flow.state is FlowState.STORED
    assert outcome.tokens is not None
    url = rig.resource.url("/mcp")
    assert claims(outcome.tokens.access)["aud"] == url
    ok = await rig.http.get(url, headers={"Authorization": f"Bearer {outcome.tokens.access}"})
    assert ok.status_code == 200
    # the provider saw the polls; every one came at least the interval after the previous
    polls = rig.log("device_poll")
    assert len(polls) == outcome.polls >= 1
    assert polls[-1]["outcome"] == "tokens"
    assert all(p["gap_ms"] is None or p["gap_ms"] >= 1000 for p in polls)
    assert all(t["resource"] == url for t in rig.log("token"))
    assert [d["resource"] for d in rig.log("device_authorization")] == [url]
    # the ledger: the device path, and no device code or user code left anywhere in it
    record = await rig.broker.engine.inspect(outcome.flow.id)
    assert [e.trigger for e in record.events[1:]] == [
        FlowTrigger.ISSUE_DEVICE_CODE,
        FlowTrigger.EXCHANGE,
        FlowTrigger.STORE,
    ]
    assert record.flow.grant == "device"
    assert _secrets_of(rig, outcome.flow.id) == []
    await rig.broker.engine.ledger.scrub()
    blob = rig.ledger_bytes()
    assert device_code.encode() not in blob
    assert user_code.encode() not in blob
    # refreshed like any other connection, the resource with it
    again = await rig.broker.refresh(outcome.flow.provider, actor="test", force=True)
    assert claims(again.access)["aud"] == url


@needs_chromium
async def test_device_flow_denied_in_chromium(rig: Rig) -> None:
    outcome, device_code, _ = await _device_in_chromium(rig, approve=False, shot="device-deny.png")
    assert outcome.status == "denied"
    assert outcome.error == "access_denied"
    assert outcome.flow.state is FlowState.FAILED
    assert outcome.tokens is None
    assert _secrets_of(rig, outcome.flow.id) == []
    assert rig.log("device_poll")[-1]["outcome"] == "answered"
    assert [t["error"] for t in rig.log("token")][-1] == "access_denied"
    assert await rig.broker.peek(outcome.flow.provider) is None


async def test_device_flow_expires(rig: Rig) -> None:
    pid = await rig.broker.provider_for(
        rig.resource.url("/mcp"), redirect_uri=REDIRECT, actor="test", device=True
    )
    rig.server.control("device-ttl", seconds=3)
    try:
        start = await rig.broker.begin_device(pid, actor="test")
    finally:
        rig.server.control("device-ttl", seconds=600)
    with anyio.fail_after(60):
        outcome = await rig.broker.complete_device(start.flow.id, actor="test")
    assert outcome.status == "expired"
    assert outcome.flow.state is FlowState.EXPIRED
    # the provider said so: one poll goes out just after the code's announced end
    assert outcome.error == "expired_token"
    assert rig.log("token")[-1]["error"] == "expired_token"
    assert _secrets_of(rig, start.flow.id) == []


async def test_slow_down_makes_the_next_poll_5_s_later(rig: Rig) -> None:
    pid = await rig.broker.provider_for(
        rig.resource.url("/mcp"), redirect_uri=REDIRECT, actor="test", device=True
    )
    rig.server.control("slow-down", count=1)
    start = await rig.broker.begin_device(pid, actor="test")
    assert start.interval == 1
    answers: list[str] = []
    async with anyio.create_task_group() as tg:

        async def owner() -> None:
            # approve once the provider has asked us to slow down
            while not any(p["outcome"] == "slow_down" for p in rig.log("device_poll")):
                await anyio.sleep(0.2)
            assert start.verification_uri_complete is not None
            await answer_device(start.verification_uri_complete, approve=True, verify=rig.verify())

        tg.start_soon(owner)
        with anyio.fail_after(60):
            outcome = await rig.broker.complete_device(
                start.flow.id, actor="test", on_poll=answers.append
            )
    assert outcome.status == "connected"
    assert outcome.slow_downs == 1
    assert answers[0] == "slow_down"
    polls = rig.log("device_poll")
    assert (polls[0]["outcome"], polls[0]["forced"]) == ("slow_down", True)
    # the provider's log: the interval grew from 1 s to 6 s, and the next poll honoured it
    assert polls[1]["interval"] == 6
    assert polls[1]["gap_ms"] >= 6000
    assert not [p for p in polls if p["outcome"] == "slow_down" and not p["forced"]]
    # the ledger keeps the longer interval (a restarted poller would use it)
    record = await rig.broker.engine.inspect(start.flow.id)
    slowed = [e for e in record.events if e.trigger is FlowTrigger.SLOW_DOWN]
    assert [e.detail for e in slowed] == [{"interval": 6}]
    assert slowed[0].from_state is slowed[0].to_state is FlowState.AWAITING_DEVICE


# --------------------------------------------------------------------- revalidation


async def test_changed_metadata_is_taken_on_connect(rig: Rig) -> None:
    url = rig.resource.url("/mcp")
    first = await rig.broker.adopt(url, redirect_uri=REDIRECT, actor="test")
    assert first.spec.issuer == rig.server.issuer("oauth")
    rig.resource.set_authorization_server("/mcp", rig.server.issuer("oidc"))
    try:
        rig.broker._validated.clear()  # as if a minute had passed since the last look
        start = await rig.broker.begin(first.spec.id, redirect_uri=REDIRECT, actor="test")
        spec = rig.broker.catalog.get(first.spec.id)
        assert spec.issuer == rig.server.issuer("oidc")
        assert start.authorize_url.startswith(f"{rig.server.issuer('oidc')}/auth?")
        # the old client belongs to the old server: a new registration at the new one
        assert [r["tenant"] for r in rig.log("registration")] == ["oauth", "oidc"]
        stored = DiscoveredStore(rig.root / "discovered.json").entry(first.spec.id)
        assert stored is not None
        assert stored["discovery"]["issuer"] == rig.server.issuer("oidc")
        assert stored["discovery"]["fingerprint"] != first.discovery.fingerprint()
        # and the flow works with it
        query = await follow_to_redirect(start.authorize_url, REDIRECT, verify=rig.verify())
        await rig.broker.engine.record_callback(parse_callback(query), actor="test")
        tokens = await rig.broker.complete_state(start.state, actor="test")
        assert claims(tokens.access)["iss"] == rig.server.issuer("oidc")
        assert claims(tokens.access)["aud"] == url
    finally:
        rig.resource.set_authorization_server("/mcp", rig.server.issuer("oauth"))


async def test_metadata_that_no_longer_validates_stops_the_connect(rig: Rig) -> None:
    url = rig.resource.url("/mcp")
    first = await rig.broker.adopt(url, redirect_uri=REDIRECT, actor="test")
    rig.resource.set_authorization_server("/mcp", rig.server.issuer("liar"))
    try:
        rig.broker._validated.clear()
        with pytest.raises(DiscoveryError) as info:
            await rig.broker.begin(first.spec.id, redirect_uri=REDIRECT, actor="test")
        assert info.value.reason == "issuer_mismatch"
        assert await rig.broker.engine.list_flows() == []
        # the stored entry is left as it was
        assert rig.broker.catalog.get(first.spec.id).issuer == rig.server.issuer("oauth")
    finally:
        rig.resource.set_authorization_server("/mcp", rig.server.issuer("oauth"))


def test_no_configuration_turns_plain_http_on() -> None:
    """The loopback policy is for tests: nothing in the product's code refers to it."""
    root = Path(__file__).resolve().parents[2]
    users = [
        p
        for package in ("flowengine", "api", "bot", "agentd", "integrations")
        for p in (root / package).rglob("*.py")
        if "LOOPBACK_HTTP_FOR_TESTS" in p.read_text() or "allow_loopback_http=True" in p.read_text()
    ]
    assert users == [root / "flowengine" / "discovery.py"]
    assert os.environ.get("AGENTD_ALLOW_HTTP") is None
