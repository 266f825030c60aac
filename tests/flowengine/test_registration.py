"""registration.py (RFC 7591) and the registration kept with the credentials."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentd.errortable import error_lines
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.errors import ProviderError, ProviderTransientError, RegistrationError
from flowengine.registration import (
    DEVICE_GRANT,
    Registration,
    client_name,
    register,
    registration_request,
)

ISSUER = "https://as.example.com"
ENDPOINT = f"{ISSUER}/register"
CALLBACK = "https://host.tailnet.ts.net:8400/oauth/callback"


def metadata(**kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"issuer": ISSUER}
    data.update(kw)
    return data


def test_a_public_client_with_our_callback_only() -> None:
    body = registration_request(
        metadata=metadata(device_authorization_endpoint=f"{ISSUER}/device"),
        redirect_uri=CALLBACK,
        name="agentd-oauth (personal AI agent) on box",
        software_version="1.2.3",
    )
    assert body == {
        "client_name": "agentd-oauth (personal AI agent) on box",
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", DEVICE_GRANT, "refresh_token"],
        "response_types": ["code"],
        "redirect_uris": [CALLBACK],
        "software_id": "agentd-oauth",
        "software_version": "1.2.3",
    }


@pytest.mark.parametrize(
    ("meta", "redirect", "grants", "method"),
    [
        (metadata(), CALLBACK, ["authorization_code", "refresh_token"], "none"),
        # no device endpoint, or the device grant not offered: not asked for
        (
            metadata(
                device_authorization_endpoint="https://d",
                grant_types_supported=["authorization_code"],
            ),
            CALLBACK,
            ["authorization_code"],
            "none",
        ),
        # a client for the device grant only (no callback known)
        (
            metadata(device_authorization_endpoint="https://d"),
            None,
            [DEVICE_GRANT, "refresh_token"],
            "none",
        ),
        # a server that takes no public client: a confidential one
        (
            metadata(
                token_endpoint_auth_methods_supported=["client_secret_post", "private_key_jwt"]
            ),
            CALLBACK,
            ["authorization_code", "refresh_token"],
            "client_secret_post",
        ),
        (
            metadata(token_endpoint_auth_methods_supported=["client_secret_basic", "none"]),
            CALLBACK,
            ["authorization_code", "refresh_token"],
            "none",
        ),
    ],
)
def test_what_is_asked_for(
    meta: dict[str, Any], redirect: str | None, grants: list[str], method: str
) -> None:
    body = registration_request(metadata=meta, redirect_uri=redirect, name="n")
    assert body["grant_types"] == grants
    assert body["token_endpoint_auth_method"] == method
    assert body["redirect_uris"] == ([redirect] if redirect else [])
    assert body["response_types"] == (["code"] if redirect else [])


def test_the_client_name_says_which_agent() -> None:
    assert client_name("box") == "agentd-oauth (personal AI agent) on box"
    assert client_name().startswith("agentd-oauth (personal AI agent) on ")
    assert len(client_name("x" * 500)) == 120


class Registrar:
    """A registration endpoint answering from a queue; it records what it was sent."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.seen: list[dict[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url == ENDPOINT
        assert request.headers["content-type"] == "application/json"
        self.seen.append(json.loads(request.content))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


async def _register(registrar: Registrar, request: dict[str, Any] | None = None) -> Registration:
    async with registrar.client() as client:
        return await register(
            ENDPOINT,
            request or registration_request(metadata=metadata(), redirect_uri=CALLBACK, name="n"),
            issuer=ISSUER,
            provider="as-example-com",
            client=client,
            now_ms=5_000,
        )


@pytest.mark.anyio
async def test_a_public_registration() -> None:
    registrar = Registrar(
        httpx.Response(
            201,
            json={
                "client_id": "c-1",
                "client_id_issued_at": 1700000000,
                "token_endpoint_auth_method": "none",
                "redirect_uris": [CALLBACK],
                "grant_types": ["authorization_code", "refresh_token"],
                "registration_access_token": "rat-secret",
                "registration_client_uri": f"{ISSUER}/register/c-1",
            },
        )
    )
    reg = await _register(registrar)
    assert (reg.client_id, reg.client_secret, reg.token_endpoint_auth_method) == (
        "c-1",
        None,
        "none",
    )
    assert reg.redirect_uris == (CALLBACK,)
    assert reg.registration_access_token == "rat-secret"
    assert reg.registration_client_uri == f"{ISSUER}/register/c-1"
    assert (reg.issuer, reg.registered_at, reg.client_id_issued_at) == (ISSUER, 5_000, 1700000000)
    assert "rat-secret" not in repr(reg)
    assert "rat-secret" not in json.dumps(reg.public())
    assert Registration.from_json(reg.to_json(), client_secret=None) == reg


