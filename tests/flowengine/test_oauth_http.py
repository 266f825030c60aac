from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote_plus

import httpx
import pytest
import trustme

from flowengine.credentials import ClientCredentials
from flowengine.errors import (
    ConfigError,
    CredentialsMissingError,
    ProviderError,
    ProviderTLSError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from flowengine.oauth_http import (
    basic_auth_header,
    client_ssl_context,
    exchange_code,
    parse_retry_after,
    refresh_tokens,
    revoke,
    tls_failure,
)
from flowengine.protocol import new_code_verifier
from flowengine.tokens import TokenSet
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
    assert info.value.provider_status == 401
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
    assert info.value.provider_status == 200
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
    assert info.value.provider_status == status


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


# ------------------------------------------------------- client_secret_basic, RFC 6749 §2.3.1

SPECIAL_ID = "client id:+%/"
SPECIAL_SECRET = "s3cr:t+with%20/ and space"


def test_basic_auth_header_form_urlencodes_both_parts() -> None:
    header = basic_auth_header(SPECIAL_ID, SPECIAL_SECRET)
    assert header.startswith("Basic ")
    decoded = base64.b64decode(header[6:]).decode("ascii")
    # ':' inside either part is encoded, so the one literal ':' separates them
    assert decoded == "client+id%3A%2B%25%2F:s3cr%3At%2Bwith%2520%2F+and+space"
    client_id, secret = decoded.split(":")
    assert (unquote_plus(client_id), unquote_plus(secret)) == (SPECIAL_ID, SPECIAL_SECRET)
    # the plain case is what every provider has always seen
    assert basic_auth_header("abc", "def") == "Basic " + base64.b64encode(b"abc:def").decode()


@pytest.mark.anyio
async def test_exchange_and_refresh_with_a_secret_full_of_special_characters() -> None:
    fake = FakeProvider(
        auth_method="client_secret_basic", client_id=SPECIAL_ID, client_secret=SPECIAL_SECRET
    )
    code = fake.issue_code(redirect_uri=REDIRECT)
    async with _client_for(fake) as client:
        tokens = await exchange_code(
            fake.spec(),
            fake.credentials(),
            code=code,
            redirect_uri=REDIRECT,
            code_verifier=None,
            client=client,
            now_ms=NOW,
        )
        assert tokens.refresh is not None
        await refresh_tokens(
            fake.spec(), fake.credentials(), refresh_token=tokens.refresh, client=client, now_ms=NOW
        )
    assert [r.authorization for r in fake.requests] == [
        basic_auth_header(SPECIAL_ID, SPECIAL_SECRET)
    ] * 2


# ------------------------------------------------------------------------ granted scopes


async def _exchange(fake: FakeProvider, requested: tuple[str, ...] = ("read", "write")) -> TokenSet:
    async with _client_for(fake) as client:
        return await exchange_code(
            fake.spec(),
            fake.credentials(),
            code=fake.issue_code(redirect_uri=REDIRECT),
            redirect_uri=REDIRECT,
            code_verifier=None,
            client=client,
            now_ms=NOW,
            requested_scopes=requested,
        )


@pytest.mark.anyio
async def test_the_exchange_keeps_the_granted_scope() -> None:
    tokens = await _exchange(FakeProvider(scope="read"))
    assert (tokens.scope, tokens.extra["scope_source"]) == ("read", "granted")
    assert tokens.to_entry()["scope"] == "read"
    assert tokens.to_entry()["scope_source"] == "granted"


@pytest.mark.anyio
async def test_no_scope_in_the_answer_means_the_requested_ones_and_says_so() -> None:
    tokens = await _exchange(FakeProvider(scope=None))
    assert (tokens.scope, tokens.extra["scope_source"]) == ("read write", "requested")
    assert (await _exchange(FakeProvider(scope=None), requested=())).scope is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "previous_scope", "previous_source", "scope", "source"),
    [
        ("read", "read write", "requested", "read", "granted"),  # the answer wins
        (None, "read", "granted", "read", "granted"),  # RFC 6749 §6: unchanged
        (None, "read write", "requested", "read write", "requested"),
    ],
)
async def test_a_refresh_without_scope_keeps_the_previous_one(
    answer: str | None, previous_scope: str, previous_source: str, scope: str, source: str
) -> None:
    fake = FakeProvider(scope=answer)
    previous = TokenSet(access="old", scope=previous_scope, extra={"scope_source": previous_source})
    async with _client_for(fake) as client:
        tokens = await refresh_tokens(
            fake.spec(),
            fake.credentials(),
            refresh_token=fake.issue_refresh(),
            client=client,
            now_ms=NOW,
            previous=previous,
        )
    assert (tokens.scope, tokens.extra["scope_source"]) == (scope, source)


# ----------------------------------------------------------------------------- TLS trust


class _TokenHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"access_token": "tls-access", "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(name="tls_provider", scope="module")
def _tls_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A token endpoint over HTTPS whose certificate comes from a private CA: (url, CA PEM)."""
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("tls-provider")
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}/token", ca_file
    finally:
        server.shutdown()
        server.server_close()


async def _exchange_at(url: str, verify: ssl.SSLContext) -> TokenSet:
    spec = FakeProvider().spec(token_url=url)
    async with httpx.AsyncClient(verify=verify) as client:
        return await exchange_code(
            spec,
            FakeProvider().credentials(),
            code="the-code-value",
            redirect_uri=REDIRECT,
            code_verifier=None,
            client=client,
            now_ms=NOW,
        )


@pytest.mark.anyio
async def test_ca_file_is_trusted_besides_the_system_store(tls_provider: tuple[str, Path]) -> None:
    url, ca_file = tls_provider
    context = client_ssl_context(ca_file)
    assert context.cert_store_stats()["x509_ca"] > 1  # the system CAs are still there
    tokens = await _exchange_at(url, context)
    assert tokens.access == "tls-access"


@pytest.mark.anyio
async def test_an_untrusted_certificate_is_one_clear_line(tls_provider: tuple[str, Path]) -> None:
    url, _ = tls_provider
    with pytest.raises(ProviderTLSError) as info:
        await _exchange_at(url, client_ssl_context(None))
    err = info.value
    assert (err.host, err.reason) == ("localhost", "unable to get local issuer certificate")
    assert err.message == (
        "cannot reach Fake: TLS verification failed for localhost: unable to get local issuer"
        " certificate (trust its CA with [client] ca_file; the system CAs are always trusted)"
    )
    assert isinstance(err, ProviderTransientError)  # tokens are kept; the timer retries
    assert "the-code-value" not in f"{err} {err!r}"


@pytest.mark.anyio
async def test_a_name_mismatch_says_so(tls_provider: tuple[str, Path]) -> None:
    url, ca_file = tls_provider
    wrong = url.replace("localhost", "127.0.0.1")  # same server, a name not in its certificate
    with pytest.raises(ProviderTLSError) as info:
        await _exchange_at(wrong, client_ssl_context(ca_file))
    assert info.value.host == "127.0.0.1"
    assert "mismatch" in info.value.reason.lower()


def test_tls_failure_is_none_for_other_errors() -> None:
    assert tls_failure(httpx.ConnectError("refused")) is None
    handshake = httpx.ConnectError("boom")
    handshake.__cause__ = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert tls_failure(handshake) == (
        "TLS handshake failed ([SSL: WRONG_VERSION_NUMBER] wrong version number)"
    )


def test_a_ca_file_that_is_no_pem_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError) as info:
        client_ssl_context(bad)
    assert info.value.key == "client.ca_file"
    with pytest.raises(ConfigError):
        client_ssl_context(tmp_path / "missing.pem")
