"""No secret outside auth.json, the token vault, the credentials file and the API token file:
a whole run scanned.

One installation runs ``agentd -v serve`` (DEBUG logs) against the simulated Dexcom; then
``agentd -v connect`` with a browser, refreshes, and every other command (integration
subcommands included, found in the parser), each with ``-v``. Every secret value that went
by is collected: the client secret, the API bearer token, each OAuth state, PKCE verifier
and code, every access and refresh token. None of them may appear in

* any log line: the daemon's log and every command's stderr, at DEBUG;
* any command's stdout (except ``agentd token``'s, whose job is printing the token);
* the ledger: ``ledger.sqlite3`` (free pages included), its ``-wal`` and ``-shm`` files,
  while the daemon runs and after it stopped; nor any other file of the state directory;
* the API's answers (flows, one flow, its diagram, a spent pending state, errors) and the
  callback page;
* the arguments of any process started meanwhile (``/proc/<pid>/cmdline`` of every
  descendant of this test process, sampled every few milliseconds).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agentd.cli import build_parser
from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    DaemonProcess,
    LineReader,
    dexcom_sim,
)
from tests.api.fake_tailscale import FakeTailnet, LocalAPIThread, status_json

pytestmark = pytest.mark.slow

#: files whose whole purpose is to hold secrets (README: Security model)
SECRET_HOMES = {"credentials.json", "api-token", "auth.json"}
#: ... and the token vault's record slots, ``<state>/vault/<provider>/slot-N``
VAULT_SLOTS = {"slot-0", "slot-1"}


class ProcessWatcher:
    """Samples the command lines of every descendant process until stopped."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cmdline-watcher", daemon=True)

    def _children(self, pid: int) -> list[int]:
        out: list[int] = []
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
        return out

    def _run(self) -> None:
        me = int(Path("/proc/self/stat").read_text().split()[0])
        while not self._stop.is_set():
            todo = self._children(me)
            while todo:
                pid = todo.pop()
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                self.seen.add(raw.replace(b"\0", b" ").decode("utf-8", "replace"))
                todo += self._children(pid)
            self._stop.wait(0.005)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Run:
    """Everything the scenario saw: secrets, outputs to scan, where it happened."""

    def __init__(self, instance: AgentdInstance, daemon: DaemonProcess) -> None:
        self.instance = instance
        self.daemon = daemon
        #: kind -> values ("client secret", "api token", "state", "verifier", "code", "token")
        self.found: dict[str, set[str]] = {"client secret": {SIM_CLIENT_SECRET}}
        self.texts: dict[str, str] = {}  # what -> text that must hold no secret
        self.token_stdout: list[str] = []  # `agentd token` output: the access token, by design
        self.commands: list[tuple[str, ...]] = []
        self.ledger_while_running: bytes = b""
        self.ledger_after_stop: bytes = b""
        self.cmdlines: set[str] = set()

    @property
    def secrets(self) -> set[str]:
        return set().union(*self.found.values())

    def note(self, kind: str, value: str) -> None:
        self.found.setdefault(kind, set()).add(value)

    def tokens_from_auth(self) -> None:
        for entry in self.instance.auth_entries().values():
            for key in ("access", "refresh"):
                if isinstance(entry.get(key), str):
                    self.note("token", entry[key])

    def cli(self, *args: str, stdin: str = "") -> Any:
        result = self.instance.run("-v", *args, input=stdin, timeout=120)
        self.commands.append(args)
        name = "agentd -v " + " ".join(args)
        self.texts[f"{name} (stderr)"] = result.stderr
        if args[0] == "token":
            self.token_stdout.append(result.stdout)
        else:
            self.texts[f"{name} (stdout)"] = result.stdout
        self.tokens_from_auth()
        return result


def ledger_bytes(state_dir: Path) -> bytes:
    out = b""
    for suffix in ("", "-wal", "-shm"):
        path = state_dir / f"ledger.sqlite3{suffix}"
        if path.exists():
            out += path.read_bytes()
    return out