@pytest.mark.anyio
async def test_the_servers_answer_counts() -> None:
    """It may issue a secret and switch the auth method; we store what it says."""
    registrar = Registrar(
        httpx.Response(
            201,
            json={
                "client_id": "c-2",
                "client_secret": "s3cret",
                "client_secret_expires_at": 0,
                "token_endpoint_auth_method": "client_secret_basic",
            },
        )
    )
    reg = await _register(registrar)
    assert reg.client_secret == "s3cret"
    assert reg.token_endpoint_auth_method == "client_secret_basic"
    assert reg.redirect_uris == (CALLBACK,)  # not echoed: what we asked for
    assert "s3cret" not in repr(reg)
    assert "client_secret" not in reg.to_json()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        (
            httpx.Response(400, json={"error": "invalid_redirect_uri", "error_description": "no"}),
            RegistrationError,
            "invalid_redirect_uri",
        ),
        (httpx.Response(403, text="forbidden"), RegistrationError, None),
        (httpx.Response(201, json={"client_secret": "x"}), RegistrationError, None),
        (
            httpx.Response(
                201, json={"client_id": "c", "token_endpoint_auth_method": "private_key_jwt"}
            ),
            RegistrationError,
            None,
        ),
        (
            httpx.Response(
                201, json={"client_id": "c", "token_endpoint_auth_method": "client_secret_post"}
            ),
            ProviderError,
            None,
        ),
        (httpx.Response(201, text="<html>"), RegistrationError, None),
        (httpx.Response(503), ProviderTransientError, None),
        (httpx.Response(429), ProviderTransientError, None),
        (httpx.ConnectError("refused"), ProviderTransientError, None),
        (httpx.ReadTimeout("slow"), ProviderTransientError, None),
    ],
)
async def test_refusals(
    answer: httpx.Response | Exception, error: type[Exception], code: str | None
) -> None:
    with pytest.raises(error) as info:
        await _register(Registrar(answer))
    assert getattr(info.value, "oauth_error", None) == code
    if error is RegistrationError and code:
        # as the CLI words it (agentd/errortable.py)
        assert isinstance(info.value, RegistrationError)
        assert "agentd credentials as-example-com" in error_lines(info.value)[0]


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("changes", "needs", "fits"),
    [
        ({}, {}, True),
        ({}, {"issuer": ISSUER + "/"}, True),
        ({}, {"issuer": "https://other.example.com"}, False),
        ({}, {"redirect_uri": "https://new.ts.net/oauth/callback"}, False),
        ({}, {"redirect_uri": None}, True),
        ({}, {"device": True}, False),
        ({"grant_types": ("authorization_code", DEVICE_GRANT)}, {"device": True}, True),
        ({"grant_types": ()}, {"device": True}, True),  # unknown grants: try
        ({"client_secret": "s", "client_secret_expires_at": int(NOW) + 30}, {}, False),
        ({"client_secret": "s", "client_secret_expires_at": int(NOW) + 3600}, {}, True),
        ({"client_secret": "s", "client_secret_expires_at": 0}, {}, True),
    ],
)
def test_when_a_stored_registration_fits(
    changes: dict[str, Any], needs: dict[str, Any], fits: bool
) -> None:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "client_id": "c",
        "token_endpoint_auth_method": "none",
        "redirect_uris": (CALLBACK,),
        "grant_types": ("authorization_code", "refresh_token"),
    }
    values.update(changes)
    reg = Registration(**values)
    wanted: dict[str, Any] = {"issuer": ISSUER, "redirect_uri": CALLBACK, "device": False}
    wanted.update(needs)
    assert reg.fits(now=NOW, **wanted) is fits


def test_the_credentials_file_keeps_the_registration(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    reg = Registration(
        issuer=ISSUER,
        client_id="c-9",
        token_endpoint_auth_method="none",
        redirect_uris=(CALLBACK,),
        registration_access_token="rat",
    )
    store.put("as-example-com", ClientCredentials("c-9"), registration=reg.to_json())
    assert stat.S_IMODE((tmp_path / "credentials.json").stat().st_mode) == 0o600
    assert store.get("as-example-com") == ClientCredentials("c-9")
    again = store.registration("as-example-com")
    assert again is not None
    assert Registration.from_json(again, client_secret=None) == reg
    # credentials given by hand replace the registration
    store.put("as-example-com", ClientCredentials("manual", "secret"))
    assert store.registration("as-example-com") is None
    assert store.registration("nobody") is None
