"""Tokens for agents on other machines, on a real tailnet: ``agentd token --from`` on the
tagged CI runner reaches ``agentd serve`` on agentd-host through the runner's own tailscaled
(its HTTP proxy, as a userspace-networking node's programs do), and the daemon names it
with the real whois. The [[access]] policy names ``tag:ci``; another user's phone is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agentd.cli_helpers import agentd_command

from .conftest import AgentdOnNode
from .harness import Node, Tailnet

pytestmark = pytest.mark.slow

Start = Callable[..., AgentdOnNode]
ACCESS = '[[access]]\nwho = ["tag:ci"]\nproviders = ["dexcom"]\n'
TOKEN = "dexcom-access-on-the-tailnet"


def token_from(node: Node, daemon: AgentdOnNode, home: Path) -> subprocess.CompletedProcess[str]:
    """``agentd token dexcom --from <daemon>`` run as a program of ``node``: its connections
    leave through that node's tailscaled; it trusts the daemon's CA and has nothing else."""
    home.mkdir(exist_ok=True)
    config = home.parent / f"{home.name}.toml"
    config.write_text(f'[client]\nca_file = "{daemon.instance.ca_file}"\n', encoding="utf-8")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(("AGENTD_", "XDG_", "SSL_"))
    }
    env.update(
        HOME=str(home),
        AGENTD_CONFIG=str(config),
        https_proxy=f"http://{node.http_proxy}",
        LC_ALL="C.UTF-8",
    )
    return subprocess.run(
        [*agentd_command(), "token", "dexcom", "--from", daemon.url],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=120,
        check=False,
    )


def test_a_tagged_runner_gets_a_token_and_another_user_does_not(
    tailnet: Tailnet, start_agentd: Start, tmp_path: Path
) -> None:
    runner, phone = tailnet["ci-runner"], tailnet["guest-phone"]
    daemon = start_agentd(mode="tls", allowed_logins=(tailnet["owner-laptop"].login,), extra=ACCESS)
    # tokens the daemon takes over from auth.json (no provider needed: still valid)
    expires = int(time.time() * 1000) + 3_600_000
    entry = {"dexcom": {"access": TOKEN, "refresh": "r", "expires": expires}}
    daemon.instance.auth_file.write_text(json.dumps(entry), encoding="utf-8")

    got = token_from(runner, daemon, tmp_path / "runner")
    assert got.returncode == 0, got.stderr + daemon.log()
    assert got.stdout == TOKEN + "\n"
    assert list((tmp_path / "runner").iterdir()) == []  # nothing on the runner's disk

    refused = token_from(phone, daemon, tmp_path / "phone")
    assert refused.returncode == 2, refused.stderr
    assert f"{phone.login} is not granted dexcom tokens" in refused.stderr
    assert refused.stdout == ""

    audit = daemon.instance.run("audit", "--json")
    assert audit.returncode == 0, audit.stderr
    (row,) = json.loads(audit.stdout)["handouts"]
    # the real whois named the runner: its tag, its MagicDNS name, its tailnet address
    assert (row["who"], row["node"], row["address"]) == ("tag:ci", runner.dns_name, runner.ip4)
    assert TOKEN not in daemon.log()