def connect_with_browser(run: Run) -> None:
    """``agentd -v connect dexcom``: the owner opens the link; state, verifier, code noted."""
    instance = run.instance
    process = instance.popen("-v", "connect", "dexcom", "--no-qr", "--timeout", "120")
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    url = "<no link>"
    try:
        url = out.wait_for(lambda text: "/v2/oauth2/login?" in text).strip()
        run.note("state", parse_qs(urlsplit(url).query)["state"][0])
        ledger = f"file:{instance.state_dir / 'ledger.sqlite3'}?mode=ro"
        with closing(sqlite3.connect(ledger, uri=True)) as db:
            for (verifier,) in db.execute("SELECT code_verifier FROM flow_secrets"):
                run.note("verifier", verifier)
        with instance.browser() as browser:
            page = browser.get(url)
        run.texts["the callback page"] = page.text
        run.note("code", parse_qs(urlsplit(str(page.url)).query)["code"][0])
        returncode = process.wait(150)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        stdout = out.rest()
        # the authorize link carries the state by design (it is what the owner opens): only
        # that line may, nothing else of the output
        run.texts["agentd -v connect (stdout)"] = stdout.replace(url, "<the authorize link>")
        run.texts["agentd -v connect (stderr)"] = err.rest()
        process.stdout.close()
        process.stderr.close()
    assert returncode == 0, run.texts["agentd -v connect (stderr)"]
    assert "✅ Dexcom connected" in run.texts["agentd -v connect (stdout)"]
    run.commands.append(("connect",))
    run.tokens_from_auth()


def api_answers(run: Run, flow_id: str, spent_state: str) -> None:
    instance = run.instance
    token = (instance.state_dir / "api-token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(
        base_url=instance.base_url, verify=instance.ssl_context(), timeout=30
    ) as client:
        for path in (
            "/healthz",
            "/oauth/flows",
            f"/oauth/flows/{flow_id}",
            f"/oauth/flows/{flow_id}/diagram",
            f"/oauth/pending/{spent_state}",
            "/oauth/flows/no-such-flow",
        ):
            response = client.get(path, headers=headers)
            run.texts[f"API GET {path} ({response.status_code})"] = (
                json.dumps(dict(response.headers)) + response.text
            )
        refused = client.get("/oauth/flows", headers={"Authorization": "Bearer wrong"})
        run.texts["API 401"] = json.dumps(dict(refused.headers)) + refused.text
        replay = client.get("/oauth/callback", params={"state": spent_state, "code": "replayed"})
        run.texts["callback replayed"] = replay.text


def every_other_command(run: Run) -> list[tuple[str, ...]]:
    """Each subcommand with plausible arguments (integration subcommands found generically)."""
    flow_id = run.instance.auth_entries()["dexcom"]["flow_id"]
    commands: list[tuple[str, ...]] = [
        ("status",),
        ("status", "--json"),
        ("flows",),
        ("flows", "--json"),
        ("flows", "--provider", "dexcom", "--state", "stored", "--limit", "5"),
        ("flow", flow_id),
        ("flow", flow_id, "--json"),
        ("diagram",),
        ("diagram", "--flow", flow_id),
        ("diagram", "--flow", flow_id, "--format", "dot"),
        ("providers",),
        ("providers", "dexcom", "--json"),
        ("config", "check"),
        ("config", "show"),
        ("config", "path"),
        ("token", "dexcom"),
        ("token", "oura"),
        # another machine's fetch over the tailnet listener, and the audit of it
        ("token", "dexcom", "--from", run.instance.base_url),
        ("audit",),
        ("audit", "--json"),
        ("credentials", "oura", "--client-id", "oura-id", "--secret-stdin"),
    ]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:  # an integration's subcommands, each with its defaults
            commands += [(name, child) for child in nested[0].choices]
    return commands


