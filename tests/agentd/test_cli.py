"""The ``agentd`` command as subprocesses against a running ``agentd serve`` (real server,
real TLS) and the simulated Dexcom (``agentd.simoauth`` + ``integrations.dexcom.sim``) over
HTTPS.

The module shares one daemon, one sim and one temp installation (module-scoped fixtures);
tests that need a connection call :func:`ensure_connected`, tests that break it repair it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import socket
import stat
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from agentd.config import load_config
from agentd.context import redirect_uri
from agentd.simoauth import SimOAuth
from integrations.dexcom.sim import DexcomSim
from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    DaemonProcess,
    LineReader,
    SimServer,
    dexcom_sim,
    free_port,
)
from tests.conftest import real_peer_missing

HAS_DOT = shutil.which("dot") is not None
NO_DOT = real_peer_missing("graphviz", "apt-get install graphviz; it provides `dot`")

# every secret the module saw (tokens, codes, the client secret): never in any output
SECRETS: set[str] = {SIM_CLIENT_SECRET}


@pytest.fixture(name="instance", scope="module")
def _instance(tmp_path_factory: pytest.TempPathFactory) -> AgentdInstance:
    instance = AgentdInstance(tmp_path_factory.mktemp("agentd-cli"))
    instance.write_config()
    return instance


@pytest.fixture(name="sim_server", scope="module")
def _sim_server(instance: AgentdInstance) -> Iterator[SimServer]:
    server = dexcom_sim(instance)
    server.start()
    instance.write_catalog(server.base_url)
    yield server
    server.stop()


@pytest.fixture(name="daemon", scope="module")
def _daemon(instance: AgentdInstance, sim_server: SimServer) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(instance)
    try:
        daemon.wait_healthy()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(name="cli", scope="module")
def _cli(instance: AgentdInstance, daemon: DaemonProcess) -> AgentdInstance:
    """The installation with the daemon running and Dexcom's client credentials stored."""
    result = instance.run(
        "credentials", "dexcom", "--client-id", SIM_CLIENT_ID, "--secret-stdin",
        input=SIM_CLIENT_SECRET + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return instance


@pytest.fixture(name="sim")
def _sim(sim_server: SimServer) -> SimOAuth:
    return sim_server.sim


@pytest.fixture(name="dexcom")
def _dexcom(sim_server: SimServer) -> DexcomSim:
    assert isinstance(sim_server.api, DexcomSim)
    return sim_server.api


# --------------------------------------------------------------------- helpers


class ConnectRun:
    def __init__(self, returncode: int, stdout: str, stderr: str, callback_query: dict[str, Any]):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.callback_query = callback_query


def run_connect(instance: AgentdInstance, *args: str) -> ConnectRun:
    """``agentd connect dexcom``, with httpx as the browser that opens the printed link."""
    process = instance.popen("connect", "dexcom", "--timeout", "120", *args)
    assert process.stdout is not None
    assert process.stderr is not None
    out = LineReader(process.stdout)
    err = LineReader(process.stderr)
    try:
        line = out.wait_for(lambda text: "/v2/oauth2/login?" in text)
        url = line.strip()
        assert url.startswith("https://localhost:")
        with instance.browser() as browser:
            response = browser.get(url)
        assert response.history, "the provider should redirect to the daemon's callback"
        callback = urlsplit(str(response.url))
        assert f"{callback.scheme}://{callback.netloc}{callback.path}" == instance.redirect_uri
        query = {k: v[0] for k, v in parse_qs(callback.query).items()}
        if "code" in query:
            SECRETS.add(query["code"])
        returncode = process.wait(150)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        stdout, stderr = out.rest(), err.rest()
        process.stdout.close()
        process.stderr.close()
    return ConnectRun(returncode, stdout, stderr, query)


def remember_tokens(instance: AgentdInstance) -> dict[str, Any]:
    entry: dict[str, Any] = instance.auth_entries().get("dexcom", {})
    for key in ("access", "refresh"):
        if isinstance(entry.get(key), str):
            SECRETS.add(entry[key])
    return entry


def ensure_connected(instance: AgentdInstance) -> dict[str, Any]:
    """A usable Dexcom connection (connects when there is none); its auth.json entry."""
    entry = instance.auth_entries().get("dexcom")
    if not entry or entry.get("refresh") == "revoked-by-test":
        result = run_connect(instance, "--no-qr")
        assert result.returncode == 0, result.stdout + result.stderr
    return remember_tokens(instance)


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def import_names(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------- serve


def test_serve_logs_redirect_uri_bind_tls_mode_and_components(
    instance: AgentdInstance, daemon: DaemonProcess
) -> None:
    log = daemon.log()
    assert f"redirect URI: {instance.redirect_uri}" in log
    assert re.search(rf"listening on: https://127\.0\.0\.1:{instance.daemon_port}\b", log), log
    assert "TLS mode: TLS terminated here" in log
    running = [line for line in log.splitlines() if "running:" in line]
    assert len(running) == 1
    assert "api" in running[0]
    assert "timer (every 1 s)" in running[0]
    # no bot token configured: the same line says the bot is off and why
    assert running[0].endswith(
        f"; telegram bot off: no telegram.bot_token in {instance.config_file}"
    )


# ----------------------------------------------------------------- credentials


def test_credentials_are_stored_0600_and_never_echoed(cli: AgentdInstance) -> None:
    stored = cli.state_dir / "credentials.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert json.loads(stored.read_text())  # the store holds something
    result = cli.run("providers")
    assert result.returncode == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert rows["dexcom"].rstrip().endswith("stored")
    assert rows["oura"].rstrip().endswith("-")
    assert_no_secrets(result.stdout, result.stderr)


def test_providers_detail_names_sources_and_flags_unverified_fields(
    instance: AgentdInstance,
) -> None:
    withings = instance.run("providers", "withings")
    assert withings.returncode == 0, withings.stderr
    out = withings.stdout
    assert out.startswith("Withings (withings)\ndocumentation: https://developer.withings.com/")
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].islower()}
    assert rows["scopes"].split()[1:] == ["user.metrics", "verified"]
    assert rows["token_params"].split()[1:] == ["action=requesttoken", "verified"]
    assert rows["envelope_reauthorize"].rstrip().endswith("UNVERIFIED")
    assert "12 months after the last refresh" in rows["refresh_lifetime"]
    assert "1 unverified field(s): envelope_reauthorize" in out
    google = instance.run("providers", "google").stdout
    assert "if the app's publishing status is Testing  UNVERIFIED" in google
    unknown = instance.run("providers", "withingz")
    assert unknown.returncode == 2
    assert "did you mean" in unknown.stderr


