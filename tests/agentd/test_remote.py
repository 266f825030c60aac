"""Tokens for other machines, end to end: a real ``agentd serve`` (TLS, userspace networking
as tailscaled reports it through the fake LocalAPI), ``agentd token --from`` and ``agentd
audit`` as subprocesses, SIGHUP reloading the [[access]] policy.

The fake LocalAPI names every loopback caller the tagged device ``ci-runner`` (tag:ci), as
tailscaled's ProxyMapper would when only that peer calls. The "remote machine" is a CLI
environment of its own: an empty home, a config with nothing but the CA to trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot import texts
from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    DaemonProcess,
    SimServer,
    agentd_command,
    dexcom_sim,
    free_port,
)
from tests.api.fake_tailscale import DOMAIN, FakeTailnet, LocalAPIThread, status_json

CI_IP = "100.90.1.4"
CI_NODE = f"peer-{CI_IP.replace('.', '-')}.tailnet-name.ts.net"
GRANT = '[[access]]\nwho = ["tag:ci"]\nproviders = ["dexcom", "oura", "strava", "whoop"]\n'


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Remote:
    """The daemon's installation and a second machine's CLI environment."""

    instance: AgentdInstance
    daemon: DaemonProcess
    sim: SimServer
    tailnet: FakeTailnet
    home: Path  # the second machine's home: must stay empty
    config: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.daemon.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AGENTD_", "AGENT_AUTH", "XDG_", "PYTHON", "SSL_CERT"))
        }
        env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_DATA_HOME=str(self.home / ".local" / "share"),
            XDG_STATE_HOME=str(self.home / ".local" / "state"),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            AGENTD_CONFIG=str(self.config),
            LC_ALL="C.UTF-8",
        )
        env.update(extra)
        return env

    def token(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``agentd token ...`` on the second machine (cwd: its empty home)."""
        return subprocess.run(
            [*agentd_command(), "token", *args],
            capture_output=True,
            text=True,
            env=self.env(**env),
            cwd=self.home,
            timeout=120,
            check=False,
        )


def write_daemon_config(instance: AgentdInstance, socket: Path, extra: str) -> None:
    instance.config_file.write_text(
        f"""
[server]
mode = "tls"
host = "127.0.0.1"
port = {instance.daemon_port}
public_name = "{DOMAIN}"
cert_file = "{instance.root / "node-cert.pem"}"
key_file = "{instance.root / "node-key.pem"}"
localapi_socket = "{socket}"

[timer]
interval = 600

[remote]
rate = 1000
burst = 1000

[client]
ca_file = "{instance.ca_file}"

[paths]
state_dir = "{instance.state_dir}"
auth_file = "{instance.auth_file}"

{extra}
""",
        encoding="utf-8",
    )


def seed_tokens(instance: AgentdInstance) -> dict[str, str]:
    """Tokens the daemon takes over from auth.json: a valid dexcom pair; expired ones for
    strava (the sim refuses its refresh token) and whoop (its token endpoint is closed)."""
    soon, gone = now_ms() + 3_600_000, now_ms() - 1000
    entries: dict[str, dict[str, Any]] = {
        "dexcom": {"access": "dexcom-access-remote-1", "refresh": "r1", "expires": soon},
        "strava": {"access": "strava-access-old", "refresh": "not-at-the-sim", "expires": gone},
        "whoop": {"access": "whoop-access-old", "refresh": "r3", "expires": gone},
    }
    instance.auth_file.write_text(json.dumps(entries), encoding="utf-8")
    instance.auth_file.chmod(0o600)
    return {name: entry["access"] for name, entry in entries.items()}


