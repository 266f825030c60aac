"""The OAuth routes: the provider's redirect, starting flows, and waiting for outcomes.

``GET /oauth/callback`` records the code (or the provider's error) through
``FlowEngine.record_callback`` - one transaction that writes ``oauth_pending`` and moves
the flow. A malformed query, an unknown, expired or used state store nothing. When the
daemon owns the flow (every flow but those started with ``exchange="client"``) it then
exchanges the code itself, as a task of the app that no client's disconnect can cancel,
and the page waits up to ``callback_wait`` seconds for the outcome: connected, or why not.
It never claims success before the tokens are stored.

``POST /oauth/flows`` starts a flow the daemon completes (``agentd connect`` over the
local socket, or a bearer holder); ``GET /oauth/flows/<id>/outcome?wait=N`` long-polls
its outcome. ``GET /oauth/pending/<state>?wait=N`` keeps its contract for remote pollers:
the outcome of a flow the daemon completes, or - for a flow whose starter exchanges the
code itself - the code, handed out exactly once. Waits are woken by the engine's
in-process events (N <= ``max_wait`` seconds).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any, cast

from quart import Blueprint, Response, current_app, render_template, request

from flowengine.broker import Broker
from flowengine.errors import (
    BrokerError,
    CodeAlreadyUsedError,
    FlowExpiredError,
    ProviderError,
)
from flowengine.models import Flow, PendingStatus
from flowengine.protocol import CallbackParseError, parse_callback
from flowengine.states import PENDING_STATES, FlowState

from .auth import require_bearer
from .context import ApiContext, api_context, provider_name
from .errors import BadRequestError
from .wire import json_response, query_number

__all__ = ["blueprint", "outcome_of", "settled"]

log = logging.getLogger("api.oauth")

blueprint = Blueprint("oauth", __name__)

_MAX_QUERY = 16_384
_OUTCOMES = {
    FlowState.STORED: "connected",
    FlowState.REFRESHING: "connected",
    FlowState.SUPERSEDED: "connected",
    FlowState.REVOKED: "connected",
    FlowState.EXPIRED: "expired",
    FlowState.CANCELLED: "cancelled",
}


def settled(flow: Flow) -> bool:
    """The authorization has its outcome: tokens stored, or the flow ended without."""
    return flow.state not in PENDING_STATES


def _parked() -> contextlib.AbstractContextManager[None]:
    """A long-poll's wait: the connection may be closed to make room (its client re-polls)."""
    park = cast(
        "Callable[[], contextlib.AbstractContextManager[None]] | None",
        request.scope.get("agentd.park"),
    )
    return park() if park is not None else contextlib.nullcontext()


def _settled_or(stopping: Any) -> Any:
    return lambda flow: settled(flow) or stopping.is_set()


def outcome_of(flow: Flow) -> str:
    """pending | connected | denied | failed | expired | cancelled"""
    if not settled(flow):
        return "pending"
    if flow.state is FlowState.FAILED:
        return "denied" if flow.error_code == "access_denied" else "failed"
    return _OUTCOMES.get(flow.state, "failed")


async def _published(flow: Flow) -> None:
    """Before anyone is told "connected": auth.json shows the new tokens (the vault is the
    truth; publishing is idempotent and cheap when nothing is due)."""
    broker = api_context().broker
    if broker is not None and outcome_of(flow) == "connected":
        await broker.publish()


def _outcome_json(flow: Flow) -> dict[str, Any]:
    """The outcome for waiting clients; no secret. ``scopes``: what the provider granted
    when the stored tokens are this flow's (``scope_source`` "granted", or "requested"
    when the token response did not say), else what was asked for."""
    scopes, source = list(flow.scopes), "requested"
    broker = api_context().broker
    if broker is not None and outcome_of(flow) == "connected":
        tokens = broker.tokens.read(flow.provider)
        if tokens is not None and tokens.flow_id == flow.id and tokens.scope:
            scopes = tokens.scope.split()
            source = str(tokens.extra.get("scope_source") or "granted")
    return {
        "flow_id": flow.id,
        "provider": flow.provider,
        "flow_state": flow.state.value,
        "outcome": outcome_of(flow),
        "scopes": scopes,
        "scope_source": source,
        "token_expires_at": flow.token_expires_at,
        "error": flow.error_code,
        "error_description": flow.error_description,
    }


async def _complete(broker: Broker, state: str, flow_id: str) -> None:
    """The daemon's own exchange of a code that just arrived (an app background task)."""
    try:
        await broker.complete_state(state, actor="api")
    except (CodeAlreadyUsedError, FlowExpiredError):
        log.info("flow %s was completed or ended by someone else", flow_id)
    except ProviderError as err:
        log.warning("exchange for flow %s failed: %s (%s)", flow_id, err.code, err.oauth_error)
    except BrokerError as err:
        log.warning("exchange for flow %s failed: %s", flow_id, err.code)
    except Exception:  # noqa: BLE001 - a background task must report, not vanish
        log.exception("exchange for flow %s failed unexpectedly", flow_id)


async def _daemon_completes(flow: Flow) -> bool:
    ctx = api_context()
    return ctx.broker is not None and not await ctx.engine.exchanged_by_client(flow.id)


@blueprint.get("/oauth/callback")
async def callback() -> Response:
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
    ctx = api_context()
    flow = await ctx.engine.record_callback(params, actor="api")
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
    daemon = await _daemon_completes(flow)
    if daemon:
        assert ctx.broker is not None
        current_app.add_background_task(_complete, ctx.broker, params.state, flow.id)
        # show the outcome if it comes quickly; never a success that has not happened
        flow = await ctx.engine.wait_flow(
            flow.id, until=_settled_or(ctx.stopping), timeout=ctx.settings.callback_wait
        )
    return await _outcome_page(flow, name, daemon=daemon)


