"""``GET /v1/tokens/<provider>``: an access token for another machine on the tailnet.

The caller is who the tailnet says it is: the guard names it with whois (a login, or the
device's tags; see api/guard.py, 4.) and puts that in the scope; no bearer token, no
shared secret. Then, in order:

1. a caller on the local socket is sent to ``agentd token`` (same host: it has the vault),
   a caller whois could not name gets 403;
2. the ``[[access]]`` policy (flowengine/access.py) must grant it the provider: else 403,
   naming the identity and the provider, nothing else;
3. its token bucket (flowengine/ratelimit.py, per identity) must have a token: else 429
   with ``Retry-After``;
4. ``Broker.hand_out``: the Broker's single-flight renew (a refresh triggered here is the
   same one every other caller would trigger), then the audit row, committed before the
   answer leaves.

Answers: 200 ``{"provider", "access_token", "token_type", "expires" (epoch ms or null),
"expires_in" (s or null), "scope", "scope_source"}`` — never a refresh token; 404
``not_connected`` (or ``unknown_provider``); 409 ``reauthorization_required`` with the
owner's reconnect hint as data (``hint``, ``reason``); 503 ``provider_unavailable`` with
``Retry-After`` (the provider, or the ledger, is in trouble); 429 ``rate_limited``.

This is the one response of the API that carries a token. It is sent with
``Cache-Control: no-store`` and ``Pragma: no-cache``; nothing logs it (Hypercorn's access
log is off, this module logs identities and providers only), and anything unexpected while
the answer is built is re-raised without its text or context, so an error handler's
traceback cannot quote it either.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

from quart import Blueprint, Quart, Response, jsonify, request

from flowengine.access import AccessPolicy, principal
from flowengine.audit import Caller
from flowengine.broker import HandOut, Outcome
from flowengine.errors import AnswerError, CredentialsMissingError, StorageError
from flowengine.ratelimit import Rate

from .context import ApiContext, TokenAccess, api_context
from .guard import Identity
from .wire import json_response

__all__ = ["PREFIX", "blueprint", "configure_access"]

log = logging.getLogger("api.tokens")

blueprint = Blueprint("tokens", __name__)

#: the paths the guard names callers on (whois), whatever ``allowed_logins`` says
PREFIX = "/v1/tokens/"
#: Retry-After when the ledger could not record a hand-out
STORAGE_RETRY_AFTER = 5


def configure_access(
    app: Quart, *, policy: AccessPolicy | None = None, rate: Rate | None = None
) -> TokenAccess:
    """Set the policy and/or the rate of ``app``'s token hand-outs (start-up, SIGHUP)."""
    ctx: ApiContext = app.extensions["agentd"]
    if policy is not None:
        ctx.access.policy = policy
    if rate is not None:
        ctx.access.buckets.configure(rate)
    return ctx.access


def _answer(status: int, error: str, message: str, **data: Any) -> Response:
    return json_response(status, {"error": error, "message": message, **data})


def reconnect_hint(name: str, provider: str) -> str:
    """What the owner does when a grant is gone (a 409's ``hint``)."""
    return (
        f'{name} needs to be connected again: say "connect {provider}" to the bot'
        f" or run: agentd connect {provider}"
    )


def _retry(response: Response, seconds: float) -> Response:
    response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return response


@blueprint.get(f"{PREFIX}<provider>")
async def token(provider: str) -> Response:
    ctx = api_context()
    identity = cast("Identity | None", request.scope.get("agentd.identity"))
    if identity is not None and identity.via == "local":
        return _answer(
            403,
            "forbidden",
            "on the daemon's own host run `agentd token <provider>`: /v1/tokens is for"
            " other machines on the tailnet",
        )
    if identity is None or not identity.named:
        return _answer(
            403,
            "forbidden",
            "the caller has no tailnet identity: ask from a device on the tailnet, through"
            " its tailscaled",
        )
    login = identity.login or ""
    who = principal(login, identity.tags)
    if not ctx.access.policy.allows(login, identity.tags, provider):
        log.warning(
            "refused a %s token to %s (%s): not granted by [[access]]",
            provider,
            who,
            identity.node or identity.address,
        )
        return _answer(
            403,
            "forbidden",
            f"{who} is not granted {provider} tokens (the daemon's [[access]] policy)",
            who=who,
        )
    wait = ctx.access.buckets.take(who, ctx.access.now())
    if wait > 0:
        log.debug("rate limited %s (%s)", who, provider)
        return _retry(
            _answer(429, "rate_limited", f"too many token requests from {who}", who=who), wait
        )
    if ctx.broker is None:
        return _answer(503, "unavailable", "this daemon hands out no tokens")
    caller = Caller(who=who, node=identity.node, address=identity.address)
    try:
        handed = await ctx.broker.hand_out(provider, caller)
    except CredentialsMissingError as err:
        return _answer(
            409,
            err.code,
            err.message,
            hint=f"store the client credentials: agentd credentials {provider}",
        )
    except StorageError as err:
        log.error("a %s hand-out to %s was not recorded: %s", provider, who, err.code)
        return _retry(
            _answer(503, "unavailable", "the daemon cannot record hand-outs right now"),
            STORAGE_RETRY_AFTER,
        )
    if handed.handed_out:
        return _token_answer(provider, handed)
    return _failure(provider, handed, ctx.broker.clock.now())


def _token_answer(provider: str, handed: HandOut) -> Response:
    tokens = handed.outcome.tokens
    assert tokens is not None
    assert handed.record is not None
    try:
        expires = tokens.expires
        body = {
            "provider": provider,
            "access_token": tokens.access,
            "token_type": tokens.token_type or "Bearer",
            "expires": expires,
            "expires_in": (
                max(0, (expires - handed.record.at) // 1000) if expires is not None else None
            ),
            "scope": tokens.scope,
            "scope_source": tokens.extra.get("scope_source", "granted") if tokens.scope else None,
        }
        response = jsonify(body)
    except Exception:  # noqa: BLE001 - its text or context could quote the token
        raise AnswerError("the token answer could not be built") from None
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    log.debug("handed a %s token to %s (%s)", provider, handed.record.who, handed.record.address)
    return response


def _failure(provider: str, handed: HandOut, now: float) -> Response:
    outcome = handed.outcome
    if outcome.outcome is Outcome.NOT_CONNECTED:
        return _answer(
            404,
            "not_connected",
            f"{provider} is not connected on the daemon",
            hint=f"connect it on the daemon: agentd connect {provider}",
        )
    if outcome.outcome is Outcome.REAUTHORIZE:
        catalog = api_context().catalog
        hint = (
            reconnect_hint(catalog.get(provider).name, provider)
            if catalog is not None and provider in catalog
            else f"run on the daemon: agentd connect {provider}"
        )
        return _answer(
            409,
            "reauthorization_required",
            f"{provider} needs to be connected again by the owner",
            reason=outcome.reason,
            hint=hint,
        )
    retry_at = outcome.retry_at
    wait = retry_at - now if retry_at is not None else 60.0
    return _retry(
        _answer(
            503,
            "provider_unavailable",
            f"{provider} cannot be refreshed right now; try again later",
            reason=outcome.reason,
        ),
        wait,
    )