@pytest.fixture(name="remote", scope="module")
def _remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    root = tmp_path_factory.mktemp("remote")
    instance = AgentdInstance(root / "daemon")
    leaf = instance.ca.issue_cert(DOMAIN, "localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(instance.root / "node-key.pem"))
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(instance.root / "node-cert.pem"), append=i > 0)
    sim = dexcom_sim(
        instance, redirect_uri=f"https://{DOMAIN}:{instance.daemon_port}/oauth/callback"
    )
    sim.start()
    tailnet = FakeTailnet(status=status_json(tun=False))  # userspace networking
    tailnet.add_peer(CI_IP, "tagged-devices", tags=("tag:ci",))
    tailnet.loopback_peer = CI_IP
    with contextlib.ExitStack() as stack:
        stack.callback(sim.stop)
        short = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ts")))
        localapi = LocalAPIThread(tailnet, short / "tailscaled.sock").start()
        stack.callback(localapi.stop)
        instance.write_catalog(
            sim.base_url,
            extra=f"""
[providers.strava]
token_url = "{sim.base_url}/v2/oauth2/token"

[providers.whoop]
token_url = "https://localhost:{free_port()}/token"
""",
        )
        write_daemon_config(instance, localapi.socket_path, GRANT)
        for provider in ("dexcom", "strava", "whoop"):
            stored = instance.run(
                "credentials", provider, "--client-id", SIM_CLIENT_ID, "--secret-stdin",
                input=SIM_CLIENT_SECRET + "\n",
            )  # fmt: skip
            assert stored.returncode == 0, stored.stderr
        seed_tokens(instance)
        home = root / "second-machine"
        home.mkdir()
        config = root / "second-machine.toml"
        config.write_text(f'[client]\nca_file = "{instance.ca_file}"\n', encoding="utf-8")
        daemon = DaemonProcess(instance)
        stack.callback(daemon.stop)
        daemon.wait_healthy()
        yield Remote(instance, daemon, sim, tailnet, home, config)


def validate_audit(stdout: str) -> dict[str, Any]:
    """``agentd audit --json`` against docs/json/audit.schema.json."""
    import jsonschema

    schema_file = Path(__file__).resolve().parents[2] / "docs" / "json" / "audit.schema.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(stdout)
    jsonschema.Draft202012Validator(schema).validate(data)
    return data  # type: ignore[no-any-return]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_tagged_machine_gets_a_token_and_writes_nothing(remote: Remote) -> None:
    assert (
        "token hand-outs (/v1/tokens): tag:ci: dexcom, oura, strava, whoop" in remote.daemon.log()
    )
    result = remote.token("dexcom", "--from", remote.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "dexcom-access-remote-1\n"
    assert result.stderr == ""
    assert files_under(remote.home) == []  # no cache, no state, no auth.json on this machine
    # $AGENTD_URL instead of --from: the local fast path is not taken (no vault here anyway)
    again = remote.token("dexcom", AGENTD_URL=remote.url)
    assert (again.returncode, again.stdout) == (0, "dexcom-access-remote-1\n"), again.stderr
    assert files_under(remote.home) == []


@pytest.mark.parametrize(
    ("provider", "code", "message"),
    [
        ("oura", 3, "oura is not connected on the daemon at"),
        ("strava", 4, "strava needs to be connected again"),
        ("whoop", 5, "whoop cannot be refreshed right now"),
        ("withings", 2, "tag:ci is not granted withings tokens"),
        ("nonexistent", 2, "is not granted nonexistent tokens"),
    ],
)
def test_exit_codes_as_for_a_local_token(
    remote: Remote, provider: str, code: int, message: str
) -> None:
    result = remote.token(provider, "--from", remote.url)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    assert message in line
    assert "Traceback" not in result.stderr


def test_reconnect_hint_and_retry_after_reach_the_terminal(remote: Remote) -> None:
    reconnect = remote.token("strava", "--from", remote.url)
    assert "agentd connect strava" in reconnect.stderr
    down = remote.token("whoop", "--from", remote.url)
    assert re.search(r"retry in \d+ s", down.stderr), down.stderr


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("http://127.0.0.1:8400", 2, "is not the daemon's address"),
        ("https://127.0.0.1:8400/v1", 2, "is not the daemon's address"),
        ("https://user:pw@127.0.0.1:8400", 2, "is not the daemon's address"),
        ("", 2, "is not the daemon's address"),
        ("https://127.0.0.1:99999", 2, "is not the daemon's address"),
    ],
)
def test_a_bad_address_is_a_usage_error(remote: Remote, url: str, code: int, message: str) -> None:
    result = remote.token("dexcom", "--from", url)
    assert result.returncode == code
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_an_unreachable_or_untrusted_daemon_is_unavailable(remote: Remote) -> None:
    closed = remote.token("dexcom", "--from", f"https://127.0.0.1:{free_port()}")
    assert closed.returncode == 5
    assert "could not be reached" in closed.stderr
    # without the daemon's CA: verification fails, the token never arrives
    result = remote.token("dexcom", "--from", remote.url, AGENTD_CLIENT_CA_FILE="")
    assert result.returncode == 5, result.stderr
    assert "TLS verification failed for 127.0.0.1" in result.stderr
    assert "dexcom-access" not in result.stdout + result.stderr


