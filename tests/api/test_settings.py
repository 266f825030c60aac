"""ApiSettings, the API token file, and the one error-to-status mapping."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from quart.typing import TestClientProtocol as Client

from api.errors import BadRequestError, UnauthorizedError, status_for
from api.settings import ApiSettings, load_api_token, token_matches
from api.tailscale import TailscaleError
from flowengine import errors
from flowengine.engine import FlowEngine
from flowengine.paths import api_token_path

from .conftest import AUTH, start_flow


def test_token_is_generated_once_0600(isolated_env: Path) -> None:
    path = api_token_path()
    assert not path.exists()
    token = load_api_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token + "\n"
    assert load_api_token(path) == token  # reused, not regenerated


def test_configured_token_wins_and_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    assert load_api_token(path, "from-config") == "from-config"
    assert not path.exists()


def test_token_compare() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc")
    assert not token_matches("", "")  # no configured token: nothing matches


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "https"}, "unknown server mode"),
        ({"port": 70000}, "not a TCP port"),
        ({"cert_file": Path("/c.crt")}, "go together"),
    ],
)
def test_settings_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(errors.ConfigError, match=match):
        ApiSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BadRequestError("x"), 400),
        (UnauthorizedError("x"), 401),
        (errors.StateMismatchError("x"), 400),
        (errors.FlowNotFound("x"), 404),
        (errors.FlowExpiredError("x"), 410),
        (errors.CodeAlreadyUsedError("x"), 410),
        (errors.InvalidTransition(flow_id="f", state="s", trigger="t"), 409),
        (errors.ConcurrentUpdateError(flow_id="f", expected=1, actual=2), 409),
        (errors.UnknownProviderError(provider="nope"), 404),
        (errors.ConfigError("x"), 500),
        (errors.ProviderTransientError("x", provider="p"), 503),
        (errors.ReauthorizationRequired("x", provider="p"), 409),
        (errors.ProviderError("x", provider="p"), 502),
        (errors.TokenFileCorruptError("x"), 503),
        (TailscaleError("x"), 503),
        (errors.BrokerError("x"), 500),
        (RuntimeError("x"), 500),
    ],
)
def test_status_by_mro(error: BaseException, status: int) -> None:
    assert status_for(error) == status


def test_a_new_subclass_gets_its_parents_status() -> None:
    class NewFlowTrouble(errors.FlowExpiredError):
        """A later addition to the tree."""

    assert status_for(NewFlowTrouble("x")) == 410


@pytest.mark.anyio
async def test_unexpected_errors_are_500_without_details(
    client: Client, engine: FlowEngine
) -> None:
    started = await start_flow(engine)
    await engine.close()  # every ledger call now fails with a non-broker error
    api = await client.get("/oauth/flows", headers=AUTH)
    assert api.status_code == 500
    assert await api.get_json() == {"error": "internal_error", "message": "internal error"}
    page = await client.get("/oauth/callback", query_string={"code": "c", "state": started.state})
    assert page.status_code == 500
    body = await page.get_data(as_text=True)
    assert "Something went wrong" in body
    assert "Traceback" not in body
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