async def _outcome_page(flow: Flow, name: str, *, daemon: bool) -> Response:
    await _published(flow)
    outcome = outcome_of(flow)
    page: dict[str, Any]
    if outcome == "connected":
        page = {
            "kind": "ok",
            "title": f"{name} connected",
            "headline": f"{name} connected — you can close this tab",
        }
    elif outcome == "pending":
        who = "agentd is" if daemon else "The app that asked for it is"
        page = {
            "kind": "pending",
            "title": "Authorization received",
            "message": f"{who} finishing the connection to {name}; the result is reported"
            " where you started it. You can close this tab.",
        }
    else:
        reason = {
            "expired": "the authorization expired before it could be completed",
            "cancelled": "the authorization was cancelled",
            "denied": f"{name} refused the authorization",
        }.get(outcome, f"exchanging the authorization with {name} failed")
        page = {
            "kind": "failed",
            "title": f"{name} was not connected",
            "message": f"The authorization was received, but {reason}. Start the connection"
            " again from the bot or the command line.",
            "detail_code": flow.error_code,
            "detail_text": flow.error_description,
        }
    body = await render_template("message.html", **page)
    return Response(body, status=200, content_type="text/html; charset=utf-8")


def _wait_arg(ctx: ApiContext) -> float:
    """``?wait=N``: seconds to wait, at most ``max_wait`` (absent: 0)."""
    value = request.args.get("wait")
    wait = query_number(value, float, name="wait", default=0.0, must="a number of seconds")
    if not math.isfinite(wait) or wait < 0:
        raise BadRequestError("wait must be between 0 and 30 seconds", parameter="wait")
    return min(wait, ctx.settings.max_wait)


async def _settled_flow(ctx: ApiContext, flow_id: str, wait: float) -> Flow:
    """The flow once it settled, or as it stands after ``wait`` seconds or at shutdown."""
    with _parked():
        return await ctx.engine.wait_flow(flow_id, until=_settled_or(ctx.stopping), timeout=wait)


def _gone(status: PendingStatus) -> Response:
    reason = "consumed" if status.status == "consumed" else (status.reason or "gone")
    return json_response(
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
    """The seed's contract for remote pollers (see the module docstring)."""
    ctx = api_context()
    wait = _wait_arg(ctx)
    engine = ctx.engine
    status = await engine.pending_status(state)
    flow = await engine.get_flow(status.flow_id)
    if await _daemon_completes(flow):
        # the daemon exchanges this code itself: answer the outcome, never the code
        flow = await _settled_flow(ctx, flow.id, wait)
        if settled(flow) and outcome_of(flow) == "connected":
            await _published(flow)
            return json_response(200, {"status": "connected", **_outcome_json(flow)})
        if settled(flow):
            return _gone(await engine.pending_status(state))
        return _waiting(await engine.pending_status(state))
    with _parked():
        status = await engine.wait_pending(state, timeout=0 if ctx.stopping.is_set() else wait)
    if status.status == "ready":
        try:
            taken = await engine.take_code(state)
        except (CodeAlreadyUsedError, FlowExpiredError):
            # another poller took it a moment ago, or the flow ended meanwhile
            status = await engine.pending_status(state)
        else:
            return json_response(
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
        return _waiting(status)
    return _gone(status)


def _waiting(status: PendingStatus) -> Response:
    response = json_response(
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


@blueprint.post("/oauth/flows")
@require_bearer
async def begin() -> Response:
    """Start a flow the daemon completes: ``{"provider": "dexcom", "scopes": [...]}``;
    ``provider`` may be the URL of a server to discover (``connect <url>``).

    Answers 201 with the authorize URL (it holds the state: it is for the caller's eyes
    only, like the code on /oauth/pending) and the flow id to wait on.
    """
    ctx = api_context()
    if ctx.broker is None or not ctx.redirect_uri:
        raise BadRequestError("this daemon does not start flows")
    data = await request.get_json(force=True, silent=True)
    if not isinstance(data, dict) or not isinstance(data.get("provider"), str):
        raise BadRequestError('send {"provider": "<id>", "scopes": [...]}', parameter="provider")
    scopes = data.get("scopes")
    if scopes is not None and (
        not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes)
    ):
        raise BadRequestError("scopes must be a list of strings", parameter="scopes")
    actor = "cli" if request.scope.get("agentd.listener") == "local" else "api"
    # a URL (an MCP server, an issuer) is discovered and gets a client for our callback
    provider = await ctx.broker.provider_for(
        data["provider"], redirect_uri=ctx.redirect_uri, actor=actor
    )
    start = await ctx.broker.begin(
        provider, redirect_uri=ctx.redirect_uri, actor=actor, scopes=scopes
    )
    flow = start.flow
    return json_response(
        201,
        {
            "flow_id": flow.id,
            "provider": flow.provider,
            "name": start.spec.name,
            "authorize_url": start.authorize_url,
            "redirect_uri": flow.redirect_uri,
            "scopes": list(flow.scopes),
            "deadline": flow.deadline,
        },
    )


@blueprint.get("/oauth/flows/<flow_id>/outcome")
@require_bearer
async def outcome(flow_id: str) -> Response:
    """Long-poll a flow's outcome: 200 once settled, 202 while still pending."""
    ctx = api_context()
    flow = await _settled_flow(ctx, flow_id, _wait_arg(ctx))
    if settled(flow):
        await _published(flow)
        return json_response(200, _outcome_json(flow))
    response = json_response(503 if ctx.stopping.is_set() else 202, _outcome_json(flow))
    response.headers["Retry-After"] = "1"
    return response
