"""The callback page and the pending route, through Quart's test client."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from quart.typing import TestClientProtocol as Client

from flowengine.clock import ManualClock
from flowengine.engine import FlowEngine
from flowengine.states import FlowState, FlowTrigger

from .conftest import AUTH, count_rows, start_flow

pytestmark = pytest.mark.anyio

SECURITY = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def assert_security_headers(response) -> None:  # type: ignore[no-untyped-def]
    for name, value in SECURITY.items():
        assert response.headers[name] == value
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp
    assert "'unsafe-inline'" not in csp


async def test_callback_records_code_and_says_received(
    client: Client, engine: FlowEngine, ledger_file: Path
) -> None:
    started = await start_flow(engine, "dexcom")
    before = count_rows(ledger_file)
    response = await client.get(
        "/oauth/callback", query_string={"code": "the-code-123", "state": started.state}
    )
    assert response.status_code == 200
    assert response.content_type == "text/html; charset=utf-8"
    body = await response.get_data(as_text=True)
    # no broker here: the code waits for the client that started the flow, so the page
    # says what happened (received), never that Dexcom is connected
    assert "Authorization received" in body
    assert "finishing the connection to Dexcom" in body
    assert "connected" not in body.lower().replace("finishing the connection", "")
    assert "the-code-123" not in body
    assert_security_headers(response)
    flow = await engine.get_flow(started.flow.id)
    assert flow.state is FlowState.CODE_RECEIVED
    after = count_rows(ledger_file)
    assert after == {**before, "flow_events": before["flow_events"] + 1, "oauth_pending": 1}
    record = await engine.inspect(started.flow.id)
    assert record.events[-1].trigger is FlowTrigger.RECEIVE_CODE
    assert record.events[-1].actor == "api"


async def test_callback_falls_back_to_provider_id_without_catalog(
    engine: FlowEngine, settings
) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    client = create_app(engine, settings=settings).test_client()
    started = await start_flow(engine, "oura")
    response = await client.get(
        "/oauth/callback", query_string={"code": "c", "state": started.state}
    )
    assert "finishing the connection to oura" in await response.get_data(as_text=True)


async def test_denied_callback_fails_the_flow_and_says_so(
    client: Client, engine: FlowEngine, ledger_file: Path
) -> None:
    started = await start_flow(engine, "oura")
    response = await client.get(
        "/oauth/callback",
        query_string={
            "error": "access_denied",
            "error_description": "<b>User said no</b>",
            "state": started.state,
        },
    )
    assert response.status_code == 200
    body = await response.get_data(as_text=True)
    assert "Oura was not connected" in body
    assert "You did not allow access to Oura" in body
    assert "&lt;b&gt;User said no&lt;/b&gt;" in body
    assert "<b>User said no" not in body
    flow = await engine.get_flow(started.flow.id)
    assert flow.state is FlowState.FAILED
    assert flow.error_code == "access_denied"
    assert count_rows(ledger_file)["oauth_pending"] == 0


async def test_unknown_state_gets_400_and_stores_nothing(
    client: Client, engine: FlowEngine, ledger_file: Path
) -> None:
    await start_flow(engine)
    before = count_rows(ledger_file)
    response = await client.get("/oauth/callback", query_string={"code": "c", "state": "x" * 43})
    assert response.status_code == 400
    body = await response.get_data(as_text=True)
    assert "This link is not valid" in body
    assert_security_headers(response)
    assert count_rows(ledger_file) == before


@pytest.mark.parametrize(
    "query",
    [
        "",
        "code=abc",
        "state=short",
        "code=a&code=b&state=" + "s" * 43,
        "error=bad%22quote&state=" + "s" * 43,
    ],
)
async def test_malformed_callback_gets_400(client: Client, ledger_file: Path, query: str) -> None:
    response = await client.get("/oauth/callback?" + query)
    assert response.status_code == 400
    assert "nothing was saved" in await response.get_data(as_text=True)
    assert count_rows(ledger_file)["oauth_pending"] == 0


async def test_expired_state_gets_410_and_stores_no_code(
    client: Client, engine: FlowEngine, clock: ManualClock, ledger_file: Path
) -> None:
    started = await start_flow(engine)
    clock.advance(engine.awaiting_ttl + 1)
    response = await client.get(
        "/oauth/callback", query_string={"code": "late", "state": started.state}
    )
    assert response.status_code == 410
    assert "This authorization has expired" in await response.get_data(as_text=True)
    assert count_rows(ledger_file)["oauth_pending"] == 0
    assert (await engine.get_flow(started.flow.id)).state is FlowState.EXPIRED


async def test_used_state_gets_410_and_keeps_the_first_code(
    client: Client, engine: FlowEngine, ledger_file: Path
) -> None:
    started = await start_flow(engine)
    first = await client.get(
        "/oauth/callback", query_string={"code": "first", "state": started.state}
    )
    assert first.status_code == 200
    before = count_rows(ledger_file)
    again = await client.get(
        "/oauth/callback", query_string={"code": "second", "state": started.state}
    )
    assert again.status_code == 410
    assert "already used" in await again.get_data(as_text=True)
    assert count_rows(ledger_file) == before
    taken = await engine.take_code(started.state)
    assert taken.code == "first"


async def test_concurrent_duplicate_callbacks_record_exactly_one_code(
    client: Client, engine: FlowEngine, ledger_file: Path
) -> None:
    started = await start_flow(engine)
    statuses: list[int] = []

    async def hit(i: int) -> None:
        response = await client.get(
            "/oauth/callback", query_string={"code": f"code-{i}", "state": started.state}
        )
        statuses.append(response.status_code)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(hit, i)
    assert sorted(statuses) == [200] + [410] * 11
    rows = count_rows(ledger_file)
    assert rows["oauth_pending"] == 1
    record = await engine.inspect(started.flow.id)
    assert [e.trigger for e in record.events].count(FlowTrigger.RECEIVE_CODE) == 1
    taken = await engine.take_code(started.state)
    assert taken.code.startswith("code-")


# ---------------------------------------------------------------------------- pending


async def test_pending_requires_the_bearer_token(client: Client, engine: FlowEngine) -> None:
    started = await start_flow(engine)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = await client.get(f"/oauth/pending/{started.state}", headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.get_json())["error"] == "unauthorized"


async def test_pending_lifecycle_waiting_ready_then_gone(
    client: Client, engine: FlowEngine
) -> None:
    started = await start_flow(engine, "dexcom")
    url = f"/oauth/pending/{started.state}"
    waiting = await client.get(url, headers=AUTH)
    assert waiting.status_code == 202
    assert await waiting.get_json() == {
        "status": "waiting",
        "flow_id": started.flow.id,
        "provider": "dexcom",
        "flow_state": "awaiting_code",
    }
    assert_security_headers(waiting)
    await client.get("/oauth/callback", query_string={"code": "abc", "state": started.state})
    ready = await client.get(url, headers=AUTH)
    assert ready.status_code == 200
    data = await ready.get_json()
    assert data == {
        "status": "ready",
        "flow_id": started.flow.id,
        "provider": "dexcom",
        "code": "abc",
        "received_at": engine.now_ms(),
    }
    again = await client.get(url, headers=AUTH)
    assert again.status_code == 410
    gone = await again.get_json()
    assert gone["reason"] == "consumed"
    assert "code" not in gone


async def test_pending_unknown_state_is_404(client: Client) -> None:
    response = await client.get("/oauth/pending/" + "n" * 43, headers=AUTH)
    assert response.status_code == 404
    assert (await response.get_json())["error"] == "flow_not_found"


async def test_pending_after_denial_is_410_with_the_reason(
    client: Client, engine: FlowEngine
) -> None:
    started = await start_flow(engine)
    await client.get(
        "/oauth/callback",
        query_string={"error": "access_denied", "state": started.state},
    )
    response = await client.get(f"/oauth/pending/{started.state}", headers=AUTH)
    assert response.status_code == 410
    data = await response.get_json()
    assert (data["reason"], data["error"], data["flow_state"]) == (
        "failed",
        "access_denied",
        "failed",
    )


async def test_pending_after_expiry_is_410(
    client: Client, engine: FlowEngine, clock: ManualClock
) -> None:
    started = await start_flow(engine)
    clock.advance(engine.awaiting_ttl + 1)
    response = await client.get(f"/oauth/pending/{started.state}", headers=AUTH)
    assert response.status_code == 410
    assert (await response.get_json())["reason"] == "expired"


@pytest.mark.parametrize("wait", ["abc", "-1", "nan", "inf"])
async def test_pending_rejects_bad_wait(client: Client, engine: FlowEngine, wait: str) -> None:
    started = await start_flow(engine)
    response = await client.get(
        f"/oauth/pending/{started.state}", query_string={"wait": wait}, headers=AUTH
    )
    assert response.status_code == 400
    assert (await response.get_json())["parameter"] == "wait"


async def test_long_poll_answers_when_the_code_arrives(client: Client, engine: FlowEngine) -> None:
    started = await start_flow(engine)
    result: dict[str, object] = {}

    async def poll() -> None:
        response = await client.get(
            f"/oauth/pending/{started.state}", query_string={"wait": "30"}, headers=AUTH
        )
        result["status"] = response.status_code
        result["data"] = await response.get_json()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await anyio.sleep(0.2)
            assert "status" not in result
            await client.get(
                "/oauth/callback", query_string={"code": "later", "state": started.state}
            )
    assert result["status"] == 200
    assert result["data"]["code"] == "later"  # type: ignore[index]


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok", "mode": "plain-test"}
    assert_security_headers(response)


async def test_unknown_route_is_json_404(client: Client) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert (await response.get_json())["error"] == "not_found"


async def test_static_stylesheet_is_served(client: Client) -> None:
    response = await client.get("/static/page.css")
    assert response.status_code == 200
    assert "text/css" in response.content_type
    assert ".card" in await response.get_data(as_text=True)