def test_credentials_without_secret_is_a_usage_error(cli: AgentdInstance) -> None:
    result = cli.run("credentials", "oura", "--client-id", "x", "--secret-stdin", input="\n")
    assert result.returncode == 2
    assert "needs a client secret" in result.stderr


def test_credentials_never_take_the_client_id_from_piped_stdin(cli: AgentdInstance) -> None:
    result = cli.run("credentials", "oura", "--secret-stdin", input="oura-secret\n")
    assert result.returncode == 2
    assert "--client-id" in result.stderr
    assert "oura" not in json.loads((cli.state_dir / "credentials.json").read_text())


# --------------------------------------------------------------------- connect


def test_connect_prints_link_and_qr_then_stores_tokens(cli: AgentdInstance, sim: SimOAuth) -> None:
    before = sim.counters.token_requests["authorization_code"]
    result = run_connect(cli, "--qr")  # stdout is a pipe: only --qr prints the code
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Open this link to authorize Dexcom" in result.stdout
    assert "█" in result.stdout or "▀" in result.stdout or "▄" in result.stdout  # the QR code
    assert "\x1b[" not in result.stdout  # no colours into a pipe
    # not a terminal: the wait is said once, not animated
    assert "waiting for the browser; the link is valid for 10m (Ctrl-C cancels)" in result.stderr
    assert "✅ Dexcom connected" in result.stdout
    assert sim.counters.token_requests["authorization_code"] == before + 1

    entry = remember_tokens(cli)
    assert isinstance(entry["access"], str)
    assert isinstance(entry["refresh"], str)
    # expires in epoch milliseconds, about the sim's 7200 s from now
    assert abs(entry["expires"] - (now_ms() + 7_200_000)) < 120_000
    assert stat.S_IMODE(cli.auth_file.stat().st_mode) == 0o600
    assert_no_secrets(result.stdout, result.stderr)


def test_denied_connect_exits_6(cli: AgentdInstance, sim: SimOAuth) -> None:
    sim.consent = "deny"
    try:
        result = run_connect(cli, "--no-qr")
    finally:
        sim.consent = "allow"
    assert result.callback_query.get("error") == "access_denied"
    assert result.returncode == 6
    assert "denied" in result.stdout


def flows_by_state(instance: AgentdInstance) -> dict[str, int]:
    result = instance.run("flows", "--provider", "dexcom", "--limit", "100")
    assert result.returncode == 0, result.stderr
    counts: dict[str, int] = {}
    for row in flow_rows(result.stdout):
        counts[row[2]] = counts.get(row[2], 0) + 1
    return counts


def test_connect_fails_fast_when_the_daemon_is_down(cli: AgentdInstance, tmp_path: Path) -> None:
    """Another state dir: no daemon socket there (the credentials are copied along)."""
    state = tmp_path / "s"
    state.mkdir()
    shutil.copy(cli.state_dir / "credentials.json", state / "credentials.json")
    result = cli.run("connect", "dexcom", "--no-qr", env=cli.env(AGENTD_PATHS_STATE_DIR=str(state)))
    assert result.returncode == 5
    assert f"the daemon is not running (no socket at {state / 'agentd.sock'})" in result.stderr
    assert "agentd serve" in result.stderr
    assert result.stdout == ""  # no link printed: no flow was started


def test_connect_uses_the_daemons_redirect_uri_and_cancels_on_timeout(
    cli: AgentdInstance,
) -> None:
    # whatever this process would derive, the daemon's own plan decides the redirect URI
    env = cli.env(AGENTD_SERVER_PUBLIC_NAME="elsewhere.example", AGENTD_SERVER_PORT="1")
    before = flows_by_state(cli)
    result = cli.run("connect", "dexcom", "--no-qr", "--timeout", "1", env=env)
    assert result.returncode == 6, result.stderr
    url = next(line.strip() for line in result.stdout.splitlines() if "/v2/oauth2/login?" in line)
    query = parse_qs(urlsplit(url).query)
    assert query["redirect_uri"] == [cli.redirect_uri]
    assert "⌛ no answer within 1 s" in result.stdout
    after = flows_by_state(cli)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1


