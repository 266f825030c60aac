"""Crash rig: a real agentd installation, a rotating provider, and SIGKILL at named steps.

Used by tests/flowengine/test_vault_crash.py and benchmarks/bench_vault.py.

The provider is the project's simulated Dexcom (strict rotation: a used refresh token is
dead) served by Hypercorn over TLS in a thread, wrapped in :class:`HoldingApp`, which can
keep one token answer back after the provider issued it ("the provider holds the answer").
The client is the real ``agentd token`` command in a subprocess. Kill points inside the
client are deterministic: with ``AGENTD_TEST_STOP_AT=<point>`` the process stops itself
(SIGSTOP) at that step, the rig sees it stop (``waitpid(WUNTRACED)``) and sends SIGKILL.

Run as a script, this module is the helper process of the rig::

    python -m tests.flowengine.crash_rig connect CONFIG         # a whole connect
    python -m tests.flowengine.crash_rig token CONFIG PROVIDER GO_FILE
        # open everything, print "ready", wait for GO_FILE, then get_token and print it
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    agentd_command,
    dexcom_sim,
)

REPO = Path(__file__).resolve().parents[2]
HOLD = "provider.hold"

#: the kill points of a refresh, in order: (label, where the process is stopped)
REFRESH_POINTS: tuple[tuple[str, str], ...] = (
    ("before the request (intent durable)", "refresh.intent"),
    ("while the provider holds the answer", HOLD),
    ("right after the answer arrived (captured)", "refresh.answer"),
    ("during the vault write (half written)", "refresh.vault_write"),
    ("after the vault write, before the ledger", "refresh.stored"),
    ("during publishing (temp file, no rename)", "publish.rename"),
)
EXCHANGE_POINT = ("connect: right after the exchange answer", "exchange.answer")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class HoldingApp:
    """ASGI middleware: when armed, the next token answer is issued and then held back."""

    def __init__(self, app: Any, path: str = "/v2/oauth2/token") -> None:
        self.app = app
        self.path = path
        self.armed = False
        self.holding = threading.Event()
        self.release = threading.Event()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or not self.armed:
            await self.app(scope, receive, send)
            return
        self.armed = False
        held: list[Message] = []

        async def keep(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, keep)  # the provider rotated and answered
        self.holding.set()
        await asyncio.to_thread(self.release.wait, 120)
        try:
            for message in held:
                await send(message)
        except Exception:  # noqa: BLE001 - the client is dead: the answer is lost
            return


def wait_stopped(process: subprocess.Popen[str], timeout: float = 60) -> None:
    """Block until the child stopped itself (SIGSTOP); fail if it exited instead."""
    result: dict[str, int] = {}

    def waiter() -> None:
        result["status"] = os.waitpid(process.pid, os.WUNTRACED)[1]

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        process.kill()
        raise TimeoutError("the process never reached its stop point")
    status = result["status"]
    if not os.WIFSTOPPED(status):
        process.returncode = os.waitstatus_to_exitcode(status)
        out, err = process.communicate()
        raise AssertionError(f"exited ({process.returncode}) before its stop point: {err}")


@dataclass
class Verdict:
    point: str
    lost: bool
    detail: str = ""


@dataclass
class CrashRig:
    """One installation + one rotating provider; ``connected`` once, then kill at will.

    The provider is the simulated Dexcom; subclasses bring another one by overriding
    ``start_provider``, ``connected``, ``works_at_provider``, ``refreshes`` and ``close``.
    """

    root: Path
    access_ttl: int = 7200
    state_dir: Path | None = None
    auth_file: Path | None = None
    provider: str = "dexcom"
    instance: AgentdInstance = field(init=False)
    holder: Any = field(init=False)

    def __post_init__(self) -> None:
        self.instance = AgentdInstance(self.root)
        self.instance.write_config(interval=3600)
        config = self.instance.config_file.read_text()
        if self.state_dir is not None:
            config = config.replace(str(self.instance.state_dir), str(self.state_dir))
            self.instance.state_dir = self.state_dir
        if self.auth_file is not None:
            config = config.replace(str(self.instance.auth_file), str(self.auth_file))
            self.instance.auth_file = self.auth_file
        self.instance.config_file.write_text(config)
        self.start_provider()

    def start_provider(self) -> None:
        self.server = dexcom_sim(self.instance, access_ttl=self.access_ttl)
        self.holder = HoldingApp(self.server.app)
        self.server.app = self.holder
        self.server.start()
        self.instance.write_catalog(self.server.base_url)
        self.store_credentials(SIM_CLIENT_ID, SIM_CLIENT_SECRET)

    def store_credentials(self, client_id: str, secret: str) -> None:
        stored = self.instance.run(
            "credentials", self.provider, "--client-id", client_id, "--secret-stdin",
            input=secret + "\n",
        )  # fmt: skip
        assert stored.returncode == 0, stored.stderr

    def close(self) -> None:
        self.holder.release.set()
        self.server.stop()

    # ----------------------------------------------------------------- processes

    def env(self, **extra: str) -> dict[str, str]:
        return self.instance.env(PYTHONPATH=str(REPO), **extra)

    def helper(self, *args: str, stop_at: str | None = None) -> subprocess.Popen[str]:
        env = self.env(**({"AGENTD_TEST_STOP_AT": stop_at} if stop_at else {}))
        return subprocess.Popen(
            [sys.executable, "-m", "tests.flowengine.crash_rig", *args],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def token_process(self, stop_at: str | None = None) -> subprocess.Popen[str]:
        env = self.env(**({"AGENTD_TEST_STOP_AT": stop_at} if stop_at else {}))
        return subprocess.Popen(
            [*agentd_command(), "token", self.provider],
            env=env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def token(self) -> subprocess.CompletedProcess[str]:
        return self.instance.run("token", self.provider, env=self.env())

    def connect(self, stop_at: str | None = None) -> subprocess.Popen[str]:
        return self.helper("connect", str(self.instance.config_file), stop_at=stop_at)

    def connected(self) -> None:
        process = self.connect()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err

    # -------------------------------------------------------------------- state

    def make_due(self) -> None:
        """The stored access token expired: the next ``agentd token`` must refresh."""
        now = int(time.time() * 1000)
        self.instance.edit_vault(
            self.provider, expires=now - 1000, obtained_at=now - 1000 - self.access_ttl * 1000
        )

    def refreshes(self) -> int:
        return int(self.server.sim.counters.token_requests["refresh_token"])

    def works_at_provider(self, access: str) -> bool:
        with httpx.Client(verify=self.instance.ssl_context(), timeout=10) as client:
            response = client.get(
                f"{self.server.base_url}/v3/users/self/devices",
                headers={"Authorization": f"Bearer {access}"},
            )
        return response.status_code == 200

    def orphans(self) -> list[str]:
        target = Path(os.path.realpath(self.instance.auth_file))
        return [p.name for p in target.parent.glob(f".{target.name}.*.tmp")]

    # --------------------------------------------------------------------- kills

    def kill_at(self, stop_at: str) -> None:
        """Start ``agentd token <provider>`` (a refresh is due); SIGKILL it at ``stop_at``."""
        if stop_at == HOLD:
            self.holder.holding.clear()
            self.holder.release.clear()
            self.holder.armed = True
            process = self.token_process()
            if not self.holder.holding.wait(60):
                process.kill()
                raise TimeoutError("the refresh never reached the provider")
            process.kill()
            process.wait(30)
            self.holder.release.set()  # the answer goes to a dead socket
        else:
            process = self.token_process(stop_at)
            wait_stopped(process)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
        assert process.returncode == -signal.SIGKILL
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def kill_connect_at(self, stop_at: str) -> None:
        process = self.connect(stop_at)
        wait_stopped(process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def judge(self, point: str) -> Verdict:
        """After a kill: does the connection live on (recovery, a token, a new refresh)?"""
        first = self.token()
        if first.returncode != 0:
            why = (first.stderr.strip().splitlines() or [""])[-1]
            return Verdict(point, True, f"exit {first.returncode}: {why}")
        access = first.stdout.strip()
        if not self.works_at_provider(access):
            return Verdict(point, True, "the token printed after recovery is refused")
        if self.orphans():
            return Verdict(point, True, f"temp files left: {self.orphans()}")
        entry = self.instance.auth_entries().get(self.provider, {})
        if entry.get("access") != access:
            return Verdict(point, True, "auth.json does not show the vault's pair")
        # the refresh token is alive: one more refresh goes through
        self.make_due()
        again = self.token()
        if again.returncode != 0 or again.stdout.strip() == access:
            return Verdict(point, True, f"the next refresh failed: {again.stderr.strip()}")
        return Verdict(point, False, "connection kept")


# -------------------------------------------------------------- helper process


async def _connect(config_file: str) -> None:
    from agentd.config import load_config
    from agentd.context import open_context, redirect_uri
    from flowengine.protocol import parse_callback

    config = load_config(config_file)
    async with httpx.AsyncClient(timeout=20) as http, open_context(config, http=http) as ctx:
        target = redirect_uri(config)
        start = await ctx.broker.begin("dexcom", redirect_uri=target, actor="cli")
        answer = await http.get(start.authorize_url)
        location = answer.headers["location"]
        query = parse_qs(urlsplit(location).query)
        await ctx.engine.record_callback(parse_callback(query), actor="api")
        await ctx.broker.complete_state(start.state, actor="cli")


async def _token_after_go(config_file: str, provider: str, go: str) -> str:
    from agentd.config import load_config
    from agentd.context import open_context

    config = load_config(config_file)
    async with open_context(config) as ctx:
        print("ready", flush=True)
        # a start barrier: every process sends its request at the same moment
        while not os.path.exists(go):  # noqa: ASYNC240
            await asyncio.sleep(0.001)
        return await ctx.broker.get_token(provider, actor="cli")


def as_table(verdicts: list[Verdict]) -> str:
    """The kill-point table: point, lost (0/1), what happened."""
    width = max(len(v.point) for v in verdicts)
    lines = [f"{'kill point'.ljust(width)}  lost  outcome"]
    for v in verdicts:
        lines.append(f"{v.point.ljust(width)}  {int(v.lost):>4}  {v.detail}")
    return "\n".join(lines)


def dump(verdicts: list[Verdict]) -> str:
    return json.dumps([v.__dict__ for v in verdicts])


def main(argv: list[str]) -> int:
    import anyio

    if argv[0] == "connect":
        anyio.run(_connect, argv[1])
        return 0
    if argv[0] == "token":
        print(anyio.run(_token_after_go, argv[1], argv[2], argv[3]), flush=True)
        return 0
    raise SystemExit(f"unknown mode {argv[0]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