def test_audit_shows_the_hand_outs_and_the_owner_was_told_once(remote: Remote) -> None:
    for _ in range(2):
        assert remote.token("dexcom", "--from", remote.url).returncode == 0
    table = remote.instance.run("audit", "--provider", "dexcom")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["AT", "(UTC)", "WHO", "NODE", "ADDRESS", "PROVIDER", "TOKEN", "SHA"]
    assert len(lines) >= 3
    assert all(
        re.search(rf"tag:ci\s+{CI_NODE}\s+{CI_IP}\s+dexcom\s+[0-9a-f]{{8}}$", row)
        for row in lines[1:]
    )
    shown = validate_audit(remote.instance.run("audit", "--json", "--who", "tag:ci").stdout)
    assert shown["version"] == 1
    rows = shown["handouts"]
    assert {row["provider"] for row in rows} == {"dexcom"}
    assert rows == sorted(rows, key=lambda r: -r["id"])
    assert set(rows[0]) == {
        "id",
        "at",
        "who",
        "node",
        "provider",
        "token_sha",
        "address",
        "flow_id",
    }
    none = remote.instance.run("audit", "--who", "owner@example.com")
    assert "no token hand-outs recorded" in none.stdout
    with sqlite3.connect(remote.instance.state_dir / "ledger.sqlite3") as conn:
        rows_ = conn.execute(
            "SELECT provider, data FROM notifications WHERE kind = 'first_handout'"
        ).fetchall()
    # who got it, as the bot words the notification's data
    notes = [(provider, texts.handout_caller(json.loads(data))) for provider, data in rows_]
    assert notes == [("dexcom", f"tag:ci on {CI_NODE} ({CI_IP})")]
    # no token in the daemon's log or the audit's output
    log = remote.daemon.log()
    for text in (log, table.stdout, json.dumps(rows)):
        assert "dexcom-access-remote-1" not in text


def test_config_show_and_check_cover_the_policy(remote: Remote, tmp_path: Path) -> None:
    shown = remote.instance.run("config", "show")
    assert shown.returncode == 0, shown.stderr
    data = tomllib.loads(shown.stdout)  # config show is TOML that reads back
    assert data["access"] == [
        {"who": ["tag:ci"], "providers": ["dexcom", "oura", "strava", "whoop"]}
    ]
    assert data["remote"] == {
        "rate": 1000.0,
        "burst": 1000,
        "audit_days": 90.0,
        "audit_max_rows": 100000,
    }
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[access]]\nwho = ["tag:1ci", "owner"]\nproviders = ["dexcon"]\n'
        '[[access]]\nwho = ["tag:ci"]\nproviders = ["dexcon", "oura"]\n',
        encoding="utf-8",
    )
    env = remote.instance.env(AGENTD_CONFIG=str(bad))
    check = remote.instance.run("config", "check", env=env)
    assert check.returncode == 2
    errors = [line for line in check.stderr.splitlines() if line.startswith("error:")]
    assert [line.split(": ")[2] for line in errors] == [
        "access[1].who[1]",
        "access[1].who[2]",
        "access[2].providers[1]",
    ]
    assert "did you mean dexcom" in errors[2]
    # every command refuses such a file, as for any other configuration problem
    assert remote.instance.run("status", env=env).returncode == 2


