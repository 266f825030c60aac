"""A simulated OAuth 2.0 authorization server, with a simulated data API beside it.

Used by the test-suite (in-process through ``httpx.ASGITransport``) and by the demo (served
by Hypercorn like any Quart app). :func:`create_sim_app` returns a Quart app; its state,
counters and failure injection live on a :class:`SimOAuth` reachable with :func:`get_sim`.

The server is generic; a :class:`~integrations.SimDialect` says how a given provider's
endpoints look on the wire (paths, extra token parameters, a ``{"status", "body"}``
envelope, the scope separator, rotation grace). An integration's simulator
(``integrations/<name>/sim.py``: the data API, e.g. Dexcom's ``/v3/users/self/egvs``)
brings its dialect and mounts its routes next to these, checking bearer tokens with
:meth:`SimOAuth.access_token_valid`. Without one, the generic dialect serves::

    GET  /oauth/authorize   consent page (Allow / Deny) or scripted allow / deny
    POST /oauth/authorize   the consent form's answer -> 302 to redirect_uri
    POST /oauth/token       grant_type=authorization_code | refresh_token
    POST /oauth/revoke      RFC 7009 revocation
    GET  /_sim/counters     the counters as JSON (demo dashboards)

Behaviour (RFC 6749 and RFC 7636 as written; what real providers document where they say
more): codes are single-use and short-lived, a reused code revokes what it produced
(RFC 6749 §4.1.2), the redirect URI must match exactly at authorize and at exchange,
PKCE S256 is checked when a challenge was sent (and required for public clients), client
authentication is client_secret_post or client_secret_basic (never both), refresh tokens
rotate unless ``rotate_refresh`` is off. Code lifetime, refresh-token lifetime and
rotation are parameters, not facts about any provider.

No secret (client secret, code, verifier, token) is ever logged or returned except the
tokens the token endpoint hands out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from quart import Quart, Response, request

from flowengine.clock import Clock, SystemClock
from integrations import SimDialect, Simulator

__all__ = [
    "GENERIC_DIALECT",
    "SimCounters",
    "SimOAuth",
    "create_sim_app",
    "get_sim",
]

_EXTENSION = "simoauth"

Consent = Literal["ask", "allow", "deny"]

#: the dialect of a plain RFC 6749 provider (no envelope, space-separated scopes)
GENERIC_DIALECT = SimDialect(name="Simulated provider")


@dataclass
class SimCounters:
    """What the authorization server saw; tests and the demo read these."""

    token_requests: Counter[str] = field(default_factory=Counter)  # by grant_type
    token_errors: Counter[str] = field(default_factory=Counter)  # by OAuth error code
    codes_issued: int = 0
    access_tokens_issued: int = 0
    refresh_issued: int = 0
    refresh_rejected: int = 0
    revocations: int = 0
    injected: int = 0


@dataclass
class _Pending:
    client_id: str
    redirect_uri: str
    state: str | None
    challenge: str | None
    scope: str
    expires_at: float


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str | None
    scope: str
    expires_at: float
    used: bool = False
    issued_refresh: set[str] = field(default_factory=set)


@dataclass
class _Access:
    client_id: str
    expires_at: float
    refresh: str | None


@dataclass
class _Refresh:
    client_id: str
    expires_at: float | None
    scope: str
    active: bool = True
    #: the refresh token that replaced this one (rotation with a grace period)
    successor: str | None = None
    #: when the grace period of a replaced token ends
    grace_until: float | None = None


@dataclass
class _Injection:
    status: int
    remaining: int
    retry_after: str | None
    path_prefix: str
    in_envelope: bool = False


class _OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class SimOAuth:
    """The authorization server's state. Built by :func:`create_sim_app`."""

    def __init__(
        self,
        *,
        clock: Clock,
        dialect: SimDialect,
        api: Simulator | None,
        access_ttl: int,
        refresh_ttl: int | None,
        code_ttl: int,
        rotate_refresh: bool,
        clients: Mapping[str, str | None],
        redirect_uris: Mapping[str, list[str]],
        consent: Consent,
        require_state: bool,
        require_pkce: bool,
    ) -> None:
        self.clock = clock
        self.dialect = dialect
        self.api = api
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.code_ttl = code_ttl
        self.rotate_refresh = rotate_refresh
        self.clients = dict(clients)
        self.redirect_uris = {k: list(v) for k, v in redirect_uris.items()}
        self.consent: Consent = consent
        self.require_state = require_state
        self.require_pkce = require_pkce
        self.counters = SimCounters()
        self._pending: dict[str, _Pending] = {}
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._injections: list[_Injection] = []

    # ---------------------------------------------------------------- test/demo API

    def inject(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after: float | str | None = None,
        path_prefix: str | None = None,
        in_envelope: bool = False,
    ) -> None:
        """Answer the next ``count`` requests under ``path_prefix`` with HTTP ``status``.

        The prefix defaults to the data API's (``/`` without one). ``retry_after`` becomes
        a ``Retry-After`` header (seconds or an HTTP-date string). ``in_envelope``: answer
        HTTP 200 ``{"status": <status>, "body": {}, "error": ...}`` instead (envelope
        dialects: Withings' 601 "too many requests").
        """
        after = None if retry_after is None else str(retry_after)
        if isinstance(retry_after, float) and retry_after.is_integer():
            after = str(int(retry_after))
        prefix = (
            path_prefix if path_prefix is not None else (self.api.path_prefix if self.api else "/")
        )
        self._injections.append(_Injection(status, count, after, prefix, in_envelope))

    def issue_tokens(self, client_id: str | None = None, *, scope: str = "") -> dict[str, Any]:
        """Mint a token pair without the browser dance (demo seeding, client tests)."""
        cid = client_id if client_id is not None else next(iter(self.clients))
        if cid not in self.clients:
            raise KeyError(f"unknown sim client {cid!r}")
        return self._token_response(cid, None, scope)

    def expire_access_tokens(self) -> None:
        """Make every issued access token expired (refresh tokens stay valid)."""
        now = self.clock.now()
        for entry in self._access.values():
            entry.expires_at = min(entry.expires_at, now)

    def access_token_valid(self, token: str) -> bool:
        """For the data API: an unexpired access token this server issued."""
        entry = self._access.get(token)
        if entry is None or self.clock.now() >= entry.expires_at:
            return False
        if self.dialect.old_refresh_dies_on_use and entry.refresh is not None:
            self._retire_predecessors(entry.refresh)
        return True

    def counters_snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON-ready data (no secrets in them)."""
        c = self.counters
        return {
            "token_requests": dict(c.token_requests),
            "token_errors": dict(c.token_errors),
            "codes_issued": c.codes_issued,
            "access_tokens_issued": c.access_tokens_issued,
            "refresh_issued": c.refresh_issued,
            "refresh_rejected": c.refresh_rejected,
            "revocations": c.revocations,
            "injected": c.injected,
        }

    # ----------------------------------------------------------------------- tokens

    def _new_refresh(self, client_id: str, scope: str) -> str:
        token = secrets.token_urlsafe(32)
        expires = None if self.refresh_ttl is None else self.clock.now() + self.refresh_ttl
        self._refresh[token] = _Refresh(client_id, expires, scope)
        self.counters.refresh_issued += 1
        return token

    def _token_response(self, client_id: str, refresh: str | None, scope: str) -> dict[str, Any]:
        if refresh is None:
            refresh = self._new_refresh(client_id, scope)
        access = secrets.token_urlsafe(32)
        self._access[access] = _Access(client_id, self.clock.now() + self.access_ttl, refresh)
        self.counters.access_tokens_issued += 1
        body: dict[str, Any] = {
            "access_token": access,
            "expires_in": self.access_ttl,
            "token_type": "Bearer",
            "refresh_token": refresh,
        }
        if self.dialect.token_scope:
            body["scope"] = scope
        body.update(self.dialect.response_extra)
        return body

    def _revoke_refresh(self, token: str) -> None:
        entry = self._refresh.get(token)
        if entry is not None:
            entry.active = False
        for access in self._access.values():
            if access.refresh == token:
                access.expires_at = float("-inf")

    def _retire_predecessors(self, refresh: str) -> None:
        """The new pair was used: refresh tokens it replaced stop working now."""
        for entry in self._refresh.values():
            if entry.successor == refresh and entry.grace_until is not None:
                entry.active = False
                entry.grace_until = None

    def _refresh_usable(self, entry: _Refresh, client_id: str, now: float) -> bool:
        if entry.client_id != client_id:
            return False
        if entry.expires_at is not None and now >= entry.expires_at:
            return False
        if entry.grace_until is not None:
            return now < entry.grace_until and entry.active
        return entry.active

    def _authenticate_client(self, form: Mapping[str, str]) -> str:
        """client_secret_post, client_secret_basic, or none for public clients."""
        header = request.headers.get("Authorization", "")
        basic_id = basic_secret = None
        if header[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
                basic_id, _, basic_secret = raw.partition(":")
            except (binascii.Error, UnicodeDecodeError) as err:
                raise _OAuthError("invalid_client", "malformed Basic credentials", 401) from err
            basic_id, basic_secret = unquote_plus(basic_id), unquote_plus(basic_secret)
            if "client_secret" in form:
                raise _OAuthError("invalid_request", "more than one client authentication method")
        client_id = basic_id if basic_id is not None else form.get("client_id", "")
        if basic_id is not None and form.get("client_id") not in (None, basic_id):
            raise _OAuthError("invalid_request", "client_id does not match the Basic credentials")
        secret = basic_secret if basic_id is not None else form.get("client_secret")
        if client_id not in self.clients:
            raise _OAuthError("invalid_client", "unknown client", 401)
        expected = self.clients[client_id]
        if expected is None:  # public client
            if secret:
                raise _OAuthError("invalid_client", "public clients send no secret", 401)
            return client_id
        if not secret or not hmac.compare_digest(secret.encode(), expected.encode()):
            raise _OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def _check_token_params(self, form: Mapping[str, str]) -> None:
        for key, value in self.dialect.token_params.items():
            if form.get(key) != value:
                raise _OAuthError("invalid_request", f"{key} must be {value}")

    def _grant_code(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        code_value = form.get("code", "")
        code = self._codes.get(code_value)
        if code is None:
            raise _OAuthError("invalid_grant", "unknown authorization code")
        if code.used:
            # RFC 6749 §4.1.2: a reused code SHOULD revoke what it produced.
            for token in code.issued_refresh:
                self._revoke_refresh(token)
            raise _OAuthError("invalid_grant", "authorization code already used")
        code.used = True  # any attempt spends the code (no verifier guessing)
        if code.client_id != client_id:
            raise _OAuthError("invalid_grant", "code was issued to another client")
        if self.clock.now() >= code.expires_at:
            raise _OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != code.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri does not match the authorize request")
        verifier = form.get("code_verifier")
        if code.challenge is not None:
            if not verifier:
                raise _OAuthError("invalid_grant", "code_verifier required")
            digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
            computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
            if not hmac.compare_digest(computed, code.challenge):
                raise _OAuthError("invalid_grant", "code_verifier does not match the challenge")
        elif verifier:
            raise _OAuthError("invalid_grant", "code_verifier sent but no challenge was")
        body = self._token_response(client_id, None, code.scope)
        code.issued_refresh.add(body["refresh_token"])
        return body

    def _grant_refresh(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token", "")
        entry = self._refresh.get(token)
        now = self.clock.now()
        if entry is None or not self._refresh_usable(entry, client_id, now):
            self.counters.refresh_rejected += 1
            raise _OAuthError("invalid_grant", "refresh token is invalid, expired or revoked")
        if not self.rotate_refresh:
            return self._token_response(client_id, token, entry.scope)
        body = self._token_response(client_id, None, entry.scope)
        grace = self.dialect.old_refresh_grace
        if grace is None:
            entry.active = False
        else:
            entry.successor = body["refresh_token"]
            entry.grace_until = now + grace
        return body

    # ----------------------------------------------------------------------- answers

    def token_answer(self, body: dict[str, Any]) -> Response:
        if self.dialect.envelope:
            return _json({"status": 0, "body": body}, 200, {"Cache-Control": "no-store"})
        return _json(body, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def error_answer(self, err: _OAuthError) -> Response:
        if self.dialect.envelope:
            errors = self.dialect.envelope_errors
            status = errors.get(err.error, errors.get("default", 503))
            return _json({"status": status, "body": {}, "error": f"{err.description}"}, 200)
        return _oauth_json(err.error, err.description, err.status)


# ------------------------------------------------------------------------- helpers


def _oauth_json(error: str, description: str, status: int) -> Response:
    resp = Response(
        json.dumps({"error": error, "error_description": description}),
        status=status,
        content_type="application/json",
    )
    resp.headers["Cache-Control"] = "no-store"
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="sim"'
    return resp


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    resp = Response(json.dumps(body), status=status, content_type="application/json")
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _with_query(uri: str, params: Mapping[str, str | None]) -> str:
    parts = urlsplit(uri)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _redirect(location: str) -> Response:
    resp = Response("", status=302)
    resp.headers["Location"] = location
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _error_page(message: str, status: int = 400) -> Response:
    text = (
        "<!doctype html><html><head><title>Sign-in error</title></head><body>"
        f"<h1>Cannot continue</h1><p>{html.escape(message)}</p></body></html>"
    )
    return Response(text, status=status, content_type="text/html; charset=utf-8")


def _consent_page(
    dialect: SimDialect, ticket: str, client_id: str, redirect_uri: str, scope: str
) -> str:
    name = html.escape(dialect.name)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{name} (simulated) - Authorize</title>
<style>body{{font-family:sans-serif;max-width:32rem;margin:3rem auto}}
button{{font-size:1.1rem;padding:.5rem 1.5rem;margin-right:1rem}}</style></head>
<body><h1>Simulated {name}</h1>
<p>The application <strong>{html.escape(client_id)}</strong> asks for access
(scope <code>{html.escape(scope or "-")}</code>).</p>
<p>You will be sent back to <code>{html.escape(redirect_uri)}</code>.</p>
<form method="post" action="{html.escape(dialect.authorize_path)}">
<input type="hidden" name="ticket" value="{html.escape(ticket)}">
<button type="submit" name="decision" value="allow" id="allow">Allow</button>
<button type="submit" name="decision" value="deny" id="deny">Deny</button>
</form></body></html>"""


