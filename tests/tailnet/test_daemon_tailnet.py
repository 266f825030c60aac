"""``agentd serve`` on a real tailnet node, reached from other nodes through their tailscaled.

agentd-host runs tailscaled in userspace-networking mode, so a peer's connection to its
100.x:port arrives at 127.0.0.1:<ephemeral> and the guard names the caller with whois.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlencode

import httpx
import pytest

from flowengine.engine import FlowEngine
from tests.agentd.cli_helpers import LineReader

from .conftest import AgentdOnNode
from .harness import Tailnet

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

Start = Callable[..., AgentdOnNode]


async def start_flow(daemon: AgentdOnNode) -> str:
    """A flow waiting for its callback, written to the daemon's ledger; its OAuth state."""
    engine = await FlowEngine.open(daemon.instance.state_dir / "ledger.sqlite3")
    try:
        started = await engine.start(
            "dexcom",
            redirect_uri=f"{daemon.url}/oauth/callback",
            actor="test",
        )
        await engine.issue_url(started.flow.id, actor="test")
        return started.state
    finally:
        await engine.close()


async def test_tls_mode_lets_the_owner_in_and_refuses_other_users_and_tagged_devices(
    tailnet: Tailnet, start_agentd: Start
) -> None:
    owner, guest, tagged = tailnet["owner-laptop"], tailnet["guest-phone"], tailnet["ci-runner"]
    daemon = start_agentd(mode="tls", allowed_logins=(owner.login,))
    log = daemon.log()
    assert (
        f"redirect URI: https://agentd-host.tailnet-test.ts.net:{daemon.port}/oauth/callback" in log
    )
    assert f"listening on: https://127.0.0.1:{daemon.port}" in log  # userspace: loopback

    state = await start_flow(daemon)
    query = urlencode({"error": "access_denied", "state": state})
    with daemon.browser(owner) as browser:
        assert browser.get(f"{daemon.url}/healthz").json()["status"] == "ok"
        page = browser.get(f"{daemon.url}/oauth/callback?{query}")
    assert page.status_code == 200
    assert "Dexcom was not connected" in page.text

    for node, reason in (
        (guest, "this tailnet user is not allowed here"),
        (tagged, "tagged devices are not allowed here"),
    ):
        with daemon.browser(node) as browser:
            refused = browser.get(f"{daemon.url}/oauth/callback?{query}")
            assert refused.status_code == 403, node.name
            assert reason in refused.text
            assert browser.get(f"{daemon.url}/healthz").status_code == 403
    assert "refused /oauth/callback from 127.0.0.1" in daemon.log()


async def test_tls_mode_without_allowed_logins_serves_every_tailnet_device(
    tailnet: Tailnet, start_agentd: Start
) -> None:
    daemon = start_agentd(mode="tls")
    for node in (tailnet["guest-phone"], tailnet["ci-runner"]):
        with daemon.browser(node) as browser:
            assert browser.get(f"{daemon.url}/healthz").status_code == 200


async def test_serve_mode_through_tailscale_serve(tailnet: Tailnet, start_agentd: Start) -> None:
    """Behind ``tailscale serve`` (plain HTTP here: testcontrol issues no certificates)."""
    server, owner, guest = tailnet["agentd-host"], tailnet["owner-laptop"], tailnet["guest-phone"]
    public_port = 8480
    daemon = start_agentd(
        mode="serve",
        allowed_logins=(owner.login,),
        extra_server=f"public_port = {public_port}",
    )
    server.cli("serve", "--bg", f"--http={public_port}", f"http://127.0.0.1:{daemon.port}")
    try:
        public = f"http://{server.dns_name}:{public_port}"
        with owner.client() as browser:
            assert browser.get(f"{public}/healthz").status_code == 200
        with guest.client() as browser:
            assert browser.get(f"{public}/healthz").status_code == 403
    finally:
        server.cli("serve", "reset")


async def test_serve_mode_backend_port_is_not_a_bypass(
    tailnet: Tailnet, start_agentd: Start
) -> None:
    server, owner, guest = tailnet["agentd-host"], tailnet["owner-laptop"], tailnet["guest-phone"]
    daemon = start_agentd(
        mode="serve", allowed_logins=(owner.login,), extra_server="public_port = 8481"
    )
    forged = {"X-Forwarded-For": owner.ip4, "Tailscale-User-Login": owner.login}
    # raw bytes through guest's tailscaled: nothing strips or adds a header on the way
    plain, _ = guest.raw_get(server.ip4, daemon.port, "/healthz")
    forging, _ = guest.raw_get(server.ip4, daemon.port, "/healthz", forged)
    assert plain == 403
    assert forging == 403


