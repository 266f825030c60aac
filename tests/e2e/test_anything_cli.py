"""``agentd connect <url>`` and ``agentd connect <provider> --device`` as the owner runs them:
real agentd processes, a real daemon, oidc-provider (anything.mjs) and the protected
resource, everything over HTTPS with private CAs trusted through ``[client] ca_file``.

* the MCP server's URL: the daemon discovers it, registers its own callback, the owner
  authorizes in a browser, the daemon exchanges; ``providers``, ``providers <id>`` and
  ``status`` show the discovered provider; ``token`` prints a JWT whose audience is the
  resource, which the resource accepts;
* ``--device`` needs no daemon: the code and the page are printed, the owner approves (or
  denies) on another device, the command polls and reports; exit codes 0 and 6.
"""

from __future__ import annotations

import re
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import anyio
import httpx
import pytest

from tests.agentd.cli_helpers import AgentdInstance, DaemonProcess, LineReader
from tests.e2e.conftest import AnythingServer
from tests.e2e.helpers import answer_device, follow_to_redirect
from tests.e2e.resource import ProtectedResource
from tests.e2e.test_anything import claims

pytestmark = pytest.mark.slow


@pytest.fixture(name="instance")
def _instance(tmp_path: Path, anything_server: AnythingServer) -> AgentdInstance:
    instance = AgentdInstance(tmp_path)
    instance.write_config()
    # the authorization server's and the resource's private CA, next to the daemon's
    assert anything_server.ca_file is not None
    with instance.ca_file.open("a", encoding="utf-8") as bundle:
        bundle.write(anything_server.ca_file.read_text())
    return instance


@pytest.fixture(name="daemon")
def _daemon(instance: AgentdInstance) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(instance)
    try:
        daemon.wait_healthy()
        yield daemon
    finally:
        daemon.stop()


def _reap(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(5)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _trust(server: AnythingServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca_file))


def test_connect_an_mcp_server_by_its_url(
    instance: AgentdInstance,
    daemon: DaemonProcess,
    anything_server: AnythingServer,
    protected_resource: ProtectedResource,
) -> None:
    url = protected_resource.url("/mcp")
    process = instance.popen("connect", url, "--no-qr", "--timeout", "120")
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    try:
        assert out.wait_for(lambda t: "Open this link to authorize" in t).strip() == (
            "Open this link to authorize Test MCP server /mcp:"
        )
        link = out.wait_for(lambda t: t.strip().startswith("https://")).strip()
        assert link.startswith(f"{anything_server.issuer('oauth')}/auth?")
        assert httpx.URL(link).params["resource"] == url
        assert httpx.URL(link).params["redirect_uri"] == instance.redirect_uri
        query = anyio.run(
            lambda: follow_to_redirect(link, instance.redirect_uri, verify=_trust(anything_server))
        )
        with instance.browser() as browser:
            page = browser.get(f"{instance.redirect_uri}?{query}")
        assert "connected — you can close this tab" in page.text
        assert process.wait(60) == 0, err.rest()
        stdout = out.rest()
    finally:
        _reap(process)
    assert "✅ Test MCP server /mcp connected (scopes: mcp:tools" in stdout

    pid = f"localhost-{url.split(':')[2].split('/')[0]}"
    listing = instance.run("providers")
    assert listing.returncode == 0, listing.stderr
    (row,) = [line for line in listing.stdout.splitlines() if line.startswith(pid)]
    assert "Test MCP server /mcp" in row
    assert "stored" in row
    detail = instance.run("providers", pid)
    assert detail.returncode == 0, detail.stderr
    assert "client:        registered by this agent (RFC 7591)" in detail.stdout
    assert re.search(rf"resource\s+{re.escape(url)}\s+verified", detail.stdout), detail.stdout
    assert f"discovered from {url} (challenge)" in detail.stdout
    status = instance.run("status")
    assert status.returncode == 0, status.stderr
    assert re.search(rf"^{pid}\s+stored\s", status.stdout, re.M), status.stdout

    token = instance.run("token", pid)
    assert token.returncode == 0, token.stderr
    access = token.stdout.strip()
    assert claims(access)["aud"] == url
    with httpx.Client(verify=_trust(anything_server)) as client:
        answer = client.get(url, headers={"Authorization": f"Bearer {access}"})
    assert answer.status_code == 200


