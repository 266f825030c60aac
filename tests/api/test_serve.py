"""Choosing the bind address and redirect URI; real Hypercorn serving (plain and TLS)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from quart import request

from api.app import create_app
from api.serve import ServePlan, plan_serving, serve, validate_bind
from api.settings import ApiSettings
from api.tailscale import LocalAPI
from flowengine.catalog import Catalog
from flowengine.engine import FlowEngine
from flowengine.errors import ConfigError

from .conftest import AUTH, TOKEN, start_flow
from .fake_tailscale import DOMAIN, OWNER, SELF_V4, SELF_V6, FakeTailnet, status_json

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("host", "mode", "ok"),
    [
        ("127.0.0.1", "tls", True),
        ("::1", "tls", True),
        ("localhost", "serve", True),
        ("100.101.102.103", "tls", True),
        ("fd7a:115c:a1e0::1", "tls", True),
        ("100.101.102.103", "serve", False),  # plain HTTP must stay on loopback
        ("0.0.0.0", "tls", False),
        ("::", "tls", False),
        ("", "tls", False),
        ("192.168.1.5", "tls", False),
        ("203.0.113.7", "plain-test", False),
        ("example.org", "tls", False),
    ],
)
def test_validate_bind(host: str, mode: str, ok: bool) -> None:
    if ok:
        assert validate_bind(host, mode=mode, allow_public=False) == []
        return
    with pytest.raises(ConfigError, match="refusing to listen") as info:
        validate_bind(host, mode=mode, allow_public=False)
    assert info.value.key == "server.host"
    warnings = validate_bind(host, mode=mode, allow_public=True)
    assert len(warnings) == 1
    assert "allow_public_bind" in warnings[0]


async def test_plan_tls_binds_the_tailscale_ip_and_derives_the_redirect(
    localapi: LocalAPI,
) -> None:
    plan = await plan_serving(ApiSettings(mode="tls"), tailscale=localapi)
    assert plan == ServePlan(
        mode="tls",
        host=SELF_V4,
        port=8400,
        redirect_uri=f"https://{DOMAIN}:8400/oauth/callback",
        public_name=DOMAIN,
        extra_hosts=(SELF_V6,),  # MagicDNS answers AAAA too: both addresses are bound
    )
    assert plan.binds == (f"{SELF_V4}:8400", f"[{SELF_V6}]:8400")
    assert plan.own_addresses == (SELF_V4, SELF_V6)
    assert not plan.userspace


async def test_plan_userspace_networking_binds_loopback(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    tailnet.status = status_json(tun=False)
    plan = await plan_serving(ApiSettings(mode="tls", public_port=443), tailscale=localapi)
    assert (plan.host, plan.redirect_uri) == ("127.0.0.1", f"https://{DOMAIN}/oauth/callback")


async def test_plan_serve_mode_is_loopback_with_public_port_8400(localapi: LocalAPI) -> None:
    plan = await plan_serving(ApiSettings(mode="serve", port=8401), tailscale=localapi)
    assert (plan.host, plan.port, plan.redirect_uri) == (
        "127.0.0.1",
        8401,
        f"https://{DOMAIN}:8400/oauth/callback",
    )


async def test_plan_refuses_a_redirect_uri_for_another_name(localapi: LocalAPI) -> None:
    settings = ApiSettings(
        mode="tls", redirect_uri="https://old.tailnet-name.ts.net:8400/oauth/callback"
    )
    with pytest.raises(ConfigError, match="not this machine's MagicDNS name") as info:
        await plan_serving(settings, tailscale=localapi)
    assert info.value.key == "server.redirect_uri"


async def test_plan_accepts_a_matching_configured_redirect_uri(localapi: LocalAPI) -> None:
    uri = f"https://{DOMAIN.upper()}:9443/oauth/callback"
    plan = await plan_serving(ApiSettings(mode="tls", redirect_uri=uri), tailscale=localapi)
    assert plan.redirect_uri == uri


async def test_plan_needs_tailscale_running(localapi: LocalAPI, tailnet: FakeTailnet) -> None:
    tailnet.status = status_json(backend_state="NeedsLogin")
    with pytest.raises(ConfigError, match="tailscale is not running"):
        await plan_serving(ApiSettings(mode="tls"), tailscale=localapi)


async def test_plan_needs_https_certificates_enabled(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    tailnet.status = status_json(https=False)
    with pytest.raises(ConfigError, match="HTTPS certificates are not enabled"):
        await plan_serving(ApiSettings(mode="tls"), tailscale=localapi)


async def test_plan_without_tailscaled_explains(tmp_path: Path) -> None:
    async with LocalAPI(tmp_path / "none.sock", timeout=2) as dead:
        with pytest.raises(ConfigError, match="tailscaled could not be asked"):
            await plan_serving(ApiSettings(mode="tls"), tailscale=dead)
    plan = await plan_serving(ApiSettings(mode="serve", public_name=DOMAIN), tailscale=None)
    assert plan.redirect_uri == f"https://{DOMAIN}:8400/oauth/callback"


# ---------------------------------------------------------------- real Hypercorn


@asynccontextmanager
async def running(app: Any, settings: ApiSettings, **kwargs: Any) -> AsyncIterator[ServePlan]:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        plan = await tg.start(partial(serve, app, settings, shutdown_trigger=stop.wait, **kwargs))
        try:
            yield plan
        finally:
            stop.set()


async def test_long_poll_over_real_http_is_woken_by_the_callback(
    ledger_file: Path, catalog: Catalog
) -> None:
    # The engine re-reads the ledger only every 60 s and the poll waits up to 30 s: an answer
    # with the code inside the 20 s bound can only come from the callback's in-process
    # signal. How fast that is (issue 2's 50 ms) is measured by benchmarks/bench_api.py.
    engine = await FlowEngine.open(ledger_file, poll_interval=60.0)
    settings = ApiSettings(mode="plain-test", port=0, api_token=TOKEN)
    app = create_app(engine, settings=settings, catalog=catalog)
    arrived: list[anyio.Event] = []

    @app.before_request
    async def note_the_poll() -> None:  # the poll reached the server: it parks next
        if request.path.startswith("/oauth/pending/"):
            arrived[-1].set()

    try:
        async with (
            running(app, settings) as plan,
            httpx.AsyncClient(base_url=plan.base_url) as http,
        ):
            assert plan.redirect_uri == f"{plan.base_url}/oauth/callback"
            for _ in range(3):
                started = await start_flow(engine)
                polled: dict[str, Any] = {}
                arrived.append(anyio.Event())

                async def poll(state: str = started.state, out: dict[str, Any] = polled) -> None:
                    out["response"] = await http.get(
                        f"/oauth/pending/{state}", params={"wait": "30"}, headers=AUTH
                    )

                with anyio.fail_after(20):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(poll)
                        await arrived[-1].wait()
                        callback = await http.get(
                            "/oauth/callback", params={"code": "c0de", "state": started.state}
                        )
                        assert callback.status_code == 200
                assert polled["response"].status_code == 200
                assert polled["response"].json()["code"] == "c0de"
    finally:
        await engine.close()


async def test_tls_mode_fetches_the_certificate_from_tailscaled(
    engine: FlowEngine, localapi: LocalAPI, tailnet: FakeTailnet, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "state" / "tls"
    settings = ApiSettings(
        mode="tls",
        host="127.0.0.1",
        port=0,
        public_port=8400,
        api_token=TOKEN,
        tls_dir=tls_dir,
        allowed_logins=(OWNER,),
    )
    app = create_app(engine, settings=settings, tailscale=localapi)
    trust = ssl.create_default_context()
    tailnet.ca.configure_trust(trust)
    async with running(app, settings, tailscale=localapi) as plan:
        assert plan.redirect_uri == f"https://{DOMAIN}:8400/oauth/callback"
        async with httpx.AsyncClient(verify=trust) as http:
            response = await http.get(f"https://127.0.0.1:{plan.port}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "mode": "tls"}
    # the owner check asked whois about the real TCP peer, with its port
    whois = [
        r for r in tailnet.requests if r.startswith("GET /localapi/v0/whois?addr=127.0.0.1%3A")
    ]
    assert len(whois) == 1
    assert int(whois[0].rsplit("%3A", 1)[1]) > 0
    key_file, cert_file = tls_dir / f"{DOMAIN}.key", tls_dir / f"{DOMAIN}.crt"
    assert (key_file.read_bytes(), cert_file.read_bytes()) == tailnet.pair_pem()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert tls_dir.stat().st_mode & 0o777 == 0o700
    assert f"GET /localapi/v0/cert/{DOMAIN}?type=pair" in tailnet.requests


async def test_tls_mode_without_a_certificate_source_refuses(engine: FlowEngine) -> None:
    settings = ApiSettings(mode="tls", host="127.0.0.1", port=0, public_name=DOMAIN)
    app = create_app(engine, settings=settings)
    with pytest.raises(ConfigError, match="needs a certificate"):
        await serve(app, settings, shutdown_trigger=anyio.Event().wait)


SERVE_CONFIG = {
    "TCP": {"8400": {"HTTPS": True}},
    "Web": {f"{DOMAIN}:8400": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8401"}}}},
}


async def test_plan_serve_mode_checks_the_serve_config(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    settings = ApiSettings(mode="serve", port=8401)
    plan = await plan_serving(settings, tailscale=localapi)
    assert len(plan.warnings) == 1
    assert "tailscale serve --bg --https=8400" in plan.warnings[0]
    tailnet.serve_config = SERVE_CONFIG
    assert (await plan_serving(settings, tailscale=localapi)).warnings == ()
    assert "GET /localapi/v0/serve-config" in tailnet.requests


async def test_plan_refuses_funnel_on_our_port(localapi: LocalAPI, tailnet: FakeTailnet) -> None:
    tailnet.serve_config = {**SERVE_CONFIG, "AllowFunnel": {f"{DOMAIN}:8400": True}}
    with pytest.raises(ConfigError, match="Funnel is enabled"):
        await plan_serving(ApiSettings(mode="serve", port=8401), tailscale=localapi)


async def test_plan_tls_refuses_when_serve_owns_the_port(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    tailnet.serve_config = SERVE_CONFIG
    with pytest.raises(ConfigError, match="would intercept"):
        await plan_serving(ApiSettings(mode="tls"), tailscale=localapi)
    # another port is fine
    plan = await plan_serving(ApiSettings(mode="tls", port=9443), tailscale=localapi)
    assert plan.redirect_uri == f"https://{DOMAIN}:9443/oauth/callback"


async def test_plan_serve_mode_in_userspace_networking_is_sealed_not_warned(
    localapi: LocalAPI, tailnet: FakeTailnet, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard whois-checks loopback peers (test_guard), so this is no longer a hole."""
    tailnet.status = status_json(tun=False)
    tailnet.serve_config = SERVE_CONFIG
    with caplog.at_level("INFO", logger="api.serve"):
        plan = await plan_serving(ApiSettings(mode="serve", port=8401), tailscale=localapi)
    assert plan.warnings == ()
    assert plan.userspace
    assert "checked with whois" in caplog.text