# ----------------------------------------------------------------------------- app


def create_sim_app(
    *,
    api: Simulator | None = None,
    dialect: SimDialect | None = None,
    clock: Clock | None = None,
    access_ttl: int | None = None,
    refresh_ttl: int | None = None,
    code_ttl: int | None = None,
    rotate_refresh: bool = True,
    clients: Mapping[str, str | None] | None = None,
    redirect_uris: Iterable[str] | Mapping[str, Iterable[str]] = (),
    consent: Consent = "ask",
    require_state: bool = True,
    require_pkce: bool = False,
) -> Quart:
    """Build the simulated provider: an authorization server plus ``api``'s routes.

    The dialect is ``dialect``, else the api's, else :data:`GENERIC_DIALECT`; ``access_ttl``
    and ``code_ttl`` default to the dialect's. ``clients`` maps client_id to its secret
    (``None``: a public client, PKCE then required). ``redirect_uris`` is one list for
    every client or a mapping per client; matched exactly. ``consent``: "ask" shows the
    Allow/Deny page, "allow"/"deny" answer at once (scripted runs).
    """
    chosen = dialect or (api.dialect if api is not None else GENERIC_DIALECT)
    if clients is None:
        clients = {"sim-client": "sim-secret"}
    if isinstance(redirect_uris, Mapping):
        uris = {cid: list(v) for cid, v in redirect_uris.items()}
    else:
        shared = list(redirect_uris)
        uris = {cid: shared for cid in clients}
    sim = SimOAuth(
        clock=clock or SystemClock(),
        dialect=chosen,
        api=api,
        access_ttl=chosen.access_ttl if access_ttl is None else access_ttl,
        refresh_ttl=refresh_ttl,
        code_ttl=chosen.code_ttl if code_ttl is None else code_ttl,
        rotate_refresh=rotate_refresh,
        clients=clients,
        redirect_uris=uris,
        consent=consent,
        require_state=require_state,
        require_pkce=require_pkce,
    )
    app = Quart(__name__)
    app.extensions[_EXTENSION] = sim
    d = chosen

    @app.before_request
    async def injected() -> Response | None:
        for inj in sim._injections:
            if inj.remaining > 0 and request.path.startswith(inj.path_prefix):
                inj.remaining -= 1
                sim.counters.injected += 1
                headers = {"Retry-After": inj.retry_after} if inj.retry_after else {}
                if inj.in_envelope:
                    body = {"status": inj.status, "body": {}, "error": "simulated failure"}
                    return _json(body, 200, headers)
                return _json(
                    {"error": "injected", "error_description": f"simulated HTTP {inj.status}"},
                    inj.status,
                    headers,
                )
        sim._injections = [i for i in sim._injections if i.remaining > 0]
        return None

    def decide(pending: _Pending, allow: bool) -> Response:
        if not allow:
            return _redirect(
                _with_query(
                    pending.redirect_uri,
                    {
                        "error": "access_denied",
                        "error_description": "The user denied access",
                        "state": pending.state,
                    },
                )
            )
        code = secrets.token_urlsafe(24)
        sim._codes[code] = _Code(
            pending.client_id,
            pending.redirect_uri,
            pending.challenge,
            pending.scope,
            sim.clock.now() + sim.code_ttl,
        )
        sim.counters.codes_issued += 1
        return _redirect(_with_query(pending.redirect_uri, {"code": code, "state": pending.state}))

    @app.get(d.authorize_path)
    async def authorize() -> Response:
        args = request.args
        client_id = args.get("client_id", "")
        redirect_uri = args.get("redirect_uri", "")
        if client_id not in sim.clients:
            return _error_page("unknown client_id")
        if redirect_uri not in sim.redirect_uris.get(client_id, []):
            return _error_page("redirect_uri does not match the registered one")
        state = args.get("state")

        def fail(error: str, description: str) -> Response:
            return _redirect(
                _with_query(
                    redirect_uri, {"error": error, "error_description": description, "state": state}
                )
            )

        if args.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        if sim.require_state and not state:
            return fail("invalid_request", "state is required")
        scope = args.get("scope") or ""
        asked = [s for s in scope.split(d.scope_separator) if s]
        if d.required_scope and d.required_scope not in asked:
            return fail("invalid_scope", f"scope must include {d.required_scope}")
        unknown = [s for s in asked if d.scopes and s not in d.scopes]
        if unknown:
            return fail("invalid_scope", f"scope {unknown[0]!r} is not available to this app")
        challenge = args.get("code_challenge")
        if challenge is not None:
            if args.get("code_challenge_method") != "S256":
                return fail("invalid_request", "code_challenge_method must be S256")
            if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
                return fail("invalid_request", "malformed code_challenge")
        elif sim.require_pkce or sim.clients[client_id] is None:
            return fail("invalid_request", "PKCE code_challenge required")
        pending = _Pending(client_id, redirect_uri, state, challenge, scope, sim.clock.now() + 600)
        if sim.consent == "allow":
            return decide(pending, True)
        if sim.consent == "deny":
            return decide(pending, False)
        ticket = secrets.token_urlsafe(16)
        sim._pending[ticket] = pending
        page = _consent_page(d, ticket, client_id, redirect_uri, scope)
        return Response(page, status=200, content_type="text/html; charset=utf-8")

    @app.post(d.authorize_path)
    async def consent_answer() -> Response:
        form = await request.form
        pending = sim._pending.pop(form.get("ticket", ""), None)
        if pending is None or sim.clock.now() >= pending.expires_at:
            return _error_page("this sign-in page expired; start again")
        return decide(pending, form.get("decision") == "allow")

    @app.post(d.token_path)
    async def token() -> Response:
        form = {k: v for k, v in (await request.form).items()}
        grant = form.get("grant_type", "")
        sim.counters.token_requests[grant or "(none)"] += 1
        try:
            sim._check_token_params(form)
            client_id = sim._authenticate_client(form)
            if grant == "authorization_code":
                body = sim._grant_code(client_id, form)
            elif grant == "refresh_token":
                body = sim._grant_refresh(client_id, form)
            else:
                raise _OAuthError("unsupported_grant_type", "unsupported grant_type")
        except _OAuthError as err:
            sim.counters.token_errors[err.error] += 1
            return sim.error_answer(err)
        return sim.token_answer(body)

    if d.revoke_path is not None:

        @app.post(d.revoke_path)
        async def revoke() -> Response:
            form = {k: v for k, v in (await request.form).items()}
            try:
                client_id = sim._authenticate_client(form)
            except _OAuthError as err:
                return _oauth_json(err.error, err.description, err.status)
            value = form.get("token", "")
            if value in sim._refresh and sim._refresh[value].client_id == client_id:
                sim._revoke_refresh(value)
                sim.counters.revocations += 1
            elif value in sim._access and sim._access[value].client_id == client_id:
                sim._access[value].expires_at = float("-inf")
                sim.counters.revocations += 1
            return Response("", status=200)

    @app.get("/_sim/counters")
    async def counters() -> Response:
        return _json(sim.counters_snapshot())

    if api is not None:
        api.mount(app, sim)
    return app


def get_sim(app: Quart) -> SimOAuth:
    """The :class:`SimOAuth` behind an app built by :func:`create_sim_app`."""
    sim = app.extensions.get(_EXTENSION)
    if not isinstance(sim, SimOAuth):
        raise LookupError("not a simulated provider app")
    return sim
