"""The OAuth routes: the provider's redirect (``/oauth/callback``) and the poller's
``/oauth/pending/<state>``.

The callback records the code (or the provider's error) through
``FlowEngine.record_callback`` - one transaction that writes ``oauth_pending`` and moves
the flow - and answers with a small page. A malformed query, an unknown, expired or used
state store nothing. The pending route hands the code out exactly once, to the holder of
the API bearer token; it long-polls with ``?wait=N`` (N <= 30 seconds).
"""

from __future__ import annotations

import math
from typing import Any

from quart import Blueprint, Response, jsonify, render_template, request

from flowengine.errors import (
    BrokerError,
    CodeAlreadyUsedError,
    FlowExpiredError,
    FlowNotFound,
    StateMismatchError,
)
from flowengine.models import PendingStatus
from flowengine.protocol import CallbackParseError, parse_callback

from .auth import require_bearer
from .errors import BadRequestError

__all__ = ["blueprint", "error_page_text"]

blueprint = Blueprint("oauth", __name__)

_MAX_QUERY = 16_384


def error_page_text(error: BrokerError) -> tuple[str, str]:
    """Title and sentence of the callback's error page (escaped by the template)."""
    if isinstance(error, StateMismatchError | FlowNotFound):
        return (
            "This link is not valid",
            "It does not belong to any authorization in progress, so nothing was saved. "
            "Start the connection again from the bot or the command line.",
        )
    if isinstance(error, FlowExpiredError):
        ended = {"expired": "expired", "failed": "failed", "cancelled": "been cancelled"}
        how = ended.get(error.state, "ended")
        return (
            "This authorization has " + how,
            "Nothing was saved. Start the connection again from the bot or the command line.",
        )
    if isinstance(error, CodeAlreadyUsedError):
        return (
            "This link was already used",
            "The authorization was completed before; nothing new was saved. "
            "You can close this tab.",
        )
    if isinstance(error, BadRequestError):
        return ("This link is not valid", error.message)
    return ("Something went wrong", "The daemon could not record this authorization.")


@blueprint.get("/oauth/callback")
async def callback() -> Response:
    from .app import api_context, provider_name

    raw = request.query_string
    if len(raw) > _MAX_QUERY:
        raise BadRequestError("The link is too long to be an authorization callback.")
    try:
        params = parse_callback(raw.decode("utf-8", errors="replace"))
    except CallbackParseError as err:
        # err.reason never echoes the input
        raise BadRequestError(
            f"The link is not an authorization callback ({err.reason}); nothing was saved."
        ) from err
    flow = await api_context().engine.record_callback(params, actor="api")
    name = provider_name(flow.provider)
    if params.error is not None:
        denied = params.error == "access_denied"
        body = await render_template(
            "message.html",
            kind="denied",
            title=f"{name} was not connected",
            message=(
                f"You did not allow access to {name}. You can close this tab."
                if denied
                else f"{name} reported a problem, so the connection was not made."
            ),
            detail_code=params.error,
            detail_text=params.error_description,
        )
        return Response(body, status=200, content_type="text/html; charset=utf-8")
    body = await render_template(
        "message.html",
        kind="ok",
        title=f"Authorized {name}",
        message="You can close this tab.",
        headline=f"Authorized {name} — you can close this tab",
    )
    return Response(body, status=200, content_type="text/html; charset=utf-8")


def _parse_wait(value: str | None, limit: float) -> float:
    if value is None or value == "":
        return 0.0
    try:
        wait = float(value)
    except ValueError as err:
        raise BadRequestError("wait must be a number of seconds", parameter="wait") from err
    if not math.isfinite(wait) or wait < 0:
        raise BadRequestError("wait must be between 0 and 30 seconds", parameter="wait")
    return min(wait, limit)


def _json(status: int, payload: dict[str, Any]) -> Response:
    response = jsonify(payload)
    response.status_code = status
    return response


def _gone(status: PendingStatus) -> Response:
    reason = "consumed" if status.status == "consumed" else (status.reason or "gone")
    return _json(
        410,
        {
            "status": "gone",
            "flow_id": status.flow_id,
            "provider": status.provider,
            "flow_state": status.flow_state.value,
            "reason": reason,
            "error": status.error_code,
            "error_description": status.error_description,
        },
    )


@blueprint.get("/oauth/pending/<state>")
@require_bearer
async def pending(state: str) -> Response:
    from .app import api_context

    ctx = api_context()
    wait = _parse_wait(request.args.get("wait"), ctx.settings.max_wait)
    engine = ctx.engine
    status = await engine.wait_pending(state, timeout=wait)
    if status.status == "ready":
        try:
            taken = await engine.take_code(state)
        except (CodeAlreadyUsedError, FlowExpiredError):
            # another poller took it a moment ago, or the flow ended meanwhile
            status = await engine.pending_status(state)
        else:
            return _json(
                200,
                {
                    "status": "ready",
                    "flow_id": taken.flow_id,
                    "provider": status.provider,
                    "code": taken.code,
                    "received_at": taken.received_at,
                },
            )
    if status.status == "waiting":
        response = _json(
            202,
            {
                "status": "waiting",
                "flow_id": status.flow_id,
                "provider": status.provider,
                "flow_state": status.flow_state.value,
            },
        )
        response.headers["Retry-After"] = "1"
        return response
    return _gone(status)
