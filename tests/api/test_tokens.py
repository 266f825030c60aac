"""``GET /v1/tokens/<provider>`` over real Hypercorn TLS, callers named by the fake LocalAPI.

The daemon side runs as in userspace networking (tailscaled forwards tailnet peers to
127.0.0.1:<port>): each request leaves from a source port the test first maps to a peer in
the fake's ProxyMapper, so whois names a user, a tagged device, or nobody. The provider is
tests/fakes.FakeProvider behind httpx; the ledger, vault and auth.json are real files.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
from api.tailscale import LocalAPI
from api.tokens import configure_access
from bot import texts
from flowengine.access import AccessPolicy, AccessRule
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.clock import ManualClock
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.protocol import parse_callback
from flowengine.ratelimit import Rate
from flowengine.tokens import TokenStore
from flowengine.vault import token_hash
from tests.fakes import FakeProvider

from .fake_tailscale import DOMAIN, OWNER, FakeTailnet

pytestmark = pytest.mark.anyio

REDIRECT = f"https://{DOMAIN}:8400/oauth/callback"
CI_IP, OWNER_IP, GUEST_IP = "100.90.1.4", "100.90.1.2", "100.90.1.3"
POLICY = AccessPolicy(
    (
        AccessRule(("tag:ci", OWNER), ("fake",)),
        AccessRule(("tag:ci",), ("other",)),
    )
)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes = field(repr=False)


_USED: set[int] = set()


def _source_port() -> int:
    """A free port outside the ephemeral range, to leave from (the fake maps it to a peer);
    never one this session used before (its last connection may be in TIME_WAIT)."""
    for _ in range(1000):
        port = random.randint(20_000, 30_000)
        if port in _USED:
            continue
        _USED.add(port)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free source port")


@dataclass
class Rig:
    app: Quart
    broker: Broker
    engine: FlowEngine
    fake: FakeProvider
    tailnet: FakeTailnet
    plan: ServePlan
    trust: ssl.SSLContext
    clock: ManualClock
    root: Path

    def _get(
        self, path: str, peer: str | None, connection: http.client.HTTPSConnection | None
    ) -> Answer:
        conn = connection
        if conn is None:
            port = _source_port()
            if peer is not None:
                self.tailnet.forward(port, peer)
            conn = http.client.HTTPSConnection(
                "127.0.0.1",
                self.plan.port,
                context=self.trust,
                source_address=("127.0.0.1", port),
                timeout=30,
            )
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            raw = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return Answer(response.status, headers, json.loads(raw or b"{}"), raw)
        finally:
            if connection is None:
                conn.close()

    async def get(
        self,
        path: str,
        peer: str | None,
        connection: http.client.HTTPSConnection | None = None,
    ) -> Answer:
        return await anyio.to_thread.run_sync(self._get, path, peer, connection)

    def connection(self, peer: str) -> http.client.HTTPSConnection:
        port = _source_port()
        self.tailnet.forward(port, peer)
        return http.client.HTTPSConnection(
            "127.0.0.1",
            self.plan.port,
            context=self.trust,
            source_address=("127.0.0.1", port),
            timeout=30,
        )

    async def connect(self, provider: str = "fake") -> None:
        start = await self.broker.begin(provider, redirect_uri=REDIRECT, actor="test")
        verifier = await self.engine.code_verifier(start.flow.id)
        code = self.fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
        await self.engine.record_callback(parse_callback({"state": [start.state], "code": [code]}))
        await self.broker.complete_state(start.state, actor="test")

    def whois_requests(self, port: int | None = None) -> list[str]:
        return [
            r
            for r in self.tailnet.requests
            if r.startswith("GET /localapi/v0/whois") and (port is None or r.endswith(f"%3A{port}"))
        ]


@pytest.fixture(name="rig")
async def _rig(
    engine: FlowEngine,
    clock: ManualClock,
    tailnet: FakeTailnet,
    localapi: LocalAPI,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    tailnet.add_peer(OWNER_IP, OWNER)
    tailnet.add_peer(GUEST_IP, "guest@example.com")
    tailnet.add_peer(CI_IP, "tagged-devices", tags=("tag:ci",))
    fake = FakeProvider()
    creds = CredentialStore(tmp_path / "credentials.json")
    creds.put("fake", fake.credentials())
    creds.put("other", fake.credentials())
    catalog = Catalog().with_override(fake.spec())
    catalog.register(fake.spec("other", name="Other"))
    settings = ApiSettings(
        mode="tls",
        host="127.0.0.1",
        port=0,
        public_name=DOMAIN,
        tls_dir=tmp_path / "tls",
        local_socket=tmp_path / "agentd.sock",
    )
    trust = ssl.create_default_context()
    tailnet.ca.configure_trust(trust)
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        broker = Broker(
            engine,
            catalog=catalog,
            credentials=creds,
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )
        app = create_app(
            engine,
            settings=settings,
            catalog=catalog,
            tailscale=localapi,
            broker=broker,
            redirect_uri=REDIRECT,
            userspace=True,
        )
        configure_access(app, policy=POLICY, rate=Rate(1000.0, 1000))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            plan = await tg.start(
                partial(serve, app, settings, shutdown_trigger=stop.wait, tailscale=localapi)
            )
            try:
                yield Rig(app, broker, engine, fake, tailnet, plan, trust, clock, tmp_path)
            finally:
                stop.set()


async def test_a_tagged_device_gets_a_token_and_the_hand_out_is_audited(rig: Rig) -> None:
    await rig.connect()
    answer = await rig.get("/v1/tokens/fake", CI_IP)
    assert answer.status == 200, answer.body
    access = answer.body["access_token"]
    assert access in rig.fake.valid_access
    assert answer.body == {
        "provider": "fake",
        "access_token": access,
        "token_type": "Bearer",
        "expires": int((rig.clock.now() + 3600) * 1000),
        "expires_in": 3600,
        "scope": "read",
        "scope_source": "granted",
    }
    assert b"refresh" not in answer.raw  # never a refresh token, under any name
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["pragma"] == "no-cache"
    assert answer.headers["x-content-type-options"] == "nosniff"
    (row,) = await rig.broker.handouts()
    assert (row.who, row.node, row.address, row.provider) == (
        "tag:ci",
        f"peer-{CI_IP.replace('.', '-')}.tailnet-name.ts.net",
        CI_IP,
        "fake",
    )
    assert row.token_sha == token_hash(access, 8)
    # the owner hears about the first hand-out, once
    again = await rig.get("/v1/tokens/fake", CI_IP)
    assert again.status == 200
    notes = await rig.engine.notifications()
    assert [(n.kind, n.provider) for n in notes] == [("first_handout", "fake")]
    worded = texts.notification(notes[0].kind, "Fake", data=notes[0].data)  # by the bot
    assert f"tag:ci on peer-{CI_IP.replace('.', '-')}" in worded
    assert len(await rig.broker.handouts()) == 2


async def test_a_user_named_in_the_policy_gets_a_token(rig: Rig) -> None:
    await rig.connect()
    answer = await rig.get("/v1/tokens/fake", OWNER_IP)
    assert answer.status == 200
    (row,) = await rig.broker.handouts()
    assert row.who == OWNER


@pytest.mark.parametrize(
    ("peer", "path", "reason"),
    [
        (GUEST_IP, "/v1/tokens/fake", "guest@example.com is not granted fake tokens"),
        (OWNER_IP, "/v1/tokens/other", f"{OWNER} is not granted other tokens"),
        (None, "/v1/tokens/fake", "no tailnet identity"),  # whois: no such node
        (GUEST_IP, "/v1/tokens/nonexistent", "is not granted nonexistent tokens"),
    ],
)
async def test_refused(rig: Rig, peer: str | None, path: str, reason: str) -> None:
    await rig.connect()
    answer = await rig.get(path, peer)
    assert answer.status == 403
    assert answer.body["error"] == "forbidden"
    assert reason in answer.body["message"]
    assert "access_token" not in answer.body
    assert await rig.broker.handouts() == []
    assert await rig.engine.notifications() == []


async def test_not_connected(rig: Rig) -> None:
    answer = await rig.get("/v1/tokens/other", CI_IP)
    assert answer.status == 404
    assert answer.body["error"] == "not_connected"
    assert "agentd connect other" in answer.body["hint"]


async def test_needs_reconnect_gives_the_hint_as_data(rig: Rig) -> None:
    await rig.connect()
    rig.clock.advance(3600)
    rig.fake.fail_next(httpx.Response(400, json={"error": "invalid_grant"}))
    answer = await rig.get("/v1/tokens/fake", CI_IP)
    assert answer.status == 409
    assert answer.body["error"] == "reauthorization_required"
    assert answer.body["reason"] == "invalid_grant"
    assert answer.body["hint"] == (
        'Fake needs to be connected again: say "connect fake" to the bot or run:'
        " agentd connect fake"
    )
    assert await rig.broker.handouts() == []


async def test_provider_down_is_503_with_retry_after(rig: Rig) -> None:
    await rig.connect()
    rig.clock.advance(3600)
    rig.fake.fail_next(httpx.Response(503, headers={"Retry-After": "120"}))
    answer = await rig.get("/v1/tokens/fake", CI_IP)
    assert answer.status == 503
    assert answer.body["error"] == "provider_unavailable"
    assert 1 <= int(answer.headers["retry-after"]) <= 120
    assert await rig.broker.handouts() == []


async def test_rate_limited_per_identity(rig: Rig) -> None:
    await rig.connect()
    configure_access(rig.app, rate=Rate(0.001, 2))
    for _ in range(2):
        assert (await rig.get("/v1/tokens/fake", CI_IP)).status == 200
    limited = await rig.get("/v1/tokens/fake", CI_IP)
    assert limited.status == 429
    assert limited.body["error"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 1000
    # another identity has its own bucket
    assert (await rig.get("/v1/tokens/fake", OWNER_IP)).status == 200
    assert len(await rig.broker.handouts()) == 3


async def test_policy_changes_apply_to_the_next_request(rig: Rig) -> None:
    await rig.connect()
    assert (await rig.get("/v1/tokens/fake", GUEST_IP)).status == 403
    configure_access(rig.app, policy=AccessPolicy((AccessRule(("guest@example.com",), ("*",)),)))
    assert (await rig.get("/v1/tokens/fake", GUEST_IP)).status == 200
    assert (await rig.get("/v1/tokens/fake", CI_IP)).status == 403


async def test_whois_once_per_keep_alive_connection(rig: Rig) -> None:
    await rig.connect()
    conn = rig.connection(CI_IP)
    try:
        for _ in range(5):
            assert (await rig.get("/v1/tokens/fake", None, conn)).status == 200
        port = conn.sock.getsockname()[1]
    finally:
        conn.close()
    assert len(rig.whois_requests(port)) == 1


async def test_the_local_socket_is_sent_to_agentd_token(rig: Rig) -> None:
    await rig.connect()
    transport = httpx.AsyncHTTPTransport(uds=str(rig.root / "agentd.sock"))
    async with httpx.AsyncClient(transport=transport, base_url="http://agentd.local") as local:
        response = await local.get("/v1/tokens/fake")
    assert response.status_code == 403
    assert "agentd token" in response.json()["message"]
    assert await rig.broker.handouts() == []


async def test_tailscaled_down_is_503(rig: Rig) -> None:
    await rig.connect()
    async with LocalAPI(rig.root / "gone.sock", timeout=2) as dead:
        rig.app.asgi_app.whois = dead.whois  # type: ignore[attr-defined]
        answer = await rig.get("/v1/tokens/fake", CI_IP)
    assert answer.status == 503
    assert answer.headers["retry-after"] == "5"
    assert "could not be identified" in answer.body["message"]


async def test_200_callers_at_expiry_cause_one_refresh(rig: Rig) -> None:
    """200 agents on keep-alive connections (each fetched once before) ask at expiry."""
    await rig.connect()
    connections = [rig.connection(CI_IP if i % 2 else OWNER_IP) for i in range(200)]
    threads = anyio.CapacityLimiter(200)

    async def ask(conn: http.client.HTTPSConnection, out: list[Answer]) -> None:
        out.append(
            await anyio.to_thread.run_sync(rig._get, "/v1/tokens/fake", None, conn, limiter=threads)
        )

    try:
        warm: list[Answer] = []
        for conn in connections:
            await ask(conn, warm)
        assert [a.status for a in warm] == [200] * 200
        rig.clock.advance(3600)
        rig.fake.delay = 0.2  # the refresh is in flight while the others arrive
        before = rig.fake.grants("refresh_token")
        answers: list[Answer] = []
        async with anyio.create_task_group() as tg:
            for conn in connections:
                tg.start_soon(ask, conn, answers)
    finally:
        for conn in connections:
            conn.close()
    assert [a.status for a in answers] == [200] * 200
    assert rig.fake.grants("refresh_token") - before == 1
    assert len({a.body["access_token"] for a in answers}) == 1
    assert len(await rig.broker.handouts(limit=1000)) == 400


async def test_no_token_reaches_a_log_line(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await rig.connect()
    seen = [(await rig.get("/v1/tokens/fake", CI_IP)).body["access_token"]]
    rig.clock.advance(3600)
    seen.append((await rig.get("/v1/tokens/fake", OWNER_IP)).body["access_token"])
    await rig.get("/v1/tokens/fake", GUEST_IP)
    assert "first token hand-out to tag:ci" in caplog.text
    for token in seen + sorted(rig.fake.valid_refresh):
        assert token not in caplog.text


async def test_the_remote_client_caches_in_memory_only(rig: Rig) -> None:
    """agentd/remote.py against the real listener: one request per token lifetime."""
    from agentd.remote import RemoteTokens

    await rig.connect()
    rig.tailnet.loopback_peer = CI_IP  # the client's source port is its own business
    now = [rig.clock.now()]
    remote = RemoteTokens(
        f"https://127.0.0.1:{rig.plan.port}", ssl_context=rig.trust, clock=lambda: now[0]
    )

    def fetch() -> str:
        return remote.get("fake")

    first = await anyio.to_thread.run_sync(fetch)
    assert await anyio.to_thread.run_sync(fetch) == first
    assert remote.requests == 1
    now[0] += 3600 - 30  # inside the on-use margin of an hour-long token: ask again
    rig.clock.advance(3600 - 30)
    second = await anyio.to_thread.run_sync(fetch)
    assert remote.requests == 2
    assert second != first  # the daemon refreshed it
    assert second not in repr(remote.fetch("fake"))  # repr hides the token
    assert len(await rig.broker.handouts()) == 2


async def test_a_failure_while_answering_never_quotes_the_token(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.tokens

    await rig.connect()
    real = api.tokens.jsonify  # type: ignore[attr-defined]

    def failing(body: Any) -> Any:
        if "access_token" in body:
            raise ValueError(f"cannot encode {body['access_token']}")
        return real(body)

    monkeypatch.setattr(api.tokens, "jsonify", failing)
    caplog.set_level(logging.DEBUG)
    answer = await rig.get("/v1/tokens/fake", CI_IP)
    assert answer.status == 500
    assert answer.body == {
        "error": "internal_error",
        "message": "the token answer could not be built",
    }
    token = rig.broker.vault.read("fake").tokens.access  # type: ignore[union-attr]
    assert "the token answer could not be built" in caplog.text  # logged as such ...
    assert token not in caplog.text  # ... never with the text or the context
    assert token not in answer.raw.decode()