def test_a_killed_connect_still_gets_its_connection(cli: AgentdInstance, sim: SimOAuth) -> None:
    """The daemon owns the exchange: SIGKILL the command, open the link, tokens arrive."""
    previous = cli.auth_entries().get("dexcom", {}).get("access")
    process = cli.popen("connect", "dexcom", "--no-qr", "--timeout", "60")
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    try:
        url = out.wait_for(lambda text: "/v2/oauth2/login?" in text).strip()
        process.kill()
        process.wait(10)
    finally:
        out.rest()
        err.rest()
        process.stdout.close()
        process.stderr.close()
    before = sim.counters.token_requests["authorization_code"]
    with cli.browser() as browser:
        page = browser.get(url)
    assert page.status_code == 200
    assert "Dexcom connected — you can close this tab" in page.text
    assert sim.counters.token_requests["authorization_code"] == before + 1
    entry = remember_tokens(cli)
    assert entry["access"]
    assert entry["access"] != previous
    assert flows_by_state(cli).get("code_received", 0) == 0


def test_interrupted_connect_cancels_its_flow(cli: AgentdInstance) -> None:
    before = flows_by_state(cli)
    process = cli.popen("connect", "dexcom", "--no-qr")
    assert process.stdout is not None
    assert process.stderr is not None
    out = LineReader(process.stdout)
    err = LineReader(process.stderr)
    try:
        out.wait_for(lambda text: "/v2/oauth2/login?" in text)
        process.send_signal(signal.SIGINT)
        returncode = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        stderr = err.rest()
        out.rest()
        process.stdout.close()
        process.stderr.close()
    assert returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    after = flows_by_state(cli)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after.get("awaiting_code", 0) == before.get("awaiting_code", 0)


# ----------------------------------------------------------------------- token


def test_token_fast_path_prints_token_without_the_async_stack(cli: AgentdInstance) -> None:
    entry = ensure_connected(cli)
    result = cli.run("token", "dexcom", python_args=("-X", "importtime"))
    assert result.returncode == 0
    assert result.stdout == entry["access"] + "\n"
    names = import_names(result.stderr)
    assert "agentd.cli" in names or "flowengine.tokens" in names  # importtime did report
    assert not names & {"httpx", "anyio", "aiosqlite", "quart", "hypercorn", "agentd.commands"}
    assert "agentd.sections" not in names  # the typed sections are built on first use only


