"""Fixtures of the real-tailnet suite: one tailnet per session, agentd daemons on its nodes.

The session's tailnet (tests/tailnet/harness.py): Tailscale's test control server, DERP and
STUN on 127.0.0.1, and four real ``tailscaled`` nodes in userspace-networking mode, each its
own user:

- ``agentd-host`` (tagged ``tag:server``): runs ``agentd serve``;
- ``owner-laptop``: the owner's device; its login is the one ``allowed_logins`` names;
- ``guest-phone``: another user of the tailnet;
- ``ci-runner`` (tagged ``tag:ci``): a tagged device.

Without the binaries (``make tailnet`` builds them with Go) the suite is skipped with the
reason; under CI (the CI variable set) it fails instead: CI must run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    SimServer,
    agentd_command,
    dexcom_sim,
)
from tests.conftest import real_peer_missing

from .harness import BIN_DIR, Node, Tailnet, missing_binaries

NODES = {
    "agentd-host": ("tag:server",),
    "owner-laptop": (),
    "guest-phone": (),
    "ci-runner": ("tag:ci",),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(name="tailnet", scope="session")
def _tailnet() -> Iterator[Tailnet]:
    missing = missing_binaries()
    if missing:
        reason = real_peer_missing(
            "tailscaled",
            f"{', '.join(missing)} not in {BIN_DIR}: `make tailnet` builds them, which needs"
            " Go >= 1.26 and the Go module proxy",
        )
        if in_ci():
            pytest.fail(reason + " (CI must run this suite)", pytrace=False)
        pytest.skip(reason)
    with Tailnet(NODES) as tailnet:
        yield tailnet


class AgentdOnNode:
    """``agentd serve`` on a tailnet node: its own state, a trustme certificate for the node's
    MagicDNS name (testcontrol issues none), tailscaled's real LocalAPI socket."""

    def __init__(
        self,
        root: Path,
        node: Node,
        *,
        mode: str = "tls",
        allowed_logins: tuple[str, ...] = (),
        extra_server: str = "",
        extra: str = "",
        sim: bool = False,
    ) -> None:
        self.node = node
        self.instance = AgentdInstance(root)
        self.port = self.instance.daemon_port
        self.sim: SimServer | None = None
        if sim:
            # the provider ("the internet"): simulated Dexcom on localhost, test-CA TLS
            self.sim = dexcom_sim(
                self.instance, redirect_uri=f"https://{node.dns_name}:{self.port}/oauth/callback"
            )
            self.sim.start()
            self.instance.write_catalog(self.sim.base_url)
        leaf = self.instance.ca.issue_cert(node.dns_name)
        self.cert_file = root / "tls" / "node-cert.pem"
        self.key_file = root / "tls" / "node-key.pem"
        leaf.private_key_pem.write_to_path(str(self.key_file))
        for i, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(str(self.cert_file), append=i > 0)
        logins = ", ".join(f'"{login}"' for login in allowed_logins)
        tls = (
            f'cert_file = "{self.cert_file}"\nkey_file = "{self.key_file}"' if mode == "tls" else ""
        )
        self.instance.config_file.write_text(
            f"""
[server]
mode = "{mode}"
port = {self.port}
{tls}
allowed_logins = [{logins}]
localapi_socket = "{node.socket}"
{extra_server}

[client]
ca_file = "{self.instance.ca_file}"

[paths]
state_dir = "{self.instance.state_dir}"
auth_file = "{self.instance.auth_file}"

{extra}
""",
            encoding="utf-8",
        )
        self.log_file = root / "daemon.log"
        self._log = self.log_file.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [*agentd_command(), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.instance.env(),
            cwd=root,
        )

    @property
    def url(self) -> str:
        return f"https://{self.node.dns_name}:{self.port}"

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8")

    def wait_running(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "running: " not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"agentd serve exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agentd serve did not start:\n{self.log()}")
            time.sleep(0.05)

    def browser(self, node: Node) -> httpx.Client:
        """``node``'s browser: through its tailscaled, trusting the test CA."""
        return node.client(verify=self.instance.ssl_context())

    def store_credentials(self) -> None:
        result = self.instance.run(
            "credentials", "dexcom", "--client-id", SIM_CLIENT_ID, "--secret-stdin",
            input=SIM_CLIENT_SECRET + "\n",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    def stop(self) -> None:
        """The daemon first (it holds keep-alive connections to the sim), then the sim."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        if self.sim is not None:
            self.sim.stop()


@pytest.fixture(name="start_agentd")
def _start_agentd(
    tailnet: Tailnet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., AgentdOnNode]]:
    """Start ``agentd serve`` on agentd-host; stopped (by PID) after the test."""
    started: list[AgentdOnNode] = []

    def start(**options: object) -> AgentdOnNode:
        daemon = AgentdOnNode(
            tmp_path_factory.mktemp("agentd-node"),
            tailnet["agentd-host"],
            **options,  # type: ignore[arg-type]
        )
        started.append(daemon)
        daemon.wait_running()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