FOREGROUND_FUNNEL = {
    "Foreground": {
        "a1b2c3": {
            "TCP": {"8400": {"HTTPS": True}},
            "Web": {f"{DOMAIN}:8400": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:9999"}}}},
            "AllowFunnel": {f"{DOMAIN}:8400": True},
        }
    }
}


async def test_foreground_sessions_count_like_background_ones(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    """`tailscale funnel`/`serve` without --bg live in Foreground[<session>]: verified.md #15."""
    tailnet.serve_config = FOREGROUND_FUNNEL
    with pytest.raises(ConfigError, match="Funnel is enabled"):
        await plan_serving(ApiSettings(mode="serve", port=8401), tailscale=localapi)
    session = dict(FOREGROUND_FUNNEL["Foreground"]["a1b2c3"])
    session.pop("AllowFunnel")
    tailnet.serve_config = {"Foreground": {"a1b2c3": session}}
    with pytest.raises(ConfigError, match="would intercept"):
        await plan_serving(ApiSettings(mode="tls"), tailscale=localapi)
    plan = await plan_serving(ApiSettings(mode="serve", port=8401), tailscale=localapi)
    assert plan.warnings == (
        f"`tailscale serve` sends {DOMAIN}:8400 to http://127.0.0.1:9999, not to this daemon"
        " (http://127.0.0.1:8401)",
    )
    tailnet.serve_config = {"Foreground": {"a1b2c3": SERVE_CONFIG}}
    assert (
        await plan_serving(ApiSettings(mode="serve", port=8401), tailscale=localapi)
    ).warnings == ()


async def test_serve_mode_with_a_unix_backend_expects_serve_to_proxy_there(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    settings = ApiSettings(mode="serve", host="unix:/run/agentd/http.sock", port=8401)
    plan = await plan_serving(settings, tailscale=localapi)
    assert plan.warnings == (
        f"no `tailscale serve` handler for {DOMAIN}:8400 yet; run: tailscale serve --bg"
        " --https=8400 unix:/run/agentd/http.sock",
    )
    tailnet.serve_config = {
        "TCP": {"8400": {"HTTPS": True}},
        "Web": {f"{DOMAIN}:8400": {"Handlers": {"/": {"Proxy": "unix:/run/agentd/http.sock"}}}},
    }
    assert (await plan_serving(settings, tailscale=localapi)).warnings == ()


async def test_serve_mode_on_a_unix_socket_checks_proxied_requests(
    engine: FlowEngine, tmp_path: Path
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ag") as tmp:
        sock = Path(tmp) / "http.sock"
        settings = ApiSettings(
            mode="serve",
            host=f"unix:{sock}",
            public_name=DOMAIN,
            api_token=TOKEN,
            allowed_logins=(OWNER,),
        )
        app = create_app(engine, settings=settings)
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with (
            running(app, settings) as plan,
            httpx.AsyncClient(transport=transport, base_url=plan.base_url) as http,
        ):
            assert plan.redirect_uri == f"https://{DOMAIN}:8400/oauth/callback"
            assert sock.stat().st_mode & 0o777 == 0o600  # reachable by tailscaled (root) and us
            direct = await http.get("/healthz")
            proxied = await http.get(
                "/healthz",
                headers={"X-Forwarded-For": "100.90.1.2", "Tailscale-User-Login": OWNER},
            )
            tagged = await http.get("/healthz", headers={"X-Forwarded-For": "100.90.1.4"})
            public = await http.get(
                "/healthz", headers={"X-Forwarded-For": "8.8.8.8", "Tailscale-User-Login": OWNER}
            )
    assert (direct.status_code, proxied.status_code) == (200, 200)
    assert (tagged.status_code, public.status_code) == (403, 403)
    assert not sock.exists()  # removed at shutdown


def test_tls_mode_cannot_bind_a_unix_socket() -> None:
    with pytest.raises(ConfigError, match="not a unix socket"):
        validate_bind("unix:/run/agentd.sock", mode="tls", allow_public=False)


async def test_tls_mode_with_the_cli_fallback(
    engine: FlowEngine, tailnet: FakeTailnet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.tailscale import TailscaleCLI

    from .fake_tailscale import install_fake_cli

    argv_log = install_fake_cli(tmp_path / "bin", tailnet, monkeypatch)
    settings = ApiSettings(
        mode="tls", host="127.0.0.1", port=0, api_token=TOKEN, tls_dir=tmp_path / "tls"
    )
    trust = ssl.create_default_context()
    tailnet.ca.configure_trust(trust)
    app = create_app(engine, settings=settings)
    async with running(app, settings, tailscale=TailscaleCLI()) as plan:
        async with httpx.AsyncClient(verify=trust) as http:
            response = await http.get(f"https://127.0.0.1:{plan.port}/healthz")
    assert response.status_code == 200
    commands = [line.split('"')[1] for line in argv_log.read_text().splitlines()]
    assert commands == ["status", "cert"]