def _device_run(
    instance: AgentdInstance, target: str, *, approve: bool, extra: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    """``agentd -v connect <target> --device``; the owner answers with the printed code.

    The device code (read from the ledger while the command polls) must not appear in
    the command's output, its DEBUG log or the ledger files afterwards.
    """
    process = instance.popen("-v", "connect", target, "--device", "--timeout", "120", *extra)
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    try:
        out.wait_for(lambda t: "open this page on any device" in t)
        page = out.wait_for(lambda t: t.strip().startswith("https://")).strip()
        code_line = out.wait_for(lambda t: "and enter the code" in t)
        user_code = code_line.split("the code", 1)[1].split()[0]
        ledger = f"file:{instance.state_dir / 'ledger.sqlite3'}?mode=ro"
        with closing(sqlite3.connect(ledger, uri=True)) as db:
            (device_code,) = db.execute(
                "SELECT device_code FROM flow_secrets WHERE device_code IS NOT NULL"
            ).fetchone()
        complete = f"{page}?user_code={user_code}"
        text = anyio.run(
            lambda: answer_device(complete, approve=approve, verify=instance.ssl_context())
        )
        assert ("Device approved" if approve else "Access denied") in text
        code = process.wait(60)
        stdout, stderr = out.rest(), err.rest()
    finally:
        _reap(process)
    assert "DEBUG" in stderr or "INFO" in stderr  # -v: the log is there to be scanned
    assert device_code not in stdout + stderr
    on_disk = b"".join(p.read_bytes() for p in instance.state_dir.glob("ledger.sqlite3*"))
    assert device_code.encode() not in on_disk
    return code, stdout, stderr


def test_connect_with_a_code_needs_no_daemon(
    instance: AgentdInstance, protected_resource: ProtectedResource
) -> None:
    url = protected_resource.url("/mcp")
    code, stdout, stderr = _device_run(instance, url, approve=True, extra=("--qr",))
    assert code == 0, stderr
    assert "✅ Test MCP server /mcp connected" in stdout
    # worded for the device grant, not for a browser coming back
    assert re.search(r"waiting for the code to be entered; the code is valid for \d", stderr)
    assert "browser" not in stderr
    assert "or scan this QR code (the code is filled in):" in stdout  # --qr: even into a pipe
    assert "█" in stdout
    pid = f"localhost-{url.split(':')[2].split('/')[0]}"
    token = instance.run("token", pid)
    assert token.returncode == 0, token.stderr
    assert claims(token.stdout.strip())["aud"] == url

    code, stdout, _ = _device_run(instance, pid, approve=False)
    assert code == 6
    assert "(QR code left out: the output is no terminal; --qr shows it anyway)" in stdout
    assert "❌ Test MCP server /mcp authorization was denied" in stdout
    flows = instance.run("flows", "--provider", pid)
    assert flows.returncode == 0
    assert "failed" in flows.stdout
    assert "stored" in flows.stdout


def test_a_provider_without_a_device_endpoint_is_a_usage_error(instance: AgentdInstance) -> None:
    result = instance.run("connect", "dexcom", "--device")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith("error:")
    assert "Dexcom has no device authorization endpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_what_the_daemon_cannot_discover_is_one_line_and_exit_2(
    instance: AgentdInstance, daemon: DaemonProcess, anything_server: AnythingServer
) -> None:
    result = instance.run("connect", anything_server.issuer("liar"), "--no-qr")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: the metadata at ")
    assert "names issuer" in line
    assert "refused" in line
    plain = instance.run("connect", "http://127.0.0.1:9/oauth", "--no-qr")
    assert plain.returncode == 2
    assert "must use https" in plain.stderr


def test_ctrl_c_cancels_the_device_flow(
    instance: AgentdInstance, protected_resource: ProtectedResource
) -> None:
    import signal

    process = instance.popen("connect", protected_resource.url("/mcp"), "--device", "--no-qr")
    assert process.stdout is not None
    out = LineReader(process.stdout)
    try:
        out.wait_for(lambda t: "and enter the code" in t)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130
    finally:
        _reap(process)
    flows = instance.run("flows", "--state", "cancelled")
    assert flows.returncode == 0
    assert "cancelled" in flows.stdout
    assert "awaiting_device" not in instance.run("flows").stdout
