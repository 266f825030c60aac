"""Read-only flow inspection: list, one flow with its ledger events, and its diagram.

Nothing here can carry a secret: Flow and FlowEvent hold none (the ledger refuses secret
keys in event details), and codes, verifiers and tokens live in other tables and files.
"""

from __future__ import annotations

from quart import Blueprint, Response, jsonify, request

from flowengine import diagrams
from flowengine.states import FlowState

from .auth import require_bearer
from .context import api_context
from .errors import BadRequestError
from .wire import query_number

__all__ = ["DIAGRAM_TYPES", "blueprint"]

blueprint = Blueprint("inspection", __name__)

#: diagram format -> content type
DIAGRAM_TYPES = {
    "mermaid": "text/vnd.mermaid; charset=utf-8",
    "svg": "image/svg+xml",
    "dot": "text/vnd.graphviz; charset=utf-8",
}
_ACCEPT = {
    "text/vnd.mermaid": "mermaid",
    "image/svg+xml": "svg",
    "text/vnd.graphviz": "dot",
    "text/plain": "mermaid",
}
_MAX_LIMIT = 1000


def _limit(value: str | None) -> int:
    limit = query_number(value, int, name="limit", default=50, must="a whole number")
    if not 1 <= limit <= _MAX_LIMIT:
        raise BadRequestError(f"limit must be between 1 and {_MAX_LIMIT}", parameter="limit")
    return limit


def _states(values: list[str]) -> list[FlowState] | None:
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        return None
    try:
        return [FlowState(name) for name in names]
    except ValueError as err:
        known = ", ".join(s.value for s in FlowState)
        raise BadRequestError(f"state must be one of: {known}", parameter="state") from err


@blueprint.get("/oauth/flows")
@require_bearer
async def list_flows() -> Response:
    flows = await api_context().engine.list_flows(
        provider=request.args.get("provider") or None,
        states=_states(request.args.getlist("state")),
        limit=_limit(request.args.get("limit")),
    )
    return jsonify({"flows": [flow.public() for flow in flows]})


@blueprint.get("/oauth/flows/<flow_id>")
@require_bearer
async def get_flow(flow_id: str) -> Response:
    record = await api_context().engine.inspect(flow_id)
    return jsonify(record.public())


def _diagram_format() -> str:
    explicit = request.args.get("format")
    if explicit:
        if explicit not in DIAGRAM_TYPES:
            raise BadRequestError(
                f"format must be one of: {', '.join(DIAGRAM_TYPES)}", parameter="format"
            )
        return explicit
    best = request.accept_mimetypes.best_match(list(_ACCEPT))
    if best is None or request.accept_mimetypes.best in ("*/*", None):
        return "mermaid"
    return _ACCEPT[best]


@blueprint.get("/oauth/flows/<flow_id>/diagram")
@require_bearer
async def flow_diagram(flow_id: str) -> Response:
    import anyio

    fmt = _diagram_format()
    record = await api_context().engine.inspect(flow_id)
    try:
        # svg runs Graphviz `dot` in a subprocess: keep it off the event loop
        text = await anyio.to_thread.run_sync(lambda: diagrams.flow_diagram(record, fmt=fmt))
    except diagrams.DotUnavailableError:
        return Response(
            "Graphviz 'dot' is not installed on the daemon's host; ask for format=mermaid\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    return Response(text, status=200, content_type=DIAGRAM_TYPES[fmt])
