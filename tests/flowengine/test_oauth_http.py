from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from flowengine.credentials import ClientCredentials
from flowengine.errors import (
    CredentialsMissingError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from flowengine.oauth_http import exchange_code, parse_retry_after, refresh_tokens, revoke
from flowengine.protocol import new_code_verifier
from tests.fakes import FakeProvider

NOW = 1_800_000_000_000
REDIRECT = "https://broker.example.ts.net/oauth/callback"


@pytest.fixture(name="client")
async def _client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def _client_for(fake: FakeProvider) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport())


def _assert_no_secrets(err: BaseException, *secrets: str | None) -> None:
    text = f"{err} {err!r}"
    for secret in secrets:
        if secret:
            assert secret not in text


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "none"])
async def test_exchange_with_each_client_auth_method(method: str) -> None:
    fake = FakeProvider(auth_method=method, client_secret=None if method == "none" else "s-1")
    verifier = new_code_verifier()
    code = fake.issue_code(redirect_uri=REDIRECT, code_verifier=verifier)
    async with _client_for(fake) as client:
        tokens = await exchange_code(
            fake.spec(),
            fake.credentials(),
            code=code,
            redirect_uri=REDIRECT,
            code_verifier=verifier,
            client=client,
            now_ms=NOW,
        )
    assert tokens.access in fake.valid_access
    assert tokens.refresh in fake.valid_refresh
    assert tokens.expires == NOW + 3_600_000
    assert tokens.obtained_at == NOW
    seen = fake.requests[-1]
    assert seen.form["grant_type"] == "authorization_code"
    assert seen.form["code_verifier"] == verifier
    assert (seen.authorization is not None) == (method == "client_secret_basic")
    assert ("client_secret" in seen.form) == (method == "client_secret_post")


@pytest.mark.anyio
async def test_wrong_client_auth_method_is_invalid_client_and_permanent() -> None:
    fake = FakeProvider(auth_method="client_secret_basic")
    code = fake.issue_code(redirect_uri=REDIRECT)
    async with _client_for(fake) as client:
        with pytest.raises(ReauthorizationRequired) as info:
            await exchange_code(
                fake.spec(token_auth_method="client_secret_post"),
                fake.credentials(),
                code=code,
                redirect_uri=REDIRECT,
                code_verifier=None,
                client=client,
                now_ms=NOW,
            )
    assert info.value.oauth_error == "invalid_client"
    assert info.value.http_status == 401
    _assert_no_secrets(info.value, fake.client_secret, code)


@pytest.mark.anyio
async def test_confidential_client_without_secret_is_refused_before_any_request() -> None:
    fake = FakeProvider(auth_method="client_secret_post")
    async with _client_for(fake) as client:
        with pytest.raises(CredentialsMissingError):
            await refresh_tokens(
                fake.spec(),
                ClientCredentials(fake.client_id),
                refresh_token="r",
                client=client,
                now_ms=NOW,
            )
    assert fake.requests == []


@pytest.mark.anyio
async def test_withings_envelope_and_token_params() -> None:
    fake = FakeProvider(envelope=True, token_params={"action": "requesttoken"})
    spec = fake.spec(use_pkce=False)
    code = fake.issue_code(redirect_uri=REDIRECT)
    async with _client_for(fake) as client:
        tokens = await exchange_code(
            spec,
            fake.credentials(),
            code=code,
            redirect_uri=REDIRECT,
            code_verifier=None,
            client=client,
            now_ms=NOW,
        )
        assert tokens.access in fake.valid_access
        assert fake.requests[-1].form["action"] == "requesttoken"
        refreshed = await refresh_tokens(
            spec, fake.credentials(), refresh_token=tokens.refresh or "", client=client, now_ms=NOW
        )
        assert refreshed.refresh != tokens.refresh
        # the old refresh token is dead: error inside the envelope with HTTP 200
        with pytest.raises(ReauthorizationRequired) as info:
            await refresh_tokens(
                spec,
                fake.credentials(),
                refresh_token=tokens.refresh or "",
                client=client,
                now_ms=NOW,
            )
    assert info.value.http_status == 200
    assert info.value.oauth_error == "status_503"
    _assert_no_secrets(info.value, tokens.refresh, fake.client_secret)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "exc", "error"),
    [
        ({"status": 601, "error": "Too many requests"}, ProviderTransientError, "status_601"),
        ({"status": 401, "error": "Invalid token"}, ReauthorizationRequired, "status_401"),
        ({"status": 293, "error": "Something odd"}, ProviderError, "status_293"),
        ({"body": {"access_token": "x"}}, ProviderError, None),
        ({"status": 0, "body": {"refresh_token": "r"}}, ProviderError, None),
        ({"status": 0, "body": None}, ProviderError, None),
    ],
)
async def test_envelope_errors_with_http_200(
    body: dict[str, object], exc: type[ProviderError], error: str | None
) -> None:
    fake = FakeProvider(envelope=True)
    fake.fail_next(httpx.Response(200, json=body))
    async with _client_for(fake) as client:
        with pytest.raises(exc) as info:
            await refresh_tokens(
                fake.spec(), fake.credentials(), refresh_token="r", client=client, now_ms=NOW
            )
    assert type(info.value) is exc
    assert info.value.oauth_error == error


