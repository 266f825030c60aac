"""A test daemon and a simulated provider for the ``agentd`` CLI tests and benchmark.

:class:`SimServer` serves :func:`agentd.simoauth.create_sim_app` under Hypercorn over TLS
in a thread with its own event loop (tests reach its state with ``server.sim``).
:class:`AgentdInstance` is a temp directory with trustme certificates, an ``agentd.toml``, a
user catalog pointing ``dexcom`` at the sim, and an environment for CLI subprocesses.
:class:`DaemonProcess` runs ``agentd serve`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import platform
import pty
import queue
import select
import signal
import socket
import ssl
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import trustme
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from agentd.simoauth import SimOAuth, create_sim_app, get_sim
from flowengine.clock import SystemClock
from integrations import Simulator
from integrations.dexcom.sim import DexcomSim

__all__ = [
    "DaemonProcess",
    "LineReader",
    "SimServer",
    "AgentdInstance",
    "TerminalRun",
    "agentd_command",
    "dexcom_sim",
    "free_port",
    "run_in_terminal",
]

SIM_CLIENT_ID = "sim-client"
SIM_CLIENT_SECRET = "sim-secret-for-cli-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agentd_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m agentd.cli``."""
    script = Path(sys.executable).with_name("agentd")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "agentd.cli"]