def test_token_refreshes_when_near_expiry(cli: AgentdInstance, sim: SimOAuth) -> None:
    entry = ensure_connected(cli)
    # a two-hour token with 30 s left: inside its margin, min(60 s, a quarter of its life)
    cli.edit_vault("dexcom", expires=now_ms() + 30_000, obtained_at=now_ms() - 7_170_000)
    before = sim.counters.token_requests["refresh_token"]
    result = cli.run("token", "dexcom", python_args=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    names = import_names(result.stderr)
    assert "httpx" in names  # the slow path ran ...
    assert not names & {"quart", "hypercorn", "telethon"}  # ... without the server stack
    new = remember_tokens(cli)
    assert result.stdout == new["access"] + "\n"
    assert new["access"] != entry["access"]
    assert new["expires"] > now_ms() + 7_000_000
    assert sim.counters.token_requests["refresh_token"] == before + 1


def test_token_not_connected_exits_3(cli: AgentdInstance) -> None:
    result = cli.run("token", "oura")
    assert result.returncode == 3
    assert "not connected" in result.stderr
    assert result.stdout == ""


def test_token_unknown_provider_exits_2(cli: AgentdInstance) -> None:
    result = cli.run("token", "dexcon")
    assert result.returncode == 2
    assert "dexcom" in result.stderr  # the suggestion


def test_token_provider_down_exits_5_then_recovers(cli: AgentdInstance, sim: SimOAuth) -> None:
    entry = ensure_connected(cli)
    cli.edit_vault("dexcom", expires=now_ms() - 1_000)
    injected = sim.counters.injected
    sim.inject(503, count=1, path_prefix="/v2/oauth2/token")
    result = cli.run("token", "dexcom")
    assert result.returncode == 5, result.stderr
    assert sim.counters.injected == injected + 1
    assert result.stdout == ""
    # the stored tokens stay; once the provider is back, the same command works
    assert cli.auth_entries()["dexcom"]["refresh"] == entry["refresh"]
    again = cli.run("token", "dexcom")
    assert again.returncode == 0, again.stderr
    assert again.stdout == remember_tokens(cli)["access"] + "\n"


def test_token_provider_unreachable_exits_5(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    cli.edit_vault("dexcom", expires=now_ms() - 1_000)
    catalog = cli.config_home / "agent" / "providers.toml"
    original = catalog.read_text()
    dead = "https://localhost:9/v2/oauth2/token"
    catalog.write_text(re.sub(r'token_url = "[^"]*"', f'token_url = "{dead}"', original))
    try:
        result = cli.run("token", "dexcom")
    finally:
        catalog.write_text(original)
    assert result.returncode == 5, result.stderr
    again = cli.run("token", "dexcom")
    assert again.returncode == 0, again.stderr


def test_token_rejected_refresh_exits_4(cli: AgentdInstance, sim: SimOAuth) -> None:
    ensure_connected(cli)
    rejected = sim.counters.refresh_rejected
    cli.edit_vault("dexcom", expires=now_ms() - 1_000, refresh="revoked-by-test")
    result = cli.run("token", "dexcom")
    assert result.returncode == 4, result.stderr
    assert "agentd connect dexcom" in result.stderr
    assert sim.counters.refresh_rejected == rejected + 1
    status = cli.run("status")
    assert re.search(r"^dexcom\s+expired\s", status.stdout, re.MULTILINE), status.stdout
    # asking again does not hammer the provider: the ledger already says "expired"
    assert cli.run("token", "dexcom").returncode == 4
    assert sim.counters.refresh_rejected == rejected + 1
    ensure_connected(cli)
    assert cli.run("token", "dexcom").returncode == 0


# ------------------------------------------------------------- status and flows


def test_status_table(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    result = cli.run("status")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "PROVIDER",
        "STATE",
        "HEALTH",
        "TOKEN EXPIRES",
        "LAST REFRESH",
        "RECONNECT BY",
        "SCOPES",
        "LAST ERROR",
    ]
    row = next(line for line in lines[1:] if line.startswith("dexcom "))
    assert re.match(
        r"dexcom\s+stored\s+ok\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(in (1h [1-5]?\dm|1h|2h)\)\s+\S.*"
        # Dexcom documents no grant lifetime: no reconnect date; and the sim answers like
        # Dexcom: no "scope" in the token response
        r" - +offline_access \(requested; the provider did not say what it granted\)\s+\S+",
        row,
    ), row
    sock = cli.state_dir / "agentd.sock"
    assert lines[-1] == f"daemon: running ({sock}); it refreshes tokens in the background"
    assert_no_secrets(result.stdout, result.stderr)


def test_status_says_when_refreshes_keep_failing_and_since_when(
    cli: AgentdInstance, sim: SimOAuth
) -> None:
    ensure_connected(cli)
    cli.edit_vault("dexcom", expires=now_ms() - 1_000)
    sim.inject(503, count=2, path_prefix="/v2/oauth2/token")
    for _ in range(2):
        assert cli.run("token", "dexcom").returncode == 5
    status = cli.run("status")
    row = next(line for line in status.stdout.splitlines() if line.startswith("dexcom "))
    assert re.search(r"refresh failing since \d+s ago: \S+", row), row
    data = json.loads(cli.run("status", "--json").stdout)
    (dexcom,) = [c for c in data["connections"] if c["provider"] == "dexcom"]
    assert dexcom["health"]["status"] == "refresh_failing"
    assert dexcom["last_error"]["code"] == dexcom["health"]["reason"]
    assert now_ms() - 120_000 < dexcom["health"]["since"] <= now_ms()
    # the provider is back: the next request repairs it, the last error stays visible
    assert cli.run("token", "dexcom").returncode == 0
    data = json.loads(cli.run("status", "--json").stdout)
    (dexcom,) = [c for c in data["connections"] if c["provider"] == "dexcom"]
    assert dexcom["health"] == {"status": "ok", "since": None, "reason": None}
    assert dexcom["last_error"] is not None
    remember_tokens(cli)


def flow_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["FLOW", "PROVIDER", "STATE"]
    return [line.split() for line in lines[1:] if line.strip()]


def test_flows_lists_and_filters(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    result = cli.run("flows", "--provider", "dexcom")
    assert result.returncode == 0
    rows = flow_rows(result.stdout)
    states = {row[2] for row in rows}
    # the module connected, was denied, superseded a connection, expired one ...
    assert {"stored", "failed"} <= states
    assert all(row[1] == "dexcom" for row in rows)
    only = cli.run("flows", "--state", "failed")
    assert only.returncode == 0
    failed = flow_rows(only.stdout)
    assert failed
    assert all(row[2] == "failed" for row in failed)
    assert {row[0] for row in failed} <= {row[0] for row in rows}
    none = cli.run("flows", "--provider", "oura")
    assert none.returncode == 0
    assert flow_rows(none.stdout) == []
    assert_no_secrets(result.stdout, only.stdout)


def current_flow_id(instance: AgentdInstance) -> str:
    flow_id = instance.auth_entries()["dexcom"]["flow_id"]
    assert isinstance(flow_id, str)
    return flow_id


def test_flow_shows_its_ledger_without_secrets(cli: AgentdInstance, sim: SimOAuth) -> None:
    ensure_connected(cli)
    flow_id = current_flow_id(cli)
    # one second left of a two-hour token: refreshed on use
    cli.edit_vault("dexcom", expires=now_ms() + 1_000, obtained_at=now_ms() - 7_199_000)
    assert cli.run("token", "dexcom").returncode == 0  # one refresh in this flow's ledger
    remember_tokens(cli)
    result = cli.run("flow", flow_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"flow {flow_id}  dexcom  stored")
    assert f"redirect_uri  {cli.redirect_uri}" in result.stdout
    assert "\n  requested     offline_access\n" in result.stdout
    # what auth.json holds for this flow: the sim's token response names no scope
    assert (
        "\n  scopes        offline_access (requested; the provider did not say what it granted)\n"
        in result.stdout
    )
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("SEQ "))
    start, end = header.index("TRIGGER"), header.index("TO ")
    triggers = [
        line[start:end].strip()
        for line in lines
        if re.match(r"\d+\s+\d\d:\d\d:\d\d\.\d{3}\s", line)
    ]
    assert triggers[:6] == ["create", "issue_url", "receive_code", "exchange", "store",
                            "begin_refresh"]  # fmt: skip
    assert "refreshed" in triggers
    assert_no_secrets(result.stdout, result.stderr)
    missing = cli.run("flow", "no-such-flow")
    assert missing.returncode == 2
    assert "no-such-flow" in missing.stderr


# ---------------------------------------------------------------------- diagram


def test_diagram_formats(cli: AgentdInstance, tmp_path: Path) -> None:
    mermaid = cli.run("diagram")
    assert mermaid.returncode == 0
    assert mermaid.stdout.lstrip().startswith("stateDiagram")
    assert "awaiting_code" in mermaid.stdout.lower()
    dot = cli.run("diagram", "--format", "dot")
    assert dot.returncode == 0
    assert "digraph" in dot.stdout


@pytest.mark.skipif(not HAS_DOT, reason=NO_DOT)
def test_diagram_svg_to_a_file(cli: AgentdInstance, tmp_path: Path) -> None:
    target = tmp_path / "machine.svg"
    svg = cli.run("diagram", "--format", "svg", "-o", str(target))
    assert svg.returncode == 0, svg.stderr
    assert svg.stdout == ""
    assert "<svg" in target.read_text(encoding="utf-8")


def test_diagram_svg_without_graphviz_exits_2_with_an_install_hint(
    cli: AgentdInstance, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    ensure_connected(cli)
    for args in (("diagram", "--format", "svg"), ("diagram", "--flow", current_flow_id(cli),
                 "--format", "svg")):  # fmt: skip
        result = cli.run(*args, env=cli.env(PATH=str(empty)))  # `dot` is nowhere on PATH
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "error: --format svg needs Graphviz's `dot`, which is not installed"
            " (Debian/Ubuntu: sudo apt-get install graphviz; or use --format mermaid or dot)"
        ]


@pytest.mark.parametrize(
    ("where", "reason"),
    [("missing/machine.svg", "its folder does not exist"), (".", "it is a directory")],
)
def test_diagram_output_to_a_missing_folder_or_a_directory_exits_2(
    cli: AgentdInstance, tmp_path: Path, where: str, reason: str
) -> None:
    target = tmp_path / where
    result = cli.run("diagram", "-o", str(target))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --output: cannot write {target}: {reason}")
    assert len(result.stderr.splitlines()) == 1


def test_diagram_of_one_flow(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    flow_id = current_flow_id(cli)
    machine = cli.run("diagram").stdout
    result = cli.run("diagram", "--flow", flow_id)
    assert result.returncode == 0, result.stderr
    assert f"title: flow {flow_id} (dexcom): stored" in result.stdout
    assert "stateDiagram" in result.stdout
    assert "class stored current" in result.stdout
    assert "class refreshing visited" in result.stdout
    assert "class stored current" not in machine


@pytest.mark.skipif(not HAS_DOT, reason=NO_DOT)
def test_diagram_of_one_flow_as_svg(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    svg = cli.run("diagram", "--flow", current_flow_id(cli), "--format", "svg")
    assert svg.returncode == 0, svg.stderr
    assert "<svg" in svg.stdout


# ---------------------------------------------------------------------- dexcom


def sim_value(sim: DexcomSim, when: datetime) -> int:
    t = when.timestamp()
    records = sim.egv_records(t - 1, t + 1)
    assert len(records) == 1
    value = records[0]["value"]
    assert isinstance(value, int)
    return value


def test_dexcom_latest(cli: AgentdInstance, dexcom: DexcomSim) -> None:
    ensure_connected(cli)
    candidates = {sim_value(dexcom, dexcom.latest_egv_time())}
    result = cli.run("dexcom", "latest")
    candidates.add(sim_value(dexcom, dexcom.latest_egv_time()))
    assert result.returncode == 0, result.stderr
    match = re.match(r"(\d+) mg/dL \S+ ", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) in candidates
    mmol = cli.run("dexcom", "latest", "--unit", "mmol/L")
    assert mmol.returncode == 0
    assert re.match(r"\d+\.\d mmol/L ", mmol.stdout), mmol.stdout


def test_dexcom_egvs_json_and_csv_match_the_provider(
    cli: AgentdInstance, dexcom: DexcomSim
) -> None:
    ensure_connected(cli)
    result = cli.run("dexcom", "egvs", "--since", "2h", "--json")
    assert result.returncode == 0, result.stderr
    readings = json.loads(result.stdout)
    assert 23 <= len(readings) <= 25  # 5-minute cadence
    for reading in readings:
        when = datetime.fromisoformat(reading["system_time"].replace("Z", "+00:00"))
        assert reading["value_mgdl"] == sim_value(dexcom, when)
    times = [r["system_time"] for r in readings]
    assert times == sorted(times)

    as_csv = cli.run("dexcom", "egvs", "--since", "2h", "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert 23 <= len(rows) <= 25
    for row in rows:
        when = datetime.fromisoformat(row["system_time"].replace("Z", "+00:00"))
        assert int(row["value_mgdl"]) == sim_value(dexcom, when)

    table = cli.run("dexcom", "egvs", "--since", "1h")
    assert table.returncode == 0
    assert re.search(r"^\d+ readings$", table.stderr, re.MULTILINE)

    bad = cli.run("dexcom", "egvs", "--since", "soon")
    assert bad.returncode == 2
    assert "--since" in bad.stderr


def test_dexcom_range(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    result = cli.run("dexcom", "range")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["egvs", "events", "calibrations"]
    assert re.match(
        r"egvs\s+\d{4}-\d\d-\d\d \d\d:\d\d \.\. \d{4}-\d\d-\d\d \d\d:\d\d UTC$", lines[0]
    )


def test_dexcom_not_connected_exits_3(cli: AgentdInstance) -> None:
    result = cli.run("dexcom", "latest", "--provider", "dexcom-eu")
    assert result.returncode == 3, result.stderr


# ------------------------------------------------------------------ disconnect


def test_disconnect_revokes_and_forgets(cli: AgentdInstance, sim: SimOAuth) -> None:
    ensure_connected(cli)
    flow_id = current_flow_id(cli)
    revocations = sim.counters.revocations
    result = cli.run("disconnect", "dexcom")
    assert result.returncode == 0, result.stderr
    assert "revoked at the provider" in result.stdout
    assert sim.counters.revocations == revocations + 1
    assert "dexcom" not in cli.auth_entries()
    flow = cli.run("flow", flow_id)
    assert re.search(r"\srevoke\s+revoked\s+cli\b", flow.stdout), flow.stdout
    assert cli.run("token", "dexcom").returncode == 3
    assert_no_secrets(result.stdout, result.stderr, flow.stdout)


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("server", "redirect"),
    [
        (
            {"mode": "tls", "port": "9443", "public_name": "h.t.ts.net"},
            "https://h.t.ts.net:9443/oauth/callback",
        ),
        (
            {"mode": "tls", "port": "9443", "public_port": "443", "public_name": "h.t.ts.net"},
            "https://h.t.ts.net/oauth/callback",
        ),
        # behind `tailscale serve` the public port is 8400 unless set, as the daemon plans it
        (
            {"mode": "serve", "port": "9000", "public_name": "h.t.ts.net"},
            "https://h.t.ts.net:8400/oauth/callback",
        ),
    ],
)
def test_redirect_uri_matches_the_daemon_plan(
    server: dict[str, str], redirect: str, tmp_path: Path
) -> None:
    env = {f"AGENTD_SERVER_{key.upper()}": value for key, value in server.items()}
    config = load_config(tmp_path / "absent.toml", env={"HOME": str(tmp_path), **env})
    problems = [p for p in config.problems if p.message != "no such file"]
    assert problems == []
    assert redirect_uri(config) == redirect


def test_config_check_ok(cli: AgentdInstance) -> None:
    result = cli.run("config", "check")
    assert result.returncode == 0
    catalog = cli.config_home / "agent" / "providers.toml"
    assert result.stdout.splitlines() == [
        f"configuration OK: {cli.config_file}",
        f"providers OK: {catalog}",
    ]


def test_a_deprecated_key_warns_in_config_check_and_stops_nothing(cli: AgentdInstance) -> None:
    """``[client] api_base_url`` is no longer read: an old file keeps working, with a warning
    (even a value that was never a valid URL)."""
    text = cli.config_file.read_text(encoding="utf-8")
    cli.config_file.write_text(
        text.replace("[client]\n", '[client]\napi_base_url = "localhost:8400"\n'), encoding="utf-8"
    )
    check = cli.run("config", "check")
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("configuration OK:")
    assert check.stderr.splitlines() == [
        f"warning: {cli.config_file}: client.api_base_url: is deprecated and ignored (hint: no"
        " longer used: the CLI reaches the daemon on its unix socket and the bot runs inside it;"
        " remove the key)"
    ]
    show = cli.run("config", "show")
    assert show.returncode == 0, show.stderr
    assert '# client.api_base_url = "localhost:8400"  (is deprecated and ignored: ' in show.stdout
    assert cli.run("providers").returncode == 0


def test_config_show_is_toml_with_the_redirect_uri_first_and_derived_values_marked(
    cli: AgentdInstance,
) -> None:
    result = cli.run("config", "show", env=cli.env(AGENTD_TIMER_CODE_TTL="120"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:3] == [
        "# redirect URI to register at every provider, byte for byte:",
        f"#   {cli.redirect_uri}",
    ]
    values = tomllib.loads(result.stdout)  # valid TOML: the values agentd runs with
    server = values["server"]
    assert server["redirect_uri"] == cli.redirect_uri
    assert server["public_port"] == cli.daemon_port
    assert values["client"] == {"ca_file": str(cli.ca_file)}  # api_base_url: no longer a key
    assert values["timer"]["code_ttl"] == 120.0
    assert server["api_token"] == "********"  # generated by the daemon: masked, never shown
    marks = {line.split(" = ")[0]: line for line in lines if " = " in line}
    assert marks["redirect_uri"].endswith(
        "# derived: https://<public_name>:<public_port>/oauth/callback"
    )
    assert "# derived: server.port" in marks["public_port"]
    assert "# derived: generated, in " in marks["api_token"]
    assert marks["code_ttl"].endswith("# from $AGENTD_TIMER_CODE_TTL")
    assert marks["port"] == f"port = {cli.daemon_port}"  # set in the file: no mark
    token = (cli.state_dir / "api-token").read_text().strip()
    assert token not in result.stdout


def test_config_show_of_a_broken_file_shows_what_the_file_says(cli: AgentdInstance) -> None:
    broken = cli.root / "broken-show.toml"
    broken.write_text(
        '[server]\nport = "8400x"\npublic_name = "localhost"\ncolour = "blue"\n'
        '[telegram]\nbot_token = "123:secret-bot-token"\n',
        encoding="utf-8",
    )
    result = cli.run("config", "show", env=cli.env(AGENTD_CONFIG=str(broken)))
    assert result.returncode == 2
    marks = {line.split(" = ")[0]: line for line in result.stdout.splitlines() if " = " in line}
    assert marks["port"] == 'port = "8400x"  # error: must be a whole number'
    assert '# server.colour = "blue"  (unknown key)' in result.stdout
    assert "redirect URI to register: unknown until the problems are fixed" in result.stdout
    assert "derived:" not in result.stdout  # nothing is derived from a broken file
    assert "8400\n" not in result.stdout
    assert "secret-bot-token" not in result.stdout + result.stderr
    assert tomllib.loads(result.stdout)["server"]["port"] == "8400x"


def test_config_check_and_providers_list_every_catalog_problem(
    cli: AgentdInstance, tmp_path: Path
) -> None:
    config_home = tmp_path / "config"
    (config_home / "agent").mkdir(parents=True)
    (config_home / "agent" / "providers.toml").write_text(
        '[providers.dexcom]\nuse_pkce = "yes"\nscopez = []\n\n'
        '[providers.myapp]\nname = "My App"\nauthorize_url = "ftp://x"\n',
        encoding="utf-8",
    )
    env = cli.env(XDG_CONFIG_HOME=str(config_home))
    for args in (("config", "check"), ("providers",)):
        result = cli.run(*args, env=env)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        keys = {re.match(r"error: \S+providers\.toml: (\S+):", line).group(1) for line in errors}  # type: ignore[union-attr]
        assert keys == {
            "providers.dexcom.use_pkce",
            "providers.dexcom.scopez",
            "providers.myapp.authorize_url",
            "providers.myapp.token_url",
        }, result.stderr
        assert all("(hint: " in line for line in errors)
        assert "did you mean 'scopes'?" in result.stderr
        assert "4 problem(s)" in result.stderr


def test_config_check_reports_every_problem(cli: AgentdInstance) -> None:
    broken = cli.root / "broken.toml"
    broken.write_text(
        """
[server]
mode = "bogus"
port = 70000
cert_file = "/nonexistent/cert.pem"
colour = "blue"

[timer]
interval = -1

[telegram]
bot_token = "123:abc"

[client]
ca_file = "/nonexistent/ca.pem"
""",
        encoding="utf-8",
    )
    env = cli.env(AGENTD_CONFIG=str(broken), AGENTD_TIMER_CODE_TTL="soon")
    result = cli.run("config", "check", env=env)
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = {
        "server.mode",
        "server.port",
        "server.cert_file",
        "server.key_file",
        "server.colour",
        "timer.interval",
        "timer.code_ttl",
        "telegram.api_id",
        "telegram.api_hash",
        "telegram.owner_ids",
        "client.ca_file",
    }
    keys = set()
    for line in problems:
        match = re.match(r"error: (\S+): (\S+): .+ \(hint: .+\)$", line)
        assert match, line
        where, key = match.groups()
        assert where == ("$AGENTD_TIMER_CODE_TTL" if key == "timer.code_ttl" else str(broken))
        keys.add(key)
    assert keys == expected
    assert f"{len(problems)} problem(s)" in result.stderr
    assert "123:abc" not in result.stderr + result.stdout
    shown = cli.run("config", "show", env=env)
    assert shown.returncode == 2  # shown, but the problems still count
    assert tomllib.loads(shown.stdout)["telegram"]["bot_token"] == "********"
    assert "123:abc" not in shown.stdout + shown.stderr
    # every other command refuses to run on a broken configuration
    status = cli.run("status", env=env)
    assert status.returncode == 2
    assert "agentd config check" in status.stderr


def test_config_check_named_file_must_exist(cli: AgentdInstance) -> None:
    missing = cli.root / "missing.toml"
    result = cli.run("config", "check", env=cli.env(AGENTD_CONFIG=str(missing)))
    assert result.returncode == 2
    assert f"error: {missing}: -: no such file (hint: " in result.stderr
    explicit = cli.run("--config", str(missing), "status")
    assert explicit.returncode == 2
    assert "no such file" in explicit.stderr


def test_usage_errors_exit_2(cli: AgentdInstance) -> None:
    assert cli.run().returncode == 2
    assert cli.run("frobnicate").returncode == 2
    assert cli.run("diagram", "--format", "png").returncode == 2
    bad_state = cli.run("flows", "--state", "bogus")
    assert bad_state.returncode == 2
    assert "awaiting_code" in bad_state.stderr  # the valid choices


def test_serve_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    # its own installation: one state dir serves one daemon (its local socket is taken)
    other = AgentdInstance(tmp_path / "sigint")
    other.write_config()
    second = DaemonProcess(other, name="sigint")
    try:
        second.wait_healthy()
    finally:
        code = second.stop(signum=signal.SIGINT)
    assert code == 0
    log = second.log()
    assert "received SIGINT: shutting down" in log
    assert log.rstrip().endswith("stopped")
    assert "Traceback" not in log


def test_second_serve_on_the_same_port_exits_2(cli: AgentdInstance) -> None:
    result = cli.run("serve", timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{cli.daemon_port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_serve_on_the_same_state_dir_exits_2(cli: AgentdInstance) -> None:
    """Another port, the same state dir: its local socket belongs to the running daemon."""
    result = cli.run("serve", timeout=30, env=cli.env(AGENTD_SERVER_PORT=str(free_port())))
    assert result.returncode == 2
    assert "agentd.sock is in use (another agentd serve with this state dir?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (cli.state_dir / "agentd.sock").is_socket()  # the running daemon keeps it


# ------------------------------------------------------------------ --json shapes

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "json"


def validate(name: str, stdout: str) -> dict[str, Any]:
    import jsonschema

    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(stdout)
    jsonschema.Draft202012Validator(schema).validate(data)
    return data  # type: ignore[no-any-return]


def test_json_outputs_match_their_documented_schemas(cli: AgentdInstance) -> None:
    ensure_connected(cli)
    status = validate("status", cli.run("status", "--json").stdout)
    sock = str(cli.state_dir / "agentd.sock")
    assert status["daemon"] == {"reachable": True, "socket": sock, "error": None}
    (dexcom,) = [c for c in status["connections"] if c["provider"] == "dexcom"]
    assert dexcom["state"] == "stored"
    assert dexcom["scopes"] == ["offline_access"]
    assert dexcom["scope_source"] == "requested"

    flows = validate("flows", cli.run("flows", "--json", "--limit", "5").stdout)
    assert 1 <= len(flows["flows"]) <= 5
    assert flows["flows"][0]["created_at"] >= flows["flows"][-1]["created_at"]

    flow = validate("flow", cli.run("flow", dexcom["flow_id"], "--json").stdout)
    assert flow["flow"]["id"] == dexcom["flow_id"]
    assert [e["to"] for e in flow["events"]][:2] == ["initiated", "awaiting_code"]
    assert flow["granted"] == {"scopes": ["offline_access"], "source": "requested"}

    listing = validate("providers", cli.run("providers", "--json").stdout)
    by_id = {p["id"]: p for p in listing["providers"]}
    assert by_id["dexcom"]["credentials_stored"] is True
    assert by_id["oura"]["credentials_stored"] is False
    detail = validate("providers", cli.run("providers", "withings", "--json").stdout)
    assert detail["provider"]["token_params"] == {"action": "requesttoken"}
    assert detail["provider"]["unverified"] == ["envelope_reauthorize"]
    outputs = [cli.run(*a, "--json").stdout for a in (("status",), ("flows",), ("providers",))]
    assert_no_secrets(*outputs)


def test_status_json_when_the_daemon_is_down(cli: AgentdInstance, tmp_path: Path) -> None:
    elsewhere = tmp_path / "state"  # a state dir no daemon serves
    elsewhere.mkdir()
    env = cli.env(AGENTD_PATHS_STATE_DIR=str(elsewhere))
    status = validate("status", cli.run("status", "--json", env=env).stdout)
    sock = elsewhere / "agentd.sock"
    assert status["daemon"] == {"reachable": False, "socket": str(sock), "error": "no socket"}
    table = cli.run("status", env=env)
    assert table.returncode == 0
    assert table.stdout.splitlines()[-1].startswith(
        f"daemon: not running (no socket at {sock}): tokens are refreshed only when asked for"
    )
    # a socket a dead daemon left behind: nobody accepts on it
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))
        status = validate("status", cli.run("status", "--json", env=env).stdout)
    assert status["daemon"]["reachable"] is False
    assert status["daemon"]["error"] == "ConnectError"


# ------------------------------------------------------------ serve: shutdown


def test_serve_stops_cleanly_on_sigterm(cli: AgentdInstance, daemon: DaemonProcess) -> None:
    # a terminal connect is long-polling the daemon while it stops
    before = flows_by_state(cli)
    # its own deadline leaves the daemon ample time to stop, also on a loaded machine
    process = cli.popen("connect", "dexcom", "--no-qr", "--timeout", "12")
    assert process.stdout is not None
    assert process.stderr is not None
    out = LineReader(process.stdout)
    err = LineReader(process.stderr)
    try:
        try:
            out.wait_for(lambda text: "/v2/oauth2/login?" in text)
        except EOFError as error:
            raise AssertionError(err.rest()) from error
        time.sleep(0.5)  # the long-poll is in flight
        assert daemon.stop(timeout=60) == 0
        returncode = process.wait(90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        stderr = err.rest()
        out.rest()
        process.stdout.close()
        process.stderr.close()
    # the poller gives up at its deadline and cancels its flow (the ledger is the CLI's too)
    assert returncode == 5, stderr
    assert "the daemon could not be reached" in stderr
    after = flows_by_state(cli)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after.get("awaiting_code", 0) == before.get("awaiting_code", 0)
    log = daemon.log()
    assert "received SIGTERM: shutting down" in log
    assert log.rstrip().endswith("stopped")
    assert "Traceback" not in log
    assert "ERROR" not in log
    assert_no_secrets(log)
