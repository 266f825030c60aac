"""The simulated authorization server (agentd/simoauth.py), spoken to over real HTTP semantics
(httpx.ASGITransport), with a minimal simulated API beside it and dialects of real providers."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from quart import Quart, Response, request

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from flowengine.clock import ManualClock
from flowengine.protocol import code_challenge, new_code_verifier
from integrations import BearerCheck, SimDialect
from tests.fakes import asgi

REDIRECT = "https://broker.test/oauth/callback"
NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
DIALECT = SimDialect(name="Test", required_scope="offline_access", access_ttl=7200)


class MeApi:
    """The smallest simulated API: ``GET /api/me`` answers 200 on a valid bearer token."""

    provider = "test"
    dialect = DIALECT
    path_prefix = "/api/"

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def mount(self, app: Quart, bearer: BearerCheck) -> None:
        @app.get("/api/me")
        async def me() -> Response:
            header = request.headers.get("Authorization", "")
            ok = header.startswith("Bearer ") and bearer.access_token_valid(header[7:])
            return Response(json.dumps({"me": ok}), status=200 if ok else 401)

        @app.after_request
        async def note(response: Response) -> Response:
            if request.path.startswith(self.path_prefix):
                self.statuses.append(response.status_code)
            return response


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


@pytest.fixture(name="api")
def _api() -> MeApi:
    return MeApi()


@pytest.fixture(name="app")
def _app(clock: ManualClock, api: MeApi) -> Quart:
    return create_sim_app(
        api=api,
        clock=clock,
        clients={"cid": "secret", "public-app": None},
        redirect_uris=[REDIRECT],
    )


@pytest.fixture(name="sim")
def _sim(app: Quart) -> SimOAuth:
    return get_sim(app)


@pytest.fixture(name="http")
async def _http(app: Quart) -> AsyncIterator[httpx.AsyncClient]:
    transport = asgi(app)
    async with httpx.AsyncClient(transport=transport, base_url="https://sim.test") as client:
        yield client


def _authorize_params(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": "cid",
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "scope": "offline_access",
        "state": "st-123",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def _query(location: str) -> dict[str, str]:
    parts = urlsplit(location)
    return {k: v[0] for k, v in parse_qs(parts.query).items()}


async def _code(http: httpx.AsyncClient, verifier: str | None = None, **overrides: str) -> str:
    """Walk the consent page like a browser and return the code from the redirect."""
    params = _authorize_params(**overrides)
    if verifier is not None:
        params |= {"code_challenge": code_challenge(verifier), "code_challenge_method": "S256"}
    page = await http.get("/oauth/authorize", params=params)
    assert page.status_code == 200
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket is not None
    answer = await http.post(
        "/oauth/authorize", data={"ticket": ticket.group(1), "decision": "allow"}
    )
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith(REDIRECT + "?")
    query = _query(location)
    assert query["state"] == params["state"]
    return query["code"]


async def _exchange(
    http: httpx.AsyncClient, code: str, verifier: str | None = None, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "cid",
        "client_secret": "secret",
    }
    if verifier is not None:
        form["code_verifier"] = verifier
    form.update(extra)
    return await http.post("/oauth/token", data=form)


async def _refresh(http: httpx.AsyncClient, token: str, **extra: str) -> httpx.Response:
    return await http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": "cid",
            "client_secret": "secret",
            **extra,
        },
    )


async def _me(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.get("/api/me", headers={"Authorization": f"Bearer {token}"})


# ------------------------------------------------------------------------ authorize


@pytest.mark.anyio
async def test_consent_page_offers_allow_and_deny(http: httpx.AsyncClient) -> None:
    page = await http.get("/oauth/authorize", params=_authorize_params())
    assert page.status_code == 200
    assert 'value="allow"' in page.text
    assert 'value="deny"' in page.text
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket is not None
    denied = await http.post(
        "/oauth/authorize", data={"ticket": ticket.group(1), "decision": "deny"}
    )
    assert denied.status_code == 302
    assert _query(denied.headers["location"]) == {
        "error": "access_denied",
        "error_description": "The user denied access",
        "state": "st-123",
    }
    again = await http.post(
        "/oauth/authorize", data={"ticket": ticket.group(1), "decision": "allow"}
    )
    assert again.status_code == 400  # a ticket answers once


@pytest.mark.anyio
@pytest.mark.parametrize("consent", ["allow", "deny"])
async def test_scripted_consent_redirects_at_once(clock: ManualClock, consent: str) -> None:
    app = create_sim_app(
        dialect=DIALECT,
        clock=clock,
        clients={"cid": "s"},
        redirect_uris=[REDIRECT],
        consent=consent,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(transport=asgi(app), base_url="https://s") as c:
        response = await c.get("/oauth/authorize", params=_authorize_params())
    assert response.status_code == 302
    query = _query(response.headers["location"])
    assert query["state"] == "st-123"
    if consent == "allow":
        assert set(query) == {"code", "state"}
        assert get_sim(app).counters.codes_issued == 1
    else:
        assert query["error"] == "access_denied"
        assert get_sim(app).counters.codes_issued == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client_id": "nobody"}, "unknown client_id"),
        ({"redirect_uri": REDIRECT + "/"}, "redirect_uri does not match"),
        ({"redirect_uri": "https://evil.test/cb"}, "redirect_uri does not match"),
    ],
)
async def test_bad_client_or_redirect_never_redirects(
    http: httpx.AsyncClient, overrides: dict[str, str], message: str
) -> None:
    response = await http.get("/oauth/authorize", params=_authorize_params(**overrides))
    assert response.status_code == 400
    assert "location" not in response.headers
    assert message in response.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "egv"}, "invalid_scope"),
        ({"scope": None}, "invalid_scope"),
        ({"code_challenge": "x" * 43, "code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "short", "code_challenge_method": "S256"}, "invalid_request"),
        ({"client_id": "public-app"}, "invalid_request"),  # public client without PKCE
    ],
)
async def test_bad_authorize_parameters_redirect_with_error(
    http: httpx.AsyncClient, overrides: dict[str, str | None], error: str
) -> None:
    response = await http.get("/oauth/authorize", params=_authorize_params(**overrides))
    assert response.status_code == 302
    query = _query(response.headers["location"])
    assert query["error"] == error
    assert query["state"] == "st-123"
    assert "code" not in query


@pytest.mark.anyio
async def test_missing_state_is_rejected(http: httpx.AsyncClient) -> None:
    response = await http.get("/oauth/authorize", params=_authorize_params(state=None))
    assert response.status_code == 302
    assert _query(response.headers["location"])["error"] == "invalid_request"


# ---------------------------------------------------------------------------- token


@pytest.mark.anyio
async def test_code_with_pkce_exchanges_for_tokens(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    verifier = new_code_verifier()
    code = await _code(http, verifier)
    response = await _exchange(http, code, verifier)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in", "token_type", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    assert response.headers["cache-control"] == "no-store"
    assert sim.counters.token_requests == {"authorization_code": 1}
    assert sim.counters.refresh_issued == 1
    data = await _me(http, body["access_token"])
    assert data.status_code == 200


@pytest.mark.anyio
async def test_wrong_verifier_is_rejected_and_spends_the_code(http: httpx.AsyncClient) -> None:
    verifier = new_code_verifier()
    code = await _code(http, verifier)
    wrong = await _exchange(http, code, new_code_verifier())
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    right = await _exchange(http, code, verifier)
    assert right.status_code == 400
    assert right.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_missing_verifier_is_rejected(http: httpx.AsyncClient) -> None:
    code = await _code(http, new_code_verifier())
    response = await _exchange(http, code)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_code_reuse_is_rejected_and_revokes_its_tokens(http: httpx.AsyncClient) -> None:
    code = await _code(http)
    first = await _exchange(http, code)
    assert first.status_code == 200
    tokens = first.json()
    second = await _exchange(http, code)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    data = await _me(http, tokens["access_token"])
    assert data.status_code == 401
    refreshed = await _refresh(http, tokens["refresh_token"])
    assert refreshed.status_code == 400


@pytest.mark.anyio
async def test_code_expires(http: httpx.AsyncClient, clock: ManualClock) -> None:
    code = await _code(http)
    clock.advance(61)
    response = await _exchange(http, code)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_redirect_uri_must_match_at_exchange(http: httpx.AsyncClient) -> None:
    code = await _code(http)
    response = await _exchange(http, code, redirect_uri=REDIRECT + "?x=1")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_client_authentication(http: httpx.AsyncClient) -> None:
    code = await _code(http)
    wrong = await _exchange(http, code, client_secret="nope")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"

    code = await _code(http)
    basic = base64.b64encode(b"cid:secret").decode()
    ok = await http.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert ok.status_code == 200

    code = await _code(http)
    both = await http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_secret": "secret",
        },
        headers={"Authorization": f"Basic {basic}"},
    )
    assert both.status_code == 400
    assert both.json()["error"] == "invalid_request"


@pytest.mark.anyio
async def test_public_client_uses_pkce_without_secret(http: httpx.AsyncClient) -> None:
    verifier = new_code_verifier()
    code = await _code(http, verifier, client_id="public-app")
    response = await http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "public-app",
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200


@pytest.mark.anyio
async def test_unsupported_grant_type(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    response = await http.post(
        "/oauth/token",
        data={"grant_type": "password", "client_id": "cid", "client_secret": "secret"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    assert sim.counters.token_errors == {"unsupported_grant_type": 1}


@pytest.mark.anyio
async def test_refresh_tokens_rotate(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    tokens = (await _exchange(http, await _code(http))).json()
    first = await _refresh(http, tokens["refresh_token"])
    assert first.status_code == 200
    rotated = first.json()
    assert set(rotated) == {"access_token", "expires_in", "token_type", "refresh_token"}
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert rotated["access_token"] != tokens["access_token"]
    old = await _refresh(http, tokens["refresh_token"])
    assert old.status_code == 400
    assert old.json()["error"] == "invalid_grant"
    newer = await _refresh(http, rotated["refresh_token"])
    assert newer.status_code == 200
    assert sim.counters.token_requests == {"authorization_code": 1, "refresh_token": 3}
    assert sim.counters.refresh_issued == 3
    assert sim.counters.refresh_rejected == 1
    snapshot = (await http.get("/_sim/counters")).json()
    assert snapshot["token_requests"] == {"authorization_code": 1, "refresh_token": 3}
    assert snapshot["refresh_rejected"] == 1
    assert snapshot["token_errors"] == {"invalid_grant": 1}


@pytest.mark.anyio
async def test_refresh_without_rotation_keeps_the_token(clock: ManualClock) -> None:
    app = create_sim_app(
        clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT], rotate_refresh=False
    )
    sim = get_sim(app)
    refresh = sim.issue_tokens("cid")["refresh_token"]
    async with httpx.AsyncClient(transport=asgi(app), base_url="https://s") as c:
        for _ in range(2):
            response = await _refresh(c, refresh)
            assert response.status_code == 200
            assert response.json()["refresh_token"] == refresh
    assert sim.counters.refresh_issued == 1
    assert sim.counters.refresh_rejected == 0


@pytest.mark.anyio
async def test_refresh_ttl(clock: ManualClock) -> None:
    app = create_sim_app(
        clock=clock, clients={"cid": "secret"}, redirect_uris=[REDIRECT], refresh_ttl=3600
    )
    refresh = get_sim(app).issue_tokens()["refresh_token"]
    clock.advance(3600)
    async with httpx.AsyncClient(transport=asgi(app), base_url="https://s") as c:
        response = await _refresh(c, refresh)
    assert response.status_code == 400


@pytest.mark.anyio
async def test_revoke_refresh_token_kills_the_grant(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    tokens = sim.issue_tokens("cid")
    response = await http.post(
        "/oauth/revoke",
        data={
            "token": tokens["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": "cid",
            "client_secret": "secret",
        },
    )
    assert response.status_code == 200
    assert sim.counters.revocations == 1
    assert (await _refresh(http, tokens["refresh_token"])).status_code == 400
    data = await _me(http, tokens["access_token"])
    assert data.status_code == 401


# ------------------------------------------------------------------ API and injection


@pytest.mark.anyio
async def test_the_api_sees_only_live_tokens(
    http: httpx.AsyncClient, sim: SimOAuth, api: MeApi, clock: ManualClock
) -> None:
    token = sim.issue_tokens()["access_token"]
    assert (await _me(http, token)).status_code == 200
    clock.advance(7200)
    assert (await _me(http, token)).status_code == 401
    assert (await _me(http, "made-up")).status_code == 401
    assert api.statuses == [200, 401, 401]


@pytest.mark.anyio
async def test_injection_defaults_to_the_api_prefix(
    http: httpx.AsyncClient, sim: SimOAuth, api: MeApi
) -> None:
    tokens = sim.issue_tokens()
    sim.inject(429, retry_after=7)
    sim.inject(503)
    refreshed = await _refresh(http, tokens["refresh_token"])
    assert refreshed.status_code == 200  # the token endpoint is not under /api/
    limited = await _me(http, refreshed.json()["access_token"])
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    unavailable = await _me(http, refreshed.json()["access_token"])
    assert unavailable.status_code == 503
    assert (await _me(http, refreshed.json()["access_token"])).status_code == 200
    assert sim.counters.injected == 2
    assert api.statuses == [429, 503, 200]


@pytest.mark.anyio
async def test_token_endpoint_injection(http: httpx.AsyncClient, sim: SimOAuth) -> None:
    sim.inject(502, path_prefix="/oauth/token")
    refresh = sim.issue_tokens()["refresh_token"]
    assert (await _refresh(http, refresh)).status_code == 502
    assert (await _refresh(http, refresh)).status_code == 200


# ------------------------------------------------------------------------ dialects

ENVELOPED = SimDialect(
    name="Enveloped",
    authorize_path="/oauth2_user/authorize2",
    token_path="/v2/oauth2",
    revoke_path=None,
    token_params={"action": "requesttoken"},
    envelope=True,
    envelope_errors={"invalid_client": 401, "default": 503},
    scope_separator=",",
    scopes=("user.metrics", "user.activity"),
    response_extra={"userid": 363},
    token_scope=True,
    code_ttl=30,
    access_ttl=10800,
    old_refresh_grace=8 * 3600,
    old_refresh_dies_on_use=True,
)


@pytest.fixture(name="enveloped")
async def _enveloped(clock: ManualClock, api: MeApi) -> AsyncIterator[httpx.AsyncClient]:
    app = create_sim_app(
        api=api,
        dialect=ENVELOPED,
        clock=clock,
        clients={"cid": "secret"},
        redirect_uris=[REDIRECT],
        consent="allow",
    )
    transport = asgi(app)
    async with httpx.AsyncClient(transport=transport, base_url="https://sim.test") as client:
        client.sim = get_sim(app)  # type: ignore[attr-defined]
        yield client


async def _enveloped_code(http: httpx.AsyncClient, scope: str) -> httpx.Response:
    return await http.get(
        "/oauth2_user/authorize2",
        params=_authorize_params(scope=scope),
    )


@pytest.mark.anyio
async def test_envelope_dialect_wraps_answers_and_errors_in_http_200(
    enveloped: httpx.AsyncClient, clock: ManualClock
) -> None:
    redirected = await _enveloped_code(enveloped, "user.metrics,user.activity")
    code = _query(redirected.headers["location"])["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "cid",
        "client_secret": "secret",
    }
    missing_action = await enveloped.post("/v2/oauth2", data=form)
    assert missing_action.status_code == 200
    assert missing_action.json()["status"] == 503
    assert "action" in missing_action.json()["error"]
    # the failed attempt did not spend the code: the action was checked first
    answer = await enveloped.post("/v2/oauth2", data={**form, "action": "requesttoken"})
    assert answer.status_code == 200
    envelope = answer.json()
    assert envelope["status"] == 0
    body = envelope["body"]
    assert set(body) == {
        "access_token",
        "refresh_token",
        "expires_in",
        "token_type",
        "scope",
        "userid",
    }
    assert body["scope"] == "user.metrics,user.activity"
    assert body["expires_in"] == 10800
    bad_client = await enveloped.post(
        "/v2/oauth2",
        data={**form, "action": "requesttoken", "client_secret": "nope"},
    )
    assert bad_client.status_code == 200
    assert bad_client.json() == {"status": 401, "body": {}, "error": "client authentication failed"}


@pytest.mark.anyio
async def test_envelope_dialect_scopes_are_comma_separated_and_listed(
    enveloped: httpx.AsyncClient,
) -> None:
    refused = await _enveloped_code(enveloped, "user.info,user.metrics")
    query = _query(refused.headers["location"])
    assert query["error"] == "invalid_scope"
    assert "user.info" in query["error_description"]
    spaced = await _enveloped_code(enveloped, "user.metrics user.activity")
    assert _query(spaced.headers["location"])["error"] == "invalid_scope"


@pytest.mark.anyio
async def test_rotated_refresh_token_lives_until_the_new_access_token_is_used(
    enveloped: httpx.AsyncClient, clock: ManualClock
) -> None:
    sim: SimOAuth = enveloped.sim  # type: ignore[attr-defined]
    first = sim.issue_tokens(scope="user.metrics")
    action = {"action": "requesttoken"}

    async def refresh(token: str) -> dict[str, object]:
        form = {"grant_type": "refresh_token", "refresh_token": token, **action}
        form |= {"client_id": "cid", "client_secret": "secret"}
        answer = (await enveloped.post("/v2/oauth2", data=form)).json()
        assert isinstance(answer, dict)
        return answer

    second = await refresh(first["refresh_token"])
    assert second["status"] == 0
    # within the grace period and before the new access token is used: the old one works
    third = await refresh(first["refresh_token"])
    assert third["status"] == 0
    body = third["body"]
    assert isinstance(body, dict)
    assert (await _me(enveloped, str(body["access_token"]))).status_code == 200
    # the new access token was used: the old refresh token is dead
    dead = await refresh(first["refresh_token"])
    assert dead["status"] == 503
    # a rotated token whose successor is never used dies after 8 hours
    fourth = await refresh(str(body["refresh_token"]))
    assert fourth["status"] == 0
    clock.advance(8 * 3600)
    assert (await refresh(str(body["refresh_token"])))["status"] == 503