# ------------------------------------------------------------------------ SIGHUP


def wait_for_line(daemon: DaemonProcess, pattern: str, seen: int, timeout: float = 60) -> str:
    """The first log line after the first ``seen`` lines that matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = daemon.log().splitlines()[seen:]
        for line in lines:
            if re.search(pattern, line):
                return line
        time.sleep(0.05)
    raise TimeoutError(f"no log line {pattern!r}:\n{daemon.log()}")


def test_sighup_reloads_the_policy(remote: Remote) -> None:
    instance, daemon = remote.instance, remote.daemon
    original = instance.config_file.read_text()
    try:
        assert remote.token("dexcom", "--from", remote.url).returncode == 0
        # the grant withdrawn, the rate changed, and a key that needs a restart
        changed = original.replace(GRANT, '[[access]]\nwho = ["tag:ci"]\nproviders = ["oura"]\n')
        changed = changed.replace("rate = 1000", "rate = 500").replace(
            "interval = 600", "interval = 300"
        )
        instance.config_file.write_text(changed, encoding="utf-8")
        seen = len(daemon.log().splitlines())
        os.kill(daemon.pid, signal.SIGHUP)
        line = wait_for_line(daemon, r"reload", seen)
        assert "reloaded" in line, line
        assert "withdrawn tag:ci: dexcom, strava, whoop" in line
        assert "remote.rate 1000 -> 500" in line
        assert "restart to apply timer.interval" in line
        refused = remote.token("dexcom", "--from", remote.url)
        assert refused.returncode == 2
        assert "not granted dexcom" in refused.stderr
        # a broken file is refused whole: the policy in force stays
        instance.config_file.write_text(changed + '\n[[access]]\nwho = ["nobody"]\n', "utf-8")
        seen = len(daemon.log().splitlines())
        os.kill(daemon.pid, signal.SIGHUP)
        line = wait_for_line(daemon, r"reload", seen)
        assert "refused" in line
        assert "access[2].who[1]" in line
        assert remote.token("oura", "--from", remote.url).returncode == 3  # still granted
        assert daemon.process.poll() is None
    finally:
        instance.config_file.write_text(original, encoding="utf-8")
        seen = len(daemon.log().splitlines())
        os.kill(daemon.pid, signal.SIGHUP)
        line = wait_for_line(daemon, r"reload", seen)
    assert "granted tag:ci: dexcom, strava, whoop" in line
    assert remote.token("dexcom", "--from", remote.url).returncode == 0
    assert "dexcom-access-remote-1" not in daemon.log()


def test_reload_changes_name_grants_values_and_keys_never_secrets(tmp_path: Path) -> None:
    from agentd.config import load_config
    from agentd.daemon import reload_changes

    def config(text: str) -> Any:
        path = tmp_path / "agentd.toml"
        path.write_text(text, encoding="utf-8")
        loaded = load_config(path, env={})
        assert not loaded.problems, loaded.problems
        return loaded

    telegram = 'api_id = 1\napi_hash = "h"\nowner_ids = [1]\n'
    old = config(
        f'[telegram]\nbot_token = "111:old-secret"\n{telegram}[remote]\nrate = 2\n'
        '[[access]]\nwho = ["tag:ci", "owner@example.com"]\nproviders = ["dexcom"]\n'
    )
    new = config(
        f'[telegram]\nbot_token = "111:new-secret"\n{telegram}[remote]\nrate = 5\nburst = 7\n'
        '[[access]]\nwho = ["tag:ci"]\nproviders = ["dexcom", "oura"]\n'
    )
    changes = reload_changes(old, new)
    assert changes == [
        "granted tag:ci: oura",
        "withdrawn owner@example.com: dexcom",
        "remote.rate 2 -> 5",
        "remote.burst 30 -> 7",
        "restart to apply telegram.bot_token",
    ]
    assert "secret" not in " ".join(changes)
    assert reload_changes(new, new) == []