@pytest.mark.anyio
async def test_missing_expires_in_means_unknown_expiry() -> None:
    fake = FakeProvider(expires_in=None)
    code = fake.issue_code(redirect_uri=REDIRECT)
    async with _client_for(fake) as client:
        tokens = await exchange_code(
            fake.spec(access_token_lifetime=3600),
            fake.credentials(),
            code=code,
            redirect_uri=REDIRECT,
            code_verifier=None,
            client=client,
            now_ms=NOW,
        )
    assert tokens.expires is None


@pytest.mark.anyio
async def test_refresh_without_refresh_token_keeps_the_old_one() -> None:
    fake = FakeProvider(rotate=False)
    old = fake.issue_refresh()
    async with _client_for(fake) as client:
        tokens = await refresh_tokens(
            fake.spec(), fake.credentials(), refresh_token=old, client=client, now_ms=NOW
        )
        again = await refresh_tokens(
            fake.spec(), fake.credentials(), refresh_token=old, client=client, now_ms=NOW
        )
    assert tokens.refresh == old
    assert again.refresh == old
    assert again.access != tokens.access


@pytest.mark.anyio
async def test_rotation_returns_a_new_refresh_token_and_kills_the_old() -> None:
    fake = FakeProvider(rotate=True)
    old = fake.issue_refresh()
    async with _client_for(fake) as client:
        tokens = await refresh_tokens(
            fake.spec(), fake.credentials(), refresh_token=old, client=client, now_ms=NOW
        )
        assert tokens.refresh not in (None, old)
        with pytest.raises(ReauthorizationRequired) as info:
            await refresh_tokens(
                fake.spec(), fake.credentials(), refresh_token=old, client=client, now_ms=NOW
            )
    assert info.value.oauth_error == "invalid_grant"
    assert info.value.description == "invalid refresh_token"
    _assert_no_secrets(info.value, old, tokens.refresh, tokens.access)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "retry_after", "status"),
    [
        (httpx.Response(429, headers={"Retry-After": "120"}), 120.0, 429),
        (httpx.Response(429), None, 429),
        (httpx.Response(503, text="<html>down</html>"), None, 503),
        (httpx.Response(500, json={"error": "server_error"}), None, 500),
    ],
)
async def test_rate_limits_and_server_errors_are_transient(
    response: httpx.Response, retry_after: float | None, status: int
) -> None:
    fake = FakeProvider()
    fake.fail_next(response)
    async with _client_for(fake) as client:
        with pytest.raises(ProviderTransientError) as info:
            await refresh_tokens(
                fake.spec(), fake.credentials(), refresh_token="r", client=client, now_ms=NOW
            )
    assert info.value.retry_after == retry_after
    assert info.value.http_status == status


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
async def test_network_errors_are_transient(error: Exception) -> None:
    fake = FakeProvider()
    fake.fail_next(error)
    async with _client_for(fake) as client:
        with pytest.raises(ProviderTransientError) as info:
            await refresh_tokens(
                fake.spec(), fake.credentials(), refresh_token="r", client=client, now_ms=NOW
            )
    assert info.value.__cause__ is error


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "exc", "oauth_error"),
    [
        (httpx.Response(200, json={"token_type": "Bearer"}), ProviderError, None),
        (httpx.Response(200, text="access_token=abc&scope=x"), ProviderError, None),
        (httpx.Response(200, json=["access_token"]), ProviderError, None),
        (
            httpx.Response(200, json={"error": "bad_refresh_token"}),
            ReauthorizationRequired,
            "bad_refresh_token",
        ),
        (httpx.Response(400, json={"error": "invalid_scope"}), ProviderError, "invalid_scope"),
        (httpx.Response(400, text="nope"), ProviderError, None),
        (httpx.Response(401), ReauthorizationRequired, "invalid_client"),
    ],
)
async def test_malformed_or_refused_answers(
    response: httpx.Response, exc: type[ProviderError], oauth_error: str | None
) -> None:
    fake = FakeProvider()
    fake.fail_next(response)
    async with _client_for(fake) as client:
        with pytest.raises(exc) as info:
            await refresh_tokens(
                fake.spec(), fake.credentials(), refresh_token="r", client=client, now_ms=NOW
            )
    assert type(info.value) is exc
    assert info.value.oauth_error == oauth_error
    assert "abc" not in str(info.value)


@pytest.mark.anyio
async def test_revoke() -> None:
    fake = FakeProvider()
    token = fake.issue_refresh()
    async with _client_for(fake) as client:
        assert await revoke(fake.spec(), fake.credentials(), token=token, client=client) is True
        assert fake.revoked == [token]
        assert token not in fake.valid_refresh
        assert fake.requests[-1].form["token_type_hint"] == "refresh_token"
        no_endpoint = fake.spec(revocation_url=None)
        assert await revoke(no_endpoint, fake.credentials(), token=token, client=client) is False
        fake.fail_next(httpx.Response(503))
        with pytest.raises(ProviderTransientError):
            await revoke(fake.spec(), fake.credentials(), token=token, client=client)
    assert len(fake.requests) == 2


def test_parse_retry_after() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
