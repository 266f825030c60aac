"""The source guard at the ASGI level: forged scope["client"], Funnel, owner check."""

from __future__ import annotations

from typing import Any

import pytest

from api.app import create_app
from api.guard import decode_login, is_tailnet_address, parse_ip, source_allowed
from api.settings import ApiSettings
from api.tailscale import LocalAPI
from flowengine.engine import FlowEngine

from .conftest import TOKEN, count_rows, start_flow
from .fake_tailscale import OWNER, FakeTailnet

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("100.64.0.1", True),
        ("100.101.102.103", True),
        ("100.127.255.254", True),
        ("100.115.92.1", False),  # ChromeOS VM range
        ("100.115.93.254", False),
        ("100.115.94.1", True),
        ("100.63.255.255", False),
        ("100.128.0.1", False),
        ("fd7a:115c:a1e0::1", True),
        ("fd7a:115c:a1e0:b1a::5", True),  # inside the /48 (4via6): whois must decide
        ("fd7a:115c:a1e1::1", False),
        ("::ffff:100.64.1.1", True),
        ("::ffff:8.8.8.8", False),
        ("8.8.8.8", False),
        ("192.168.1.10", False),
        ("10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_source_ranges(host: str, allowed: bool) -> None:
    assert source_allowed(parse_ip(host)) is allowed


def test_tailnet_address_excludes_loopback() -> None:
    ip = parse_ip("127.0.0.1")
    assert ip is not None
    assert not is_tailnet_address(ip)


@pytest.mark.parametrize(
    ("raw", "login"),
    [
        ("owner@example.com", "owner@example.com"),
        ("=?utf-8?q?j=C3=B6rg@example.com?=", "jörg@example.com"),
        ("=?bogus-charset?q?x?=", ""),
    ],
)
def test_decode_login(raw: str, login: str) -> None:
    assert decode_login(raw) == login


async def _get(app: Any, path: str, client: tuple[str, int], **kwargs: Any) -> Any:
    return await app.test_client().get(path, scope_base={"client": client}, **kwargs)


@pytest.mark.parametrize(
    ("client", "status"),
    [
        (("100.90.1.2", 50000), 200),
        (("fd7a:115c:a1e0::abcd", 50000), 200),
        (("127.0.0.1", 50000), 200),
        (("8.8.8.8", 50000), 403),
        (("192.168.1.20", 50000), 403),
        (("100.115.92.7", 50000), 403),
    ],
)
async def test_guard_by_source_address(
    engine: FlowEngine, client: tuple[str, int], status: int
) -> None:
    app = create_app(engine, settings=ApiSettings(mode="tls", api_token=TOKEN))
    response = await _get(app, "/healthz", client)
    assert response.status_code == status
    if status == 403:
        assert (await response.get_json())["error"] == "forbidden"
        assert response.headers["Cache-Control"] == "no-store"


async def test_non_tailnet_callback_is_refused_with_html_and_stores_nothing(
    engine: FlowEngine, ledger_file: Any
) -> None:
    started = await start_flow(engine)
    before = count_rows(ledger_file)
    app = create_app(engine, settings=ApiSettings(mode="tls", api_token=TOKEN))
    response = await _get(
        app,
        "/oauth/callback",
        ("203.0.113.9", 443),
        query_string={"code": "c", "state": started.state},
    )
    assert response.status_code == 403
    assert response.content_type.startswith("text/html")
    assert "only devices on this tailnet" in await response.get_data(as_text=True)
    assert count_rows(ledger_file) == before


async def test_funnel_requests_are_refused_even_from_loopback(engine: FlowEngine) -> None:
    for mode in ("tls", "serve", "plain-test"):
        app = create_app(engine, settings=ApiSettings(mode=mode, api_token=TOKEN))  # type: ignore[arg-type]
        response = await _get(
            app,
            "/healthz",
            ("127.0.0.1", 4000),
            headers={"Tailscale-Funnel-Request": "?1", "X-Forwarded-For": "100.90.1.2"},
        )
        assert response.status_code == 403, mode
        assert "Funnel" in (await response.get_json())["message"]


# ------------------------------------------------------------------ owner check (tls)


@pytest.fixture(name="owner_app")
async def _owner_app(engine: FlowEngine, localapi: LocalAPI, tailnet: FakeTailnet) -> Any:
    tailnet.add_peer("100.90.1.2", OWNER)
    tailnet.add_peer("100.90.1.3", "guest@example.com")
    tailnet.add_peer("100.90.1.4", "ci@example.com", tags=("tag:ci",))
    settings = ApiSettings(mode="tls", api_token=TOKEN, allowed_logins=(OWNER,))
    return create_app(engine, settings=settings, tailscale=localapi)


@pytest.mark.parametrize(
    ("client", "status", "reason"),
    [
        (("100.90.1.2", 50000), 200, None),
        (("100.90.1.3", 50000), 403, "user is not allowed"),
        (("100.90.1.4", 50000), 403, "tagged devices"),
        (("100.90.1.9", 50000), 403, "not a tailnet node"),
        (("127.0.0.1", 50000), 200, None),  # whois 404 on loopback: this host itself
    ],
)
async def test_owner_check_by_whois(
    owner_app: Any,
    tailnet: FakeTailnet,
    client: tuple[str, int],
    status: int,
    reason: str | None,
) -> None:
    response = await _get(owner_app, "/healthz", client)
    assert response.status_code == status
    if reason:
        assert reason in (await response.get_json())["message"]
    assert tailnet.requests[-1] == f"GET /localapi/v0/whois?addr={client[0]}%3A{client[1]}"


async def test_owner_check_fails_closed_when_tailscaled_is_down(
    engine: FlowEngine, tmp_path: Any
) -> None:
    async with LocalAPI(tmp_path / "gone.sock", timeout=2) as dead:
        settings = ApiSettings(mode="tls", api_token=TOKEN, allowed_logins=(OWNER,))
        app = create_app(engine, settings=settings, tailscale=dead)
        response = await _get(app, "/healthz", ("100.90.1.2", 1))
        assert response.status_code == 403
        assert "could not be identified" in (await response.get_json())["message"]


# ----------------------------------------------------------------- serve mode headers


@pytest.fixture(name="serve_app")
def _serve_app(engine: FlowEngine) -> Any:
    settings = ApiSettings(mode="serve", port=8401, api_token=TOKEN, allowed_logins=(OWNER,))
    return create_app(engine, settings=settings)


@pytest.mark.parametrize(
    ("client", "headers", "status"),
    [
        # through tailscale serve: loopback peer, X-Forwarded-For and identity headers
        (
            ("127.0.0.1", 6000),
            {"X-Forwarded-For": "100.90.1.2", "Tailscale-User-Login": OWNER},
            200,
        ),
        (
            ("127.0.0.1", 6000),
            {"X-Forwarded-For": "fd7a:115c:a1e0::abcd", "Tailscale-User-Login": OWNER},
            200,
        ),
        (
            ("127.0.0.1", 6000),
            {"X-Forwarded-For": "100.90.1.3", "Tailscale-User-Login": "guest@example.com"},
            403,
        ),
        # tagged source: serve sends no identity headers
        (("127.0.0.1", 6000), {"X-Forwarded-For": "100.90.1.4"}, 403),
        # a public client IP (Funnel-like) is refused even with a login
        (("127.0.0.1", 6000), {"X-Forwarded-For": "8.8.8.8", "Tailscale-User-Login": OWNER}, 403),
        (
            ("127.0.0.1", 6000),
            {"X-Forwarded-For": "100.90.1.2, 100.90.1.3", "Tailscale-User-Login": OWNER},
            403,
        ),
        # the same host talking to the backend directly (the bot, the CLI)
        (("127.0.0.1", 6000), {}, 200),
        # identity headers from a non-loopback peer are not trusted
        (("100.90.1.2", 6000), {"Tailscale-User-Login": OWNER}, 403),
    ],
)
async def test_serve_mode_identity_headers(
    serve_app: Any, client: tuple[str, int], headers: dict[str, str], status: int
) -> None:
    response = await _get(serve_app, "/healthz", client, headers=headers)
    assert response.status_code == status


async def test_refusal_logs_never_hold_the_oauth_state(
    engine: FlowEngine, caplog: pytest.LogCaptureFixture
) -> None:
    started = await start_flow(engine)
    app = create_app(engine, settings=ApiSettings(mode="tls", api_token=TOKEN))
    with caplog.at_level("WARNING", logger="api.guard"):
        response = await _get(app, f"/oauth/pending/{started.state}", ("8.8.8.8", 1))
    assert response.status_code == 403
    assert "refused /oauth/pending/… from 8.8.8.8" in caplog.text
    assert started.state not in caplog.text