@pytest.fixture(name="run", scope="module")
def _run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    instance = AgentdInstance(tmp_path_factory.mktemp("secret-scan"))
    instance.write_config(extra='[[access]]\nwho = ["tag:ci"]\nproviders = ["dexcom"]\n')
    # a tailscaled that names every loopback caller a tagged device (remote hand-outs)
    status = status_json(tun=False)
    status["CertDomains"], status["Self"]["DNSName"] = ["localhost"], "localhost."
    tailnet = FakeTailnet(status=status, loopback_peer="100.90.1.4")
    tailnet.add_peer("100.90.1.4", "tagged-devices", tags=("tag:ci",))
    short = tempfile.TemporaryDirectory(prefix="ts")
    localapi = LocalAPIThread(tailnet, Path(short.name) / "tailscaled.sock").start()
    config = instance.config_file.read_text()
    instance.config_file.write_text(
        config.replace(str(instance.root / "no-tailscaled.sock"), str(localapi.socket_path))
    )
    sim = dexcom_sim(instance)
    sim.start()
    instance.write_catalog(sim.base_url, extra="use_pkce = true")  # a verifier to look for
    daemon = DaemonProcess(instance, verbose=True)
    run = Run(instance, daemon)
    try:
        with ProcessWatcher() as watcher:
            daemon.wait_healthy()
            run.note("api token", (instance.state_dir / "api-token").read_text().strip())
            stored = run.cli(
                "credentials", "dexcom", "--client-id", SIM_CLIENT_ID, "--secret-stdin",
                stdin=SIM_CLIENT_SECRET + "\n",
            )  # fmt: skip
            assert stored.returncode == 0, stored.stderr
            connect_with_browser(run)
            (state,) = run.found["state"]
            flow_id = instance.auth_entries()["dexcom"]["flow_id"]
            # refreshes: due on the CLI's slow path, twice (the sim rotates refresh tokens)
            for _ in range(2):
                instance.edit_vault("dexcom", expires=int(time.time() * 1000) - 1000)
                refreshed = run.cli("token", "dexcom")
                assert refreshed.returncode == 0, refreshed.stderr
            for args in every_other_command(run):
                run.cli(*args, stdin="oura-secret-value\n" if "--secret-stdin" in args else "")
            run.note("client secret", "oura-secret-value")
            api_answers(run, flow_id, state)
            run.ledger_while_running = ledger_bytes(instance.state_dir)
            disconnect = run.cli("disconnect", "dexcom")
            assert disconnect.returncode == 0, disconnect.stderr
            assert daemon.stop() == 0
        run.cmdlines = watcher.seen
        run.texts["the daemon's log (-v, DEBUG)"] = daemon.log()
        run.ledger_after_stop = ledger_bytes(instance.state_dir)
        yield run
    finally:
        if daemon.process.poll() is None:
            daemon.stop()
        sim.stop()
        localapi.stop()
        short.cleanup()


def test_the_scan_has_something_to_find(run: Run) -> None:
    """The scenario produced every kind of secret, and the places scanned saw real work."""
    counts = {kind: len(values) for kind, values in run.found.items()}
    assert counts["client secret"] == 2
    assert counts["api token"] == counts["state"] == counts["verifier"] == counts["code"] == 1
    assert counts["token"] >= 6  # access + refresh from the exchange and two refreshes
    assert all(line.strip() in run.found["token"] for line in run.token_stdout[:2])
    assert " INFO " in run.texts["the daemon's log (-v, DEBUG)"]
    assert any(" connect dexcom " in line for line in run.cmdlines)
    # another machine got a token over the tailnet listener, and the audit shows it
    assert "first token hand-out to tag:ci" in run.texts["the daemon's log (-v, DEBUG)"]
    assert len(run.token_stdout) == 5  # two refreshes, dexcom, oura (none), --from
    assert run.token_stdout[4].strip() in run.found["token"]
    assert "tag:ci" in run.texts["agentd -v audit (stdout)"]
    assert any(line.endswith(" -v serve ") for line in run.cmdlines)
    assert {("connect",), ("dexcom", "latest"), ("disconnect", "dexcom")} <= set(run.commands)


@pytest.mark.parametrize("where", ["logs and outputs", "API answers", "page"])
def test_no_secret_in_logs_outputs_or_api_answers(run: Run, where: str) -> None:
    for what, text in run.texts.items():
        is_api = what.startswith(("API", "callback"))
        if (where == "API answers") != is_api:
            continue
        for secret in run.secrets:
            assert secret not in text, f"a secret is in {what}"


def test_no_secret_in_the_ledger_its_wal_or_free_pages(run: Run) -> None:
    for moment, data in (("running", run.ledger_while_running), ("stopped", run.ledger_after_stop)):
        assert data, moment
        for secret in run.secrets:
            assert secret.encode() not in data, f"a secret is in the ledger files ({moment})"


def test_no_secret_in_any_other_file_of_the_state_directory(run: Run) -> None:
    vault = run.instance.state_dir / "vault"
    for path in sorted(run.instance.state_dir.rglob("*")):
        if not path.is_file() or path.name in SECRET_HOMES or path.suffix == ".lock":
            continue
        if path.parent.parent == vault and path.name in VAULT_SLOTS:
            continue
        data = path.read_bytes()
        for secret in run.secrets:
            assert secret.encode() not in data, f"a secret is in {path.name}"


def test_no_secret_in_any_process_arguments(run: Run) -> None:
    assert run.cmdlines, "the watcher saw no process"
    for line in run.cmdlines:
        for secret in run.secrets:
            assert secret not in line, "a secret is in a process's arguments"
