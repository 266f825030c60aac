"""create_app: the Quart application of the daemon's HTTP API.

Routes (see api/oauth.py and api/inspection.py)::

    GET  /oauth/callback              provider redirect -> HTML page     (no bearer)
    GET  /oauth/pending/<state>       outcome, or the one-time code      (bearer)
    POST /oauth/flows                 start a flow the daemon completes  (bearer)
    GET  /oauth/flows/<id>/outcome    long-poll a flow's outcome         (bearer)
    GET  /oauth/flows                 flow list                          (bearer)
    GET  /oauth/flows/<id>            flow + ledger events               (bearer)
    GET  /oauth/flows/<id>/diagram    Mermaid / SVG / dot                (bearer)
    GET  /v1/tokens/<provider>        an access token for a tailnet peer (whois + [[access]])
    GET  /healthz                     liveness                           (no bearer)

"bearer" routes need no token on the local listener (the state dir's unix socket).
``/v1/tokens`` takes no bearer: the caller's tailnet identity and the ``[[access]]`` policy
decide (api/tokens.py), and it answers only on the tailnet listener.
Every request first passes :class:`api.guard.TailnetGuard` (tailnet or loopback sources,
no Funnel, optional owner check). Errors are mapped in one handler: JSON for the API,
an HTML page for the callback. Every response carries no-store, no-referrer, nosniff and
a strict Content-Security-Policy.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response, render_template, request
from werkzeug.exceptions import HTTPException

from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.engine import FlowEngine
from flowengine.errors import BrokerError

from .context import ApiContext
from .errors import page_text, status_for
from .guard import SECURITY_HEADERS, TailnetGuard, loggable_path
from .inspection import blueprint as inspection_blueprint
from .oauth import blueprint as oauth_blueprint
from .settings import ApiSettings
from .tailscale import LocalAPI, TailscaleClient
from .tokens import PREFIX as TOKENS_PREFIX
from .tokens import blueprint as tokens_blueprint
from .wire import json_response

__all__ = ["create_app", "stop_waiters"]

log = logging.getLogger("api")

HTML_PATHS = ("/oauth/callback",)


def stop_waiters(app: Quart) -> None:
    """The daemon is stopping: every long-poll answers now (503, retry later)."""
    ctx: ApiContext = app.extensions["agentd"]
    ctx.stopping.set()
    ctx.engine.wake_all()


def _wants_html() -> bool:
    return request.path in HTML_PATHS


async def _error_page(status: int, title: str, message: str) -> Response:
    body = await render_template("message.html", kind="error", title=title, message=message)
    return Response(body, status=status, content_type="text/html; charset=utf-8")


async def _handle_broker_error(error: BrokerError) -> Response:
    status = status_for(error)
    if status >= 500:
        log.error("%s %s failed: %s", request.method, loggable_path(request.path), error.message)
    if _wants_html():
        title, message = page_text(error)
        return await _error_page(status, title, message)
    payload: dict[str, Any] = {"error": error.code, "message": error.message}
    parameter = getattr(error, "parameter", None)
    if parameter:
        payload["parameter"] = parameter
    response = json_response(status, payload)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="agentd"'
    return response


async def _handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if _wants_html():
        return await _error_page(status, "Something went wrong", error.name)
    return json_response(
        status, {"error": error.name.lower().replace(" ", "_"), "message": error.name}
    )


async def _handle_unexpected(error: Exception) -> Response:
    # the message may hold anything: log the type only, show nothing
    log.exception(
        "%s %s: unexpected %s", request.method, loggable_path(request.path), type(error).__name__
    )
    if _wants_html():
        return await _error_page(
            500, "Something went wrong", "The daemon could not handle this request."
        )
    return json_response(500, {"error": "internal_error", "message": "internal error"})


def create_app(
    engine: FlowEngine,
    *,
    settings: ApiSettings,
    catalog: Catalog | None = None,
    tailscale: TailscaleClient | None = None,
    broker: Broker | None = None,
    redirect_uri: str = "",
    own_addresses: tuple[str, ...] = (),
    userspace: bool = False,
) -> Quart:
    """The API application; ``engine`` and friends are on ``app.extensions["agentd"]``.

    ``tailscale`` answers whois for the owner check (tls and serve mode); when the check is
    on and none is given, a LocalAPI client on ``settings.localapi_socket`` is made (and
    closed after serving). ``broker``: the daemon completes the flows it owns through it.
    ``own_addresses`` (the node's Tailscale IPs) and ``userspace`` (tailscaled's
    userspace networking) come from the serving plan and tune the guard.
    """
    app = Quart(
        __name__,
        static_folder="static",
        static_url_path="/static",
        template_folder="templates",
    )
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    own_localapi: LocalAPI | None = None
    if tailscale is None and settings.owner_check and settings.mode in ("tls", "serve"):
        own_localapi = LocalAPI(settings.localapi_socket, whois_timeout=settings.whois_timeout)
        tailscale = own_localapi
    app.extensions["agentd"] = ApiContext(
        engine, settings, catalog, tailscale, broker=broker, redirect_uri=redirect_uri
    )
    app.engine = engine  # type: ignore[attr-defined]

    app.register_blueprint(oauth_blueprint)
    app.register_blueprint(inspection_blueprint)
    app.register_blueprint(tokens_blueprint)
    app.register_error_handler(BrokerError, _handle_broker_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(200, {"status": "ok", "mode": settings.mode})

    @app.after_request
    async def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS:
            response.headers[name.decode()] = value.decode()
        return response

    if own_localapi is not None:

        @app.after_serving
        async def close_localapi() -> None:
            await own_localapi.aclose()

    app.asgi_app = TailnetGuard(  # type: ignore[method-assign, assignment]
        app.asgi_app,  # type: ignore[arg-type]
        mode=settings.mode,
        allowed_logins=settings.allowed_logins,
        whois=tailscale.whois if tailscale is not None else None,
        html_paths=HTML_PATHS,
        own_addresses=own_addresses,
        userspace=userspace,
        identify_prefixes=(TOKENS_PREFIX,),
    )
    return app
