"""Fake OAuth providers for unit tests: small httpx.MockTransport handler classes.

``FakeProvider`` is a token endpoint (and RFC 7009 revocation endpoint) with the quirks of
real providers switched on by constructor arguments: client auth method, required extra
token parameters, a Withings-like ``{status, body}`` envelope, rotation, missing
``expires_in``, missing ``refresh_token`` on refresh. Failures are queued with
``fail_next``. It checks what a real server checks (client auth, PKCE, redirect URI,
single-use codes, refresh-token validity) and records every request it saw.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus

import anyio
import httpx

from flowengine.catalog import ProviderSpec, load_catalog
from flowengine.credentials import ClientCredentials

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from quart import Quart


@dataclass
class SeenRequest:
    path: str
    form: dict[str, str]
    authorization: str | None


@dataclass
class _Code:
    redirect_uri: str
    challenge: str | None


@dataclass
class FakeProvider:
    """A token endpoint on ``https://<host>``; call ``transport()`` for an httpx transport."""

    host: str = "fake.test"
    auth_method: str = "client_secret_post"
    client_id: str = "client-123"
    client_secret: str | None = "secret-456"
    token_params: Mapping[str, str] = field(default_factory=dict)
    envelope: bool = False
    rotate: bool = True
    expires_in: int | None = 3600
    refresh_on_refresh: bool = True
    scope: str | None = "read"
    delay: float = 0.0
    revocation: bool = True

    requests: list[SeenRequest] = field(default_factory=list)
    codes: dict[str, _Code] = field(default_factory=dict)
    valid_refresh: set[str] = field(default_factory=set)
    valid_access: set[str] = field(default_factory=set)
    revoked: list[str] = field(default_factory=list)
    queued: list[httpx.Response | Exception] = field(default_factory=list)

    # ------------------------------------------------------------------ helpers

    def spec(self, provider_id: str = "fake", **overrides: Any) -> ProviderSpec:
        values: dict[str, Any] = {
            "id": provider_id,
            "name": "Fake",
            "authorize_url": f"https://{self.host}/authorize",
            "token_url": f"https://{self.host}/token",
            "revocation_url": f"https://{self.host}/revoke" if self.revocation else None,
            "scopes": ("read",),
            "use_pkce": True,
            "token_auth_method": self.auth_method,
            "token_params": dict(self.token_params),
            "response_envelope": "body" if self.envelope else None,
        }
        if self.envelope:
            # the envelope statuses of the built-in Withings entry, the provider it imitates
            withings = load_catalog().get("withings")
            values["envelope_transient"] = withings.envelope_transient
            values["envelope_reauthorize"] = withings.envelope_reauthorize
        values.update(overrides)
        return ProviderSpec(**values)

    def credentials(self) -> ClientCredentials:
        return ClientCredentials(self.client_id, self.client_secret)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def logged_transport(self, log: Path) -> httpx.MockTransport:
        """:meth:`transport`, appending each request's path to ``log`` first: processes
        sharing the file count the provider's requests between them."""

        async def logged(request: httpx.Request) -> httpx.Response:
            with log.open("a") as fh:
                fh.write(request.url.path + "\n")
            return await self.handle(request)

        return httpx.MockTransport(logged)

    def issue_code(self, *, redirect_uri: str, code_verifier: str | None = None) -> str:
        code = secrets.token_urlsafe(16)
        challenge = None
        if code_verifier is not None:
            digest = hashlib.sha256(code_verifier.encode()).digest()
            challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        self.codes[code] = _Code(redirect_uri, challenge)
        return code

    def issue_refresh(self) -> str:
        token = "r-" + secrets.token_urlsafe(12)
        self.valid_refresh.add(token)
        return token

    def fail_next(self, *responses: httpx.Response | Exception) -> None:
        self.queued.extend(responses)

    def grants(self, grant_type: str) -> int:
        return sum(1 for r in self.requests if r.form.get("grant_type") == grant_type)

    # --------------------------------------------------------------- responses

    def _wrap(self, status: int, body: dict[str, Any]) -> httpx.Response:
        if self.envelope:
            if status == 200:
                return httpx.Response(200, json={"status": 0, "body": body})
            # Withings answers HTTP 200 with a non-zero status and a text error
            text = f"Invalid Params: {body.get('error_description') or body.get('error')}"
            return httpx.Response(200, json={"status": 503, "error": text})
        return httpx.Response(status, json=body)

    def _error(self, status: int, error: str, description: str = "") -> httpx.Response:
        return self._wrap(status, {"error": error, "error_description": description})

    def _tokens(self, *, with_refresh: bool) -> httpx.Response:
        access = "a-" + secrets.token_urlsafe(12)
        self.valid_access.add(access)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if self.scope is not None:
            body["scope"] = self.scope
        if with_refresh:
            body["refresh_token"] = self.issue_refresh()
        return self._wrap(200, body)

    def _client_ok(self, request: httpx.Request, form: dict[str, str]) -> bool:
        header = request.headers.get("Authorization")
        if self.auth_method == "client_secret_basic":
            if not header or not header.startswith("Basic ") or "client_secret" in form:
                return False
            raw = base64.b64decode(header[6:]).decode()
            cid, _, secret = raw.partition(":")
            # RFC 6749 §2.3.1: both parts are form-urlencoded before Base64
            return (
                unquote_plus(cid) == self.client_id and unquote_plus(secret) == self.client_secret
            )
        if header is not None:
            return False
        if self.auth_method == "client_secret_post":
            return (
                form.get("client_id") == self.client_id
                and form.get("client_secret") == self.client_secret
            )
        return form.get("client_id") == self.client_id and "client_secret" not in form

    async def handle(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        self.requests.append(
            SeenRequest(request.url.path, form, request.headers.get("Authorization"))
        )
        if self.delay:
            await anyio.sleep(self.delay)
        if self.queued:
            item = self.queued.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        if request.method != "POST":
            return httpx.Response(405)
        if not self._client_ok(request, form):
            return self._error(401, "invalid_client", "client authentication failed")
        for key, value in self.token_params.items():
            if form.get(key) != value:
                return self._error(400, "invalid_request", f"missing {key}")
        if request.url.path == "/revoke":
            token = form.get("token", "")
            self.revoked.append(token)
            self.valid_refresh.discard(token)
            self.valid_access.discard(token)
            return httpx.Response(200)
        if request.url.path != "/token":
            return httpx.Response(404)
        grant = form.get("grant_type")
        if grant == "authorization_code":
            entry = self.codes.pop(form.get("code", ""), None)
            if entry is None or entry.redirect_uri != form.get("redirect_uri"):
                return self._error(400, "invalid_grant", "invalid code")
            if entry.challenge is not None:
                verifier = form.get("code_verifier", "")
                digest = hashlib.sha256(verifier.encode()).digest()
                if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != entry.challenge:
                    return self._error(400, "invalid_grant", "PKCE verification failed")
            return self._tokens(with_refresh=True)
        if grant == "refresh_token":
            token = form.get("refresh_token", "")
            if token not in self.valid_refresh:
                return self._error(400, "invalid_grant", "invalid refresh_token")
            if self.rotate:
                self.valid_refresh.discard(token)
            return self._tokens(with_refresh=self.refresh_on_refresh and self.rotate)
        return self._error(400, "unsupported_grant_type")


def json_body(response: httpx.Response) -> Any:
    return json.loads(response.content)


def asgi(app: Quart) -> httpx.ASGITransport:
    """An httpx transport into a Quart app, in-process (Quart types its ASGI call with its
    own scope and event TypedDicts, httpx with plain mappings: the same protocol)."""
    return httpx.ASGITransport(app=app)  # type: ignore[arg-type]
