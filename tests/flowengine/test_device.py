"""The device authorization grant (RFC 8628): device.py's requests and the Broker's polling.

A small device provider on an httpx.MockTransport answers the device endpoint and the
token endpoint from a script; the engine's clock is a ManualClock that the polling's
``sleep`` advances, so the waits are asserted exactly and the tests take no time. The
real thing (oidc-provider, Chromium) is in tests/e2e/test_anything.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agentd.errortable import error_lines
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.clock import ManualClock
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.device import (
    DEFAULT_INTERVAL,
    MAX_INTERVAL,
    Poll,
    PollAnswer,
    next_interval,
    parse_device_code,
    poll_device_token,
    request_device_code,
)
from flowengine.engine import FlowEngine
from flowengine.errors import (
    ConfigError,
    NoDeviceEndpointError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from flowengine.states import FlowState, FlowTrigger
from flowengine.tokens import TokenSet, TokenStore

from .helpers_device import DEVICE_CODE, HOST, USER_CODE, DeviceProvider, spec

pytestmark = pytest.mark.anyio

START = 1_800_000_000.0


# ------------------------------------------------------------------------ device.py


def test_the_device_authorization_response() -> None:
    code = parse_device_code(
        spec(),
        {
            "device_code": DEVICE_CODE,
            "user_code": USER_CODE,
            "verification_uri": f"{HOST}/activate",
            "verification_uri_complete": f"{HOST}/activate?user_code={USER_CODE}",
            "expires_in": 900,
            "interval": 7,
        },
    )
    assert (code.device_code, code.user_code, code.expires_in, code.interval) == (
        DEVICE_CODE,
        USER_CODE,
        900,
        7,
    )
    assert DEVICE_CODE not in repr(code)
    assert USER_CODE not in repr(code)


@pytest.mark.parametrize(
    ("changes", "field_name", "expected"),
    [
        ({"interval": None}, "interval", DEFAULT_INTERVAL),  # §3.2: 5 when absent
        ({"interval": 0}, "interval", 1),
        ({"interval": 10_000}, "interval", MAX_INTERVAL),
        ({"interval": "9"}, "interval", 9),
        ({"interval": True}, "interval", DEFAULT_INTERVAL),
        ({"expires_in": 10**9}, "expires_in", 3600),
        ({"expires_in": None}, "expires_in", 600),
        ({"verification_uri_complete": "javascript:alert(1)"}, "verification_uri_complete", None),
    ],
)
def test_device_authorization_response_bounds(
    changes: dict[str, Any], field_name: str, expected: Any
) -> None:
    data: dict[str, Any] = {
        "device_code": DEVICE_CODE,
        "user_code": USER_CODE,
        "verification_uri": f"{HOST}/activate",
    }
    data.update(changes)
    code = parse_device_code(spec(), {k: v for k, v in data.items() if v is not None})
    assert getattr(code, field_name) == expected


def test_googles_older_field_name() -> None:
    code = parse_device_code(
        spec(),
        {"device_code": "d", "user_code": "u", "verification_url": "https://www.google.com/device"},
    )
    assert code.verification_uri == "https://www.google.com/device"


@pytest.mark.parametrize(
    "data",
    [
        {"user_code": "u", "verification_uri": "https://x"},
        {"device_code": "d", "verification_uri": "https://x"},
        {"device_code": "d", "user_code": "u"},
        {"device_code": "d", "user_code": "u", "verification_uri": "not a url"},
        {"device_code": "d\n", "user_code": "u", "verification_uri": "https://x"},
        ["not", "an", "object"],
    ],
)
def test_incomplete_device_answers_are_refused(data: Any) -> None:
    with pytest.raises(ProviderError) as info:
        parse_device_code(spec(), data)
    assert "d\n" not in info.value.message


@pytest.mark.parametrize(
    ("current", "named", "expected"),
    [(5, None, 10), (1, None, 6), (5, 30, 30), (5, 6, 10), (MAX_INTERVAL, None, MAX_INTERVAL)],
)
def test_slow_down_adds_5_seconds(current: int, named: int | None, expected: int) -> None:
    assert next_interval(current, PollAnswer(Poll.SLOW_DOWN, named)) == expected


async def test_the_device_request_and_its_form() -> None:
    provider = DeviceProvider()
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        code = await request_device_code(
            spec(), ClientCredentials("tv-client"), scopes=("read", "offline_access"), client=client
        )
        assert code.interval == 5
        basic = spec(token_auth_method="client_secret_basic")
        await request_device_code(basic, ClientCredentials("c", "s:x"), scopes=(), client=client)
        with pytest.raises(ConfigError) as info:
            await request_device_code(
                spec(device_authorization_url=None),
                ClientCredentials("c"),
                scopes=(),
                client=client,
            )
    assert "no device authorization endpoint" in info.value.message
    public, confidential = provider.forms
    assert public == {
        "path": "/device",
        "client_id": "tv-client",
        "scope": "read offline_access",
        "resource": "https://api.tv.example.com/",
    }
    assert "client_id" not in confidential
    assert provider.headers[1]["authorization"].startswith("Basic ")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("authorization_pending", PollAnswer(Poll.PENDING, None, "authorization_pending!")),
        ("slow_down", PollAnswer(Poll.SLOW_DOWN, None, "slow_down!")),
        (
            httpx.Response(400, json={"error": "slow_down", "interval": 15}),
            PollAnswer(Poll.SLOW_DOWN, 15, None),
        ),
        ("access_denied", PollAnswer(Poll.DENIED, None, "access_denied!")),
        ("expired_token", PollAnswer(Poll.EXPIRED, None, "expired_token!")),
        # GitHub answers errors with HTTP 200
        (httpx.Response(200, json={"error": "authorization_pending"}), PollAnswer(Poll.PENDING)),
    ],
)
async def test_poll_answers_are_values(answer: Any, expected: PollAnswer) -> None:
    provider = DeviceProvider(script=[answer])
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        got = await poll_device_token(
            spec(), ClientCredentials("tv-client"), device_code=DEVICE_CODE, client=client, now_ms=1
        )
    assert got == expected
    assert provider.polls()[0]["resource"] == "https://api.tv.example.com/"
    assert provider.polls()[0]["client_id"] == "tv-client"


async def test_tokens_from_a_poll() -> None:
    provider = DeviceProvider(script=["tokens"])
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        got = await poll_device_token(
            spec(),
            ClientCredentials("tv-client"),
            device_code=DEVICE_CODE,
            client=client,
            now_ms=1_000,
            requested_scopes=("read",),
        )
    assert isinstance(got, TokenSet)
    assert (got.access, got.refresh, got.expires, got.scope) == (
        "at-device",
        "rt-device",
        3_601_000,
        "read offline_access",
    )


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(503), ProviderTransientError),
        (httpx.Response(429, json={"error": "slow_down"}), ProviderTransientError),
        (httpx.ConnectError("down"), ProviderTransientError),
        ("invalid_grant", ReauthorizationRequired),
        ("invalid_client", ReauthorizationRequired),
        ("unsupported_grant_type", ProviderError),
        (httpx.Response(200, json={"token_type": "Bearer"}), ProviderError),
    ],
)
async def test_poll_failures_raise(answer: Any, error: type[Exception]) -> None:
    provider = DeviceProvider(script=[answer])
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        with pytest.raises(error) as info:
            await poll_device_token(
                spec(), ClientCredentials("c"), device_code=DEVICE_CODE, client=client, now_ms=1
            )
    assert DEVICE_CODE not in str(info.value)


# ------------------------------------------------------------------- the Broker


@dataclass
class Rig:
    broker: Broker
    engine: FlowEngine
    clock: ManualClock
    provider: DeviceProvider
    root: Path
    waits: list[float] = field(default_factory=list)

    async def sleep(self, seconds: float) -> None:
        """What the polling waits: recorded, and the clock moves on by it."""
        self.waits.append(seconds)
        self.clock.advance(seconds)
        await anyio.lowlevel.checkpoint()

    def secrets(self, flow_id: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.root / "ledger.sqlite3")) as db:
            return db.execute("SELECT * FROM flow_secrets WHERE flow_id = ?", (flow_id,)).fetchall()


@pytest.fixture(name="provider")
def _provider() -> DeviceProvider:
    return DeviceProvider()


@pytest.fixture(name="rig")
async def _rig(tmp_path: Path, provider: DeviceProvider) -> AsyncIterator[Rig]:
    clock = ManualClock(START)
    engine = await FlowEngine.open(tmp_path / "ledger.sqlite3", clock=clock)
    creds = CredentialStore(tmp_path / "credentials.json")
    creds.put("tv", ClientCredentials("tv-client"))
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as http:
        broker = Broker(
            engine,
            catalog=Catalog().with_override(spec()),
            credentials=creds,
            tokens=TokenStore(tmp_path / "auth.json"),
            http=http,
        )
        try:
            yield Rig(broker, engine, clock, provider, tmp_path)
        finally:
            await engine.close()


async def run(rig: Rig, *script: str | httpx.Response | Exception, **kw: Any) -> Any:
    rig.provider.script = list(script)
    start = await rig.broker.begin_device("tv", actor="test", chat_id=7, **kw)
    outcome = await rig.broker.complete_device(start.flow.id, actor="test", sleep=rig.sleep)
    return start, outcome


async def test_approved_after_a_while(rig: Rig) -> None:
    start, outcome = await run(rig, "authorization_pending", "authorization_pending", "tokens")
    assert start.user_code == USER_CODE
    assert start.verification_uri == f"{HOST}/activate"
    assert start.verification_uri_complete == f"{HOST}/activate?user_code={USER_CODE}"
    assert start.expires_at == int(START * 1000) + 600_000
    assert start.flow.grant == "device"
    assert start.flow.redirect_uri == ""
    assert USER_CODE not in repr(start)
    assert outcome.status == "connected"
    assert outcome.polls == 3
    assert rig.waits == [5, 5, 5]  # the interval before every request, the first too
    assert outcome.tokens is not None
    assert outcome.tokens.access == "at-device"
    assert outcome.flow.state is FlowState.STORED
    assert outcome.flow.chat_id == 7
    assert (await rig.broker.get_token("tv")) == "at-device"
    record = await rig.engine.inspect(start.flow.id)
    assert [(e.trigger, e.to_state) for e in record.events] == [
        (None, FlowState.INITIATED),
        (FlowTrigger.ISSUE_DEVICE_CODE, FlowState.AWAITING_DEVICE),
        (FlowTrigger.EXCHANGE, FlowState.EXCHANGED),
        (FlowTrigger.STORE, FlowState.STORED),
    ]
    assert record.events[1].detail == {
        "interval": 5,
        "expires_in": 600,
        "verification_uri": f"{HOST}/activate",
    }
    assert rig.secrets(start.flow.id) == []
    text = json.dumps([e.public() for e in record.events])
    assert DEVICE_CODE not in text
    assert USER_CODE not in text


async def test_slow_down_is_5_seconds_more_for_every_later_request(rig: Rig) -> None:
    _, outcome = await run(
        rig,
        "authorization_pending",
        "slow_down",
        "authorization_pending",
        httpx.Response(400, json={"error": "slow_down", "interval": 30}),
        "authorization_pending",
        "tokens",
    )
    assert outcome.status == "connected"
    assert outcome.slow_downs == 2
    assert rig.waits == [5, 5, 10, 10, 30, 30]
    record = await rig.engine.inspect(outcome.flow.id)
    slowed = [e.detail for e in record.events if e.trigger is FlowTrigger.SLOW_DOWN]
    assert slowed == [{"interval": 10}, {"interval": 30}]


async def test_a_restarted_poller_keeps_the_longer_interval(rig: Rig) -> None:
    rig.provider.script = ["slow_down"]
    start = await rig.broker.begin_device("tv", actor="test")

    async def stop_after_one(seconds: float) -> None:
        await rig.sleep(seconds)
        if len(rig.waits) > 1:
            raise anyio.get_cancelled_exc_class()

    with pytest.raises(anyio.get_cancelled_exc_class()):
        await rig.broker.complete_device(start.flow.id, actor="test", sleep=stop_after_one)
    rig.provider.script = ["tokens"]
    rig.waits.clear()
    outcome = await rig.broker.complete_device(start.flow.id, actor="test", sleep=rig.sleep)
    assert outcome.status == "connected"
    assert rig.waits == [10]


async def test_no_interval_means_5_seconds(rig: Rig) -> None:
    rig.provider.interval = None
    start, outcome = await run(rig, "tokens")
    assert start.interval == 5
    assert rig.waits == [5]
    assert outcome.ok


async def test_network_trouble_backs_off(rig: Rig) -> None:
    _, outcome = await run(
        rig,
        httpx.ConnectError("down"),
        httpx.Response(502),
        httpx.ReadTimeout("slow"),
        "authorization_pending",
        "tokens",
    )
    assert outcome.status == "connected"
    assert rig.waits == [5, 10, 20, 40, 5]
    assert outcome.flow.state is FlowState.STORED


@pytest.mark.parametrize(
    ("answer", "status", "state", "error"),
    [
        ("access_denied", "denied", FlowState.FAILED, "access_denied"),
        ("expired_token", "expired", FlowState.EXPIRED, "expired_token"),
        ("invalid_client", "failed", FlowState.FAILED, "invalid_client"),
        ("unsupported_grant_type", "failed", FlowState.FAILED, "unsupported_grant_type"),
    ],
)
async def test_endings(rig: Rig, answer: str, status: str, state: FlowState, error: str) -> None:
    start, outcome = await run(rig, "authorization_pending", answer)
    assert (outcome.status, outcome.flow.state, outcome.error) == (status, state, error)
    assert outcome.tokens is None
    assert outcome.polls == 2
    assert rig.secrets(start.flow.id) == []
    assert await rig.broker.peek("tv") is None


async def test_the_local_deadline_when_the_provider_never_says(rig: Rig) -> None:
    rig.provider.expires_in = 12
    start, outcome = await run(rig, *(["authorization_pending"] * 10))
    assert outcome.status == "expired"
    assert outcome.error == "ttl"
    # the last wait before the end is cut to half a second past it, then polls go on
    # for the grace period at the interval
    assert rig.waits[:3] == [5, 5, 2.5]
    assert sum(rig.waits) >= 12 + 10
    assert rig.secrets(start.flow.id) == []


async def test_cancelled_from_elsewhere(rig: Rig) -> None:
    rig.provider.script = ["authorization_pending"] * 5
    start = await rig.broker.begin_device("tv", actor="test")

    async def cancel_then_sleep(seconds: float) -> None:
        await rig.sleep(seconds)
        if len(rig.waits) == 2:
            await rig.engine.cancel(start.flow.id, actor="cli")

    outcome = await rig.broker.complete_device(start.flow.id, actor="test", sleep=cancel_then_sleep)
    assert outcome.status == "cancelled"
    assert outcome.polls == 1
    assert rig.secrets(start.flow.id) == []


async def test_a_device_endpoint_failure_leaves_no_flow_waiting(rig: Rig) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid_scope"})

    rig.broker._http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    try:
        with pytest.raises(ProviderError) as info:
            await rig.broker.begin_device("tv", actor="test")
    finally:
        await rig.broker._http.aclose()
    assert info.value.oauth_error == "invalid_scope"
    (flow,) = await rig.engine.list_flows()
    assert (flow.state, flow.error_code) == (FlowState.CANCELLED, "invalid_scope")


async def test_no_device_endpoint(rig: Rig) -> None:
    rig.broker.catalog.register(spec(id="web", device_authorization_url=None))
    with pytest.raises(ConfigError) as info:
        await rig.broker.begin_device("web", actor="test")
    assert isinstance(info.value, NoDeviceEndpointError)
    assert "agentd connect web" in error_lines(info.value)[0]  # as the CLI words it
    assert await rig.engine.list_flows() == []


async def test_an_answer_captured_before_a_crash_is_finished_at_start_up(
    rig: Rig, tmp_path: Path
) -> None:
    """The token answer is in the vault before anything parses it: a process killed right
    after it arrived leaves it there, and reconcile stores it (tests/flowengine/
    test_vault_crash.py kills real processes at this point for the code exchange)."""
    from flowengine.vault import Intent, Record

    start = await rig.broker.begin_device("tv", actor="test")
    pv = rig.broker.vault.provider("tv")
    pv.reserve(None)
    now = rig.engine.now_ms()
    capture = pv.capture(
        Record("tv", 0, None),
        op="exchange",
        intent=Intent("exchange", now, None, start.flow.id),
        now_ms=now,
    )
    body = json.dumps({"access_token": "at-lost", "refresh_token": "rt-lost", "expires_in": 60})
    capture.begin(200, "application/json")
    capture.write(body.encode())
    assert capture.finish()
    capture.close()
    report = await rig.broker.reconcile()
    assert report.recovered == ["tv"]
    flow = await rig.engine.get_flow(start.flow.id)
    assert flow.state is FlowState.STORED
    assert (await rig.broker.get_token("tv")) == "at-lost"
    assert rig.secrets(start.flow.id) == []