def test_tailnet_proxy_reaches_nothing_without_a_listener(tailnet: Tailnet) -> None:
    """The harness itself: a closed port on a peer is an error, not a hang or a success."""
    with tailnet["owner-laptop"].client(timeout=20) as browser, pytest.raises(httpx.HTTPError):
        browser.get(f"http://{tailnet['agentd-host'].dns_name}:9/").raise_for_status()


def test_connect_on_the_daemons_host_completes_a_flow(
    tailnet: Tailnet, start_agentd: Start
) -> None:
    """`agentd connect` on agentd-host; the owner authorizes on their laptop."""
    owner = tailnet["owner-laptop"]
    daemon = start_agentd(mode="tls", allowed_logins=(owner.login,), sim=True)
    daemon.store_credentials()
    process = daemon.instance.popen("connect", "dexcom", "--no-qr", "--timeout", "60")
    assert process.stdout is not None
    assert process.stderr is not None
    out, err_reader = LineReader(process.stdout), LineReader(process.stderr)
    try:
        try:
            link = out.wait_for(lambda line: "/v2/oauth2/login?" in line, timeout=30).strip()
        except (EOFError, TimeoutError) as err:
            raise AssertionError(
                f"no link from agentd connect: {err}\n{err_reader.rest()}"
            ) from err
        # the provider is on the internet (here: localhost); its redirect goes to the daemon
        with httpx.Client(verify=daemon.instance.ssl_context(), timeout=30) as internet:
            consent = internet.get(link)
        assert consent.status_code in (302, 303), consent.text
        callback = consent.headers["location"]
        assert callback.startswith(f"{daemon.url}/oauth/callback?")
        with daemon.browser(owner) as browser:
            page = browser.get(callback)
        assert page.status_code == 200, page.text
        assert process.wait(60) == 0, out.rest() + err_reader.rest()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        stdout = out.rest()
        err_reader.rest()
        process.stdout.close()
        process.stderr.close()
    assert "✅ Dexcom connected" in stdout
    assert daemon.instance.auth_entries()["dexcom"]["access"]


async def test_serve_mode_owner_direct_is_judged_by_whois(
    tailnet: Tailnet, start_agentd: Start
) -> None:
    """Reaching the backend port directly is not a bypass, and not a lock-out either:
    whois names the real peer and the owner check applies to it."""
    server, owner, tagged = tailnet["agentd-host"], tailnet["owner-laptop"], tailnet["ci-runner"]
    daemon = start_agentd(
        mode="serve", allowed_logins=(owner.login,), extra_server="public_port = 8482"
    )
    status, _ = owner.raw_get(server.ip4, daemon.port, "/healthz")
    assert status == 200
    status, body = tagged.raw_get(
        server.ip4, daemon.port, "/healthz", {"Tailscale-User-Login": owner.login}
    )
    assert status == 403
    assert "tagged devices are not allowed here" in body


async def test_serve_mode_with_a_unix_backend(tailnet: Tailnet, start_agentd: Start) -> None:
    """`tailscale serve ... unix:<path>`: no TCP port at all for a peer to reach directly."""
    import tempfile

    server, owner, guest = tailnet["agentd-host"], tailnet["owner-laptop"], tailnet["guest-phone"]
    with tempfile.TemporaryDirectory(prefix="ag") as short:
        backend = f"{short}/http.sock"
        daemon = start_agentd(
            mode="serve",
            allowed_logins=(owner.login,),
            extra_server=f'public_port = 8483\nhost = "unix:{backend}"',
        )
        server.cli("serve", "--bg", "--http=8483", f"unix:{backend}")
        try:
            public = f"http://{server.dns_name}:8483"
            with owner.client() as browser:
                page = browser.get(f"{public}/healthz")
                assert page.status_code == 200
            with guest.client() as browser:
                assert browser.get(f"{public}/healthz").status_code == 403
        finally:
            server.cli("serve", "reset")
        assert f"no `tailscale serve` handler for {server.dns_name}:8483 yet" in daemon.log()


def test_tls_mode_refuses_an_unidentified_loopback_caller_under_userspace(
    tailnet: Tailnet, start_agentd: Start
) -> None:
    """A process on agentd-host itself calling 127.0.0.1:<port>: whois answers 404, which
    under userspace networking also covers subnet-routed sources; it is refused and told
    to use the local socket."""
    owner = tailnet["owner-laptop"]
    daemon = start_agentd(mode="tls", allowed_logins=(owner.login,))
    with httpx.Client(verify=daemon.instance.ssl_context(), timeout=20) as local:
        response = local.get(
            f"https://127.0.0.1:{daemon.port}/healthz",
            headers={"Host": f"{daemon.node.dns_name}:{daemon.port}"},
            extensions={"sni_hostname": daemon.node.dns_name},
        )
    assert response.status_code == 403
    assert "unix socket" in response.json()["message"]
