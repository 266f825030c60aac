"""Flow inspection: list, detail with ledger events, diagrams; never a secret."""

from __future__ import annotations

import json

import pytest
from quart.typing import TestClientProtocol as Client

from flowengine.engine import FlowEngine

from .conftest import AUTH, start_flow

pytestmark = pytest.mark.anyio


async def _two_flows(client: Client, engine: FlowEngine) -> tuple[str, str, str]:
    a = await start_flow(engine, "dexcom")
    b = await start_flow(engine, "oura")
    await client.get("/oauth/callback", query_string={"code": "secret-code-A", "state": a.state})
    return a.flow.id, b.flow.id, a.state


async def test_routes_need_the_bearer(client: Client, engine: FlowEngine) -> None:
    flow_id, _, _ = await _two_flows(client, engine)
    for path in ("/oauth/flows", f"/oauth/flows/{flow_id}", f"/oauth/flows/{flow_id}/diagram"):
        response = await client.get(path)
        assert response.status_code == 401, path


async def test_list_and_filters(client: Client, engine: FlowEngine) -> None:
    a, b, _ = await _two_flows(client, engine)
    everything = await (await client.get("/oauth/flows", headers=AUTH)).get_json()
    assert [f["id"] for f in everything["flows"]] == [b, a]  # newest first
    by_provider = await (
        await client.get("/oauth/flows", query_string={"provider": "dexcom"}, headers=AUTH)
    ).get_json()
    assert [f["id"] for f in by_provider["flows"]] == [a]
    by_state = await (
        await client.get("/oauth/flows", query_string={"state": "code_received"}, headers=AUTH)
    ).get_json()
    assert [(f["id"], f["state"]) for f in by_state["flows"]] == [(a, "code_received")]
    both = await (
        await client.get("/oauth/flows?state=code_received,awaiting_code&limit=1", headers=AUTH)
    ).get_json()
    assert [f["id"] for f in both["flows"]] == [b]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [("limit=0", "limit"), ("limit=x", "limit"), ("limit=5000", "limit"), ("state=nope", "state")],
)
async def test_bad_filters_are_400(client: Client, query: str, parameter: str) -> None:
    response = await client.get(f"/oauth/flows?{query}", headers=AUTH)
    assert response.status_code == 400
    assert (await response.get_json())["parameter"] == parameter


async def test_flow_detail_has_events_and_no_secrets(client: Client, engine: FlowEngine) -> None:
    flow_id, _, state = await _two_flows(client, engine)
    response = await client.get(f"/oauth/flows/{flow_id}", headers=AUTH)
    assert response.status_code == 200
    data = await response.get_json()
    assert data["id"] == flow_id
    assert data["state"] == "code_received"
    assert [(e["trigger"], e["to"]) for e in data["events"]] == [
        ("create", "initiated"),
        ("issue_url", "awaiting_code"),
        ("receive_code", "code_received"),
    ]
    text = json.dumps(data)
    verifier = await engine.code_verifier(flow_id)
    assert verifier
    for secret in ("secret-code-A", state, verifier):
        assert secret not in text
    assert "state_hash" not in data


async def test_unknown_flow_is_404(client: Client) -> None:
    for path in ("/oauth/flows/nope", "/oauth/flows/nope/diagram"):
        response = await client.get(path, headers=AUTH)
        assert response.status_code == 404
        assert (await response.get_json())["error"] == "flow_not_found"


async def test_diagram_mermaid_highlights_the_path(client: Client, engine: FlowEngine) -> None:
    flow_id, _, _ = await _two_flows(client, engine)
    response = await client.get(f"/oauth/flows/{flow_id}/diagram", headers=AUTH)
    assert response.status_code == 200
    assert response.content_type.startswith("text/vnd.mermaid")
    text = await response.get_data(as_text=True)
    assert text.splitlines()[3] == "stateDiagram-v2"
    assert "awaiting_code --> code_received: receive_code ✔" in text
    assert "class code_received current" in text


@pytest.mark.parametrize(
    ("query", "accept", "content_type", "marker"),
    [
        ("?format=svg", None, "image/svg+xml", "<svg"),
        ("", "image/svg+xml", "image/svg+xml", "<svg"),
        ("?format=dot", None, "text/vnd.graphviz", "digraph flow"),
        ("", "text/vnd.mermaid", "text/vnd.mermaid", "stateDiagram-v2"),
        ("", "text/plain", "text/vnd.mermaid", "stateDiagram-v2"),
    ],
)
async def test_diagram_formats(
    client: Client,
    engine: FlowEngine,
    query: str,
    accept: str | None,
    content_type: str,
    marker: str,
) -> None:
    flow_id, _, _ = await _two_flows(client, engine)
    headers = {**AUTH, **({"Accept": accept} if accept else {})}
    response = await client.get(f"/oauth/flows/{flow_id}/diagram{query}", headers=headers)
    assert response.status_code == 200
    assert response.content_type.startswith(content_type)
    assert marker in await response.get_data(as_text=True)


async def test_diagram_unknown_format_is_400(client: Client, engine: FlowEngine) -> None:
    flow_id, _, _ = await _two_flows(client, engine)
    response = await client.get(f"/oauth/flows/{flow_id}/diagram?format=png", headers=AUTH)
    assert response.status_code == 400
