"""The source guard at the ASGI level: forged scope["client"], Funnel, owner check."""

from __future__ import annotations

from typing import Any

import pytest

from api.app import create_app
from api.guard import (
    decode_login,
    host_header_ok,
    is_tailnet_address,
    parse_ip,
    source_allowed,
)
from api.settings import ApiSettings
from api.tailscale import LocalAPI
from flowengine.engine import FlowEngine

from .conftest import TOKEN, count_rows, start_flow
from .fake_tailscale import OWNER, SELF_V4, SELF_V6, FakeTailnet

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
        # whois 404 on loopback in kernel-TUN mode: a process on this host
        (("127.0.0.1", 50000), 200, None),
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


async def test_owner_check_in_userspace_networking(
    engine: FlowEngine, localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    """Loopback peers are tailnet peers forwarded by netstack, or not identifiable at all."""
    tailnet.add_peer("100.90.1.2", OWNER)
    tailnet.add_peer("100.90.1.3", "guest@example.com")
    tailnet.forward(41001, "100.90.1.2")
    tailnet.forward(41002, "100.90.1.3")
    settings = ApiSettings(mode="tls", api_token=TOKEN, allowed_logins=(OWNER,))
    app = create_app(engine, settings=settings, tailscale=localapi, userspace=True)
    assert (await _get(app, "/healthz", ("127.0.0.1", 41001))).status_code == 200
    guest = await _get(app, "/healthz", ("127.0.0.1", 41002))
    assert guest.status_code == 403
    # a subnet-routed source or a local process: whois 404 on loopback is no longer trusted
    unknown = await _get(app, "/healthz", ("127.0.0.1", 41003))
    assert unknown.status_code == 403
    assert "unix socket" in (await unknown.get_json())["message"]


async def test_the_servers_own_node_is_the_local_host_even_when_tagged(
    engine: FlowEngine, localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    """whois of the daemon's own 100.x answers its own (tagged) node: verified.md #8."""
    tailnet.add_peer(SELF_V4, "tagged-devices", tags=("tag:server",))
    tailnet.add_peer("100.90.1.4", "ci@example.com", tags=("tag:ci",))
    settings = ApiSettings(mode="tls", api_token=TOKEN, allowed_logins=(OWNER,))
    app = create_app(
        engine, settings=settings, tailscale=localapi, own_addresses=(SELF_V4, SELF_V6)
    )
    assert (await _get(app, "/healthz", (SELF_V4, 50001))).status_code == 200
    assert (await _get(app, "/healthz", ("100.90.1.4", 50001))).status_code == 403


# ----------------------------------------------------------------- serve mode headers


@pytest.fixture(name="serve_app")
def _serve_app(engine: FlowEngine, localapi: LocalAPI, tailnet: FakeTailnet) -> Any:
    tailnet.add_peer("100.90.1.2", OWNER)
    tailnet.add_peer("100.90.1.3", "guest@example.com")
    tailnet.add_peer("100.90.1.4", "ci@example.com", tags=("tag:ci",))
    settings = ApiSettings(mode="serve", port=8401, api_token=TOKEN, allowed_logins=(OWNER,))
    return create_app(engine, settings=settings, tailscale=localapi)


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
        # a process on this host talking to the backend directly (kernel-TUN mode)
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


@pytest.mark.parametrize(
    ("peer", "headers", "status"),
    [
        # the guest reaches 100.x:<backend port> directly and forges serve's headers
        ("100.90.1.3", {"X-Forwarded-For": "100.90.1.2", "Tailscale-User-Login": OWNER}, 403),
        ("100.90.1.3", {}, 403),
        ("100.90.1.4", {"X-Forwarded-For": "100.90.1.2", "Tailscale-User-Login": OWNER}, 403),
        # the owner coming the same way is judged by whois: allowed, headers ignored
        ("100.90.1.2", {"Tailscale-User-Login": "someone@else"}, 200),
    ],
)
async def test_serve_mode_backend_port_reached_through_userspace_forwarding(
    serve_app: Any, tailnet: FakeTailnet, peer: str, headers: dict[str, str], status: int
) -> None:
    """verified.md #11: netstack forwards 100.x:8401 to 127.0.0.1:8401; whois names it."""
    tailnet.forward(42000, peer)
    response = await _get(serve_app, "/healthz", ("127.0.0.1", 42000), headers=headers)
    assert response.status_code == status
    assert tailnet.requests[-1] == "GET /localapi/v0/whois?addr=127.0.0.1%3A42000"


async def test_serve_mode_in_userspace_refuses_unidentified_loopback(
    engine: FlowEngine, localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    settings = ApiSettings(mode="serve", port=8401, api_token=TOKEN, allowed_logins=(OWNER,))
    app = create_app(engine, settings=settings, tailscale=localapi, userspace=True)
    plain = await _get(app, "/healthz", ("127.0.0.1", 6001))
    assert plain.status_code == 403
    served = await _get(
        app,
        "/healthz",
        ("127.0.0.1", 6002),
        headers={"X-Forwarded-For": "100.90.1.2", "Tailscale-User-Login": OWNER},
    )
    assert served.status_code == 200


async def test_serve_mode_whois_failure_fails_closed(engine: FlowEngine, tmp_path: Any) -> None:
    async with LocalAPI(tmp_path / "gone.sock", timeout=2) as dead:
        settings = ApiSettings(mode="serve", api_token=TOKEN, allowed_logins=(OWNER,))
        app = create_app(engine, settings=settings, tailscale=dead)
        response = await _get(
            app,
            "/healthz",
            ("127.0.0.1", 6003),
            headers={"X-Forwarded-For": "100.90.1.2", "Tailscale-User-Login": OWNER},
        )
        assert response.status_code == 403


# ------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("host.tailnet.ts.net:8400", True),
        ("host.tailnet.ts.net", True),
        ("host.tailnet.ts.net.", True),
        ("100.64.0.1:8400", True),
        ("[fd7a:115c:a1e0::1]:8400", True),
        ("[fd7a:115c:a1e0::1]", True),
        ("localhost", True),
        ("a" * 63 + ".example", True),
        ("a" * 64 + ".example", False),  # the 500 of the fuzz run
        (".".join(["a" * 50] * 6), False),  # > 253
        ("exa mple", False),
        ("ex..ample", False),
        ("-a.example", False),
        ("a-.example", False),
        ("ünï.example", False),
        ("[::1", False),
        ("[::1]x", False),
        ("[zz::1]:80", False),
        ("host:99999", False),
        ("host:", False),
        ("host:80:80", False),
        ("host:8a", False),
        ("", False),
    ],
)
def test_host_header_ok(host: str, ok: bool) -> None:
    assert host_header_ok(host) is ok


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "exa mple", "x:80:80", "x:99999"])
async def test_malformed_host_is_a_400_with_security_headers(engine: FlowEngine, host: str) -> None:
    app = create_app(engine, settings=ApiSettings(mode="tls", api_token=TOKEN))
    for path in ("/healthz", "/oauth/callback"):
        response = await _get(app, path, ("100.90.1.2", 1), headers={"Host": host})
        assert response.status_code == 400
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("POST", "/healthz", 405), ("GET", "/oauth/flows", 401)],
)
async def test_every_error_page_carries_the_security_headers(
    engine: FlowEngine, method: str, path: str, status: int
) -> None:
    app = create_app(engine, settings=ApiSettings(mode="tls", api_token=TOKEN))
    response = await app.test_client().open(  # type: ignore[call-arg]
        path, method=method, scope_base={"client": ("100.90.1.2", 1)}
    )
    assert response.status_code == status
    for name in ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy"):
        assert name in response.headers


async def test_a_crash_outside_quarts_handlers_still_gets_the_headers(engine: FlowEngine) -> None:
    """The guard adds the headers to whatever the app sends (here: a bare ASGI 500)."""
    from api.guard import TailnetGuard

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[Any] = []

    async def collect(message: Any) -> None:
        sent.append(message)

    guard = TailnetGuard(bare, mode="tls")
    scope = {"type": "http", "path": "/x", "headers": [], "client": ("100.90.1.2", 1)}
    await guard(scope, None, collect)  # type: ignore[arg-type]
    names = {name for name, _ in sent[0]["headers"]}
    assert {b"content-security-policy", b"cache-control", b"x-content-type-options"} <= names


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