class SimServer:
    """A simulated provider (Dexcom unless ``api`` says otherwise) over HTTPS on 127.0.0.1,
    in a background thread."""

    def __init__(
        self, cert_file: Path, key_file: Path, api: Simulator | None = None, **sim_options: Any
    ) -> None:
        self.api = api if api is not None else DexcomSim(clock=SystemClock())
        self.app = create_sim_app(api=self.api, **sim_options)
        self.sim: SimOAuth = get_sim(self.app)
        self.port = free_port()
        self.base_url = f"https://localhost:{self.port}"
        self._cert_file = cert_file
        self._key_file = key_file
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sim-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self._error = err
            self._started.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.certfile = str(self._cert_file)
        config.keyfile = str(self._key_file)
        config.accesslog = None
        config.errorlog = None
        self._loop.call_soon(self._started.set)
        await hypercorn_serve(self.app, config, shutdown_trigger=self._stop.wait)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise RuntimeError("the sim did not start") from self._error
        wait_until_listening(self.port)

    def stop(self) -> None:
        if self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def wait_until_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class AgentdInstance:
    """One isolated agentd installation: directories, certificates, config, environment."""

    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    daemon_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.config_home = self.home / "config"
        self.state_dir = self.root / "state"
        self.auth_file = self.root / "data" / "auth.json"
        for d in (self.home, self.config_home / "agent", self.state_dir, self.auth_file.parent):
            d.mkdir(parents=True, exist_ok=True)
        tls = self.root / "tls"
        tls.mkdir()
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = tls / "ca.pem"
        self.cert_file = tls / "cert.pem"
        self.key_file = tls / "key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        for i, pem in enumerate(cert.cert_chain_pems):
            pem.write_to_path(str(self.cert_file), append=i > 0)
        self.config_file = self.root / "agentd.toml"
        self.redirect_uri = f"https://localhost:{self.daemon_port}/oauth/callback"
        self.base_url = f"https://localhost:{self.daemon_port}"

    def write_config(self, *, interval: float = 1.0, extra: str = "") -> None:
        self.config_file.write_text(
            f"""
[server]
mode = "tls"
host = "127.0.0.1"
port = {self.daemon_port}
public_name = "localhost"
cert_file = "{self.cert_file}"
key_file = "{self.key_file}"
localapi_socket = "{self.root / "no-tailscaled.sock"}"

[timer]
interval = {interval}

[client]
ca_file = "{self.ca_file}"

[paths]
state_dir = "{self.state_dir}"
auth_file = "{self.auth_file}"
{extra}
""",
            encoding="utf-8",
        )

    def write_catalog(self, sim_base_url: str, *, extra: str = "") -> None:
        """Point the built-in ``dexcom`` entry at the simulated provider (``extra``: more
        of its fields, as TOML lines)."""
        (self.config_home / "agent" / "providers.toml").write_text(
            f"""
[providers.dexcom]
authorize_url = "{sim_base_url}/v2/oauth2/login"
token_url = "{sim_base_url}/v2/oauth2/token"
api_base_url = "{sim_base_url}"
revocation_url = "{sim_base_url}/v2/oauth2/revoke"
{extra}
""",
            encoding="utf-8",
        )

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of a CLI subprocess: isolated home, this config, the test CA."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AGENTD_", "AGENT_AUTH", "XDG_", "PYTHON", "SSL_CERT"))
            # a test run under systemd must not hand its service's sockets to a daemon
            and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
            and k != "STATE_DIRECTORY"
        }
        env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.config_home),
            XDG_DATA_HOME=str(self.home / "data"),
            XDG_STATE_HOME=str(self.home / "state"),
            XDG_CACHE_HOME=str(self.home / "cache"),
            AGENTD_CONFIG=str(self.config_file),
            # the provider's (sim's) certificate comes from the test CA too
            SSL_CERT_FILE=str(self.ca_file),
            LC_ALL="C.UTF-8",
            PYTHONIOENCODING="utf-8",
        )
        env.update(overrides)
        return env

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def browser(self) -> httpx.Client:
        """The user's browser: follows the provider's redirect to the daemon's callback."""
        return httpx.Client(verify=self.ssl_context(), follow_redirects=True, timeout=10)

    def run(
        self,
        *args: str,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        timeout: float = 120,
        env: dict[str, str] | None = None,
        python_args: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        command = (
            [sys.executable, *python_args, "-m", "agentd.cli"] if python_args else agentd_command()
        )
        return subprocess.run(
            [*command, *args],
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            env=env or self.env(),
            timeout=timeout,
            check=False,
            cwd=self.root,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*agentd_command(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=self.env(),
            cwd=self.root,
        )

    def auth_entries(self) -> dict[str, Any]:
        if not self.auth_file.exists():
            return {}
        data = json.loads(self.auth_file.read_text(encoding="utf-8"))
        assert isinstance(data, dict)
        return data

    def edit_vault(self, provider: str, **fields: Any) -> None:
        """Change fields of the provider's pair in the token vault (the source of truth)."""
        from dataclasses import replace

        from flowengine.vault import Vault, vault_root

        pv = Vault(vault_root(self.state_dir)).provider(provider)
        with pv.locked():
            record = pv.read()
            assert record is not None
            assert record.tokens is not None
            pv.write(
                replace(record.tokens, **fields),
                flow_id=record.flow_id,
                lineage=record.lineage,
                now_ms=int(time.time() * 1000),
            )

    def edit_auth(self, provider: str, **fields: Any) -> None:
        """Change fields of one auth.json entry, as the agent runtime or a user might."""
        data = self.auth_entries()
        data[provider].update(fields)
        tmp = self.auth_file.with_suffix(".edit")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.auth_file)


def dexcom_sim(
    instance: AgentdInstance, *, redirect_uri: str | None = None, **sim_options: Any
) -> SimServer:
    """The simulated Dexcom for ``instance`` (not started): it knows the sim client, allows
    the instance's redirect URI (or ``redirect_uri``) and approves consent by itself."""
    options: dict[str, Any] = {"consent": "allow", **sim_options}
    return SimServer(
        instance.cert_file,
        instance.key_file,
        clients={SIM_CLIENT_ID: SIM_CLIENT_SECRET},
        redirect_uris=[redirect_uri or instance.redirect_uri],
        **options,
    )


class LineReader:
    """Reads a stream line by line in a thread, so tests can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate: Any, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching line; seen:\n" + "".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError("stream closed; seen:\n" + "".join(self.lines))
            self.lines.append(line)
            if predicate(line):
                return line

    def rest(self, timeout: float = 60) -> str:
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


class DaemonProcess:
    """``agentd serve`` as a subprocess; its stderr (the log) goes to a file."""

    def __init__(
        self,
        instance: AgentdInstance,
        *,
        port: int | None = None,
        name: str = "daemon",
        verbose: bool = False,
        env: dict[str, str] | None = None,
        journald: bool = False,
    ) -> None:
        """``port``: listen there instead of the configured port (AGENTD_SERVER_PORT);
        ``verbose``: ``agentd -v serve`` (logs at DEBUG); ``env``: more variables;
        ``journald``: its log file stands for journald's stream ($JOURNAL_STREAM)."""
        self.instance = instance
        self.port = port or instance.daemon_port
        self.base_url = f"https://localhost:{self.port}"
        self.log_file = instance.root / f"{name}.log"
        self._log = self.log_file.open("w", encoding="utf-8")
        env = instance.env(**({"AGENTD_SERVER_PORT": str(port)} if port else {}), **(env or {}))
        if journald:
            st = os.fstat(self._log.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        self.process = subprocess.Popen(
            [*agentd_command(), *(["-v"] if verbose else []), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=instance.root,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8")

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until /healthz answers 200 and the daemon logged its start ("running: ..."): the
        listener comes up before the timer and the start-up lines, so both are awaited."""
        deadline = time.monotonic() + timeout
        healthy = False
        with httpx.Client(verify=self.instance.ssl_context(), timeout=10) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"agentd serve exited early:\n{self.log()}")
                if not healthy:
                    try:
                        healthy = client.get(f"{self.base_url}/healthz").status_code == 200
                    except httpx.HTTPError:
                        pass
                if healthy and " running: " in self.log():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"agentd serve did not become healthy:\n{self.log()}")
                time.sleep(0.1)

    def stop(self, timeout: float = 60, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self._log.close()


@dataclass
class TerminalRun:
    returncode: int
    output: str  # stdout and stderr as the terminal showed them


def _take_terminal() -> None:  # pragma: no cover - runs in the child
    # a session of its own with the pty as controlling terminal: Ctrl-C reaches it
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


_READ = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())


def _wait_reading(pid: int, deadline: float) -> None:
    """Until ``pid``'s main thread sleeps in read() on its terminal (a tty read waits in
    ``wait_woken``; /proc/<pid>/syscall names the call)."""
    while time.monotonic() < deadline:
        try:
            syscall = Path(f"/proc/{pid}/syscall").read_text().split()
            wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        except OSError:
            return  # gone, or no access: the reads below will tell
        if (syscall and syscall[0] == _READ) or wchan in ("wait_woken", "n_tty_read"):
            return
        time.sleep(0.005)


def run_in_terminal(
    command: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    steps: list[tuple[str, bytes]],
    timeout: float = 60,
) -> TerminalRun:
    """Run ``command`` on a pseudo-terminal, as a user at a shell would.

    ``steps``: (text to wait for in the output, bytes to type then), e.g. ``("client id:",
    b"\x04")`` for Ctrl-D at that prompt or ``b"\x03"`` for Ctrl-C.
    """
    master, slave = pty.openpty()
    process = subprocess.Popen(
        command,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_take_terminal,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout

    def read_some() -> bool:
        nonlocal seen
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError("no output; seen:\n" + seen.decode(errors="replace"))
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        seen += chunk
        return bool(chunk)

    try:
        position = 0
        for expect, send in steps:
            while (found := seen.find(expect.encode(), position)) < 0:
                if not read_some():
                    raise EOFError(f"{expect!r} never came; seen:\n" + seen.decode("replace"))
            position = found + len(expect)
            # type only once it waits for the keyboard: a Ctrl-C that lands between the
            # prompt and the read() is lost by CPython (a person is never that quick)
            _wait_reading(process.pid, deadline)
            os.write(master, send)
        while read_some():
            pass
        returncode = process.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        os.close(master)
    return TerminalRun(returncode, seen.decode("utf-8", errors="replace").replace("\r\n", "\n"))
