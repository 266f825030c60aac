"""Contract: the fake tailscaled (tests/api/fake_tailscale.py) answers like the real one.

The same LocalAPI requests go to the fake and to a real tailscaled; the answers must have
the same status, content type and error text, and JSON of the same shape: the same
top-level keys, and for every key the fake sends, a key of the same JSON type in the real
answer (Go marshals a nil slice or map as null, so null matches a list or an object).
The fake CLI is held to the real CLI the same way.

Not covered here: ``cert/<domain>``. testcontrol issues no certificates and the real
tailscaled would try Let's Encrypt (it runs the ACME order before it even checks ``type``;
tailscale-verified.md #26); the fake's cert endpoint stays checked against the source.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.fake_tailscale import FakeTailnet, install_fake_cli, run_localapi

from .harness import BIN_DIR, Node, Tailnet

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


def json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), "number"
    )


#: JSON objects used as maps (their keys are data: user ids, capabilities, ports, host:port)
MAPS = {
    "$.User",
    "$.Self.CapMap",
    "$.CapMap",
    "$.Node.CapMap",
    "$.TCP",
    "$.Web",
    "$.Web.*.Handlers",
    "$.AllowFunnel",
    "$.Foreground",
    "$.Foreground.*.TCP",
    "$.Foreground.*.Web",
    "$.Foreground.*.Web.*.Handlers",
}


def shape_mismatches(fake: Any, real: Any, path: str = "$") -> list[str]:
    """Where the fake's JSON is not shaped like the real one (empty list = same shape)."""
    ft, rt = json_type(fake), json_type(real)
    if ft != rt:
        if "null" in (ft, rt) and {ft, rt} & {"array", "object"}:
            return []
        return [f"{path}: fake {ft}, real {rt}"]
    out: list[str] = []
    if isinstance(fake, dict) and path in MAPS:
        if fake and real:
            out += shape_mismatches(
                next(iter(fake.values())), next(iter(real.values())), path + ".*"
            )
    elif isinstance(fake, dict):
        for key, value in fake.items():
            if key not in real:
                out.append(f"{path}.{key}: only in the fake")
            else:
                out += shape_mismatches(value, real[key], f"{path}.{key}")
    elif isinstance(fake, list) and fake and real:
        out += shape_mismatches(fake[0], real[0], f"{path}[0]")
    return out


@pytest.fixture(name="fake")
def _fake(tailnet: Tailnet) -> FakeTailnet:
    fake = FakeTailnet()
    fake.add_peer("100.90.1.2", "owner@example.com")
    fake.add_peer("100.90.1.3", "ci", tags=("tag:ci",))
    return fake


@pytest.fixture(name="fake_socket")
async def _fake_socket(fake: FakeTailnet) -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ts") as tmp:
        async with run_localapi(fake, Path(tmp) / "fake.sock") as path:
            yield path


@pytest.fixture(name="server")
def _server(tailnet: Tailnet) -> Node:
    return tailnet["agentd-host"]


class Pair:
    """Sends one request to the fake and to the real LocalAPI."""

    def __init__(self, fake: Path, real: Path) -> None:
        self.sockets = {"fake": fake, "real": real}

    async def get(
        self, path: str, *, host: str = "local-tailscaled.sock", **kwargs: Any
    ) -> tuple[httpx.Response, httpx.Response]:
        answers = []
        for name in ("fake", "real"):
            transport = httpx.AsyncHTTPTransport(uds=str(self.sockets[name]))
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                answers.append(await client.get(f"http://{host}/localapi/v0/{path}", **kwargs))
        return answers[0], answers[1]


@pytest.fixture(name="pair")
def _pair(fake_socket: Path, server: Node) -> Pair:
    return Pair(fake_socket, server.socket)


def assert_same_json_shape(fake: httpx.Response, real: httpx.Response, what: str) -> None:
    assert (fake.status_code, real.status_code) == (200, 200), what
    for response in (fake, real):
        assert response.headers["content-type"] == "application/json", what
    fake_data, real_data = fake.json(), real.json()
    assert set(fake_data) == set(real_data), f"{what}: top-level keys differ"
    problems = shape_mismatches(fake_data, real_data)
    assert not problems, f"{what}: {problems}"


async def test_status_has_the_real_shape(pair: Pair) -> None:
    fake, real = await pair.get("status", params={"peers": "false"})
    assert_same_json_shape(fake, real, "status?peers=false")
    assert fake.json()["Peer"] is None
    assert real.json()["Peer"] is None
    fake, real = await pair.get("status")
    assert set(fake.json()) == set(real.json())


async def test_whois_answers_have_the_real_shape(pair: Pair, tailnet: Tailnet) -> None:
    cases = [
        ("user", "100.90.1.2:41000", f"{tailnet['owner-laptop'].ip4}:41000"),
        ("tagged", "100.90.1.3", tailnet["ci-runner"].ip4),
    ]
    for what, fake_addr, real_addr in cases:
        fake, _ = await pair.get("whois", params={"addr": fake_addr})
        _, real = await pair.get("whois", params={"addr": real_addr})
        assert_same_json_shape(fake, real, f"whois of a {what} node")
        assert bool(fake.json()["Node"].get("Tags")) == bool(real.json()["Node"].get("Tags"))


@pytest.mark.parametrize(
    ("params", "status", "text"),
    [
        ({"addr": "100.64.77.77:80"}, 404, "no match for IP:port\n"),
        ({"addr": "127.0.0.1:1"}, 404, "no match for IP:port\n"),
        ({}, 400, "missing 'addr' parameter\n"),
        ({"addr": "not-an-address"}, 400, "invalid 'addr' parameter\n"),
        ({"addr": "100.64.0.1:99999"}, 400, "invalid 'addr' parameter\n"),
    ],
)
async def test_whois_errors_are_the_real_ones(
    pair: Pair, params: dict[str, str], status: int, text: str
) -> None:
    for response in await pair.get("whois", params=params):
        assert (response.status_code, response.text) == (status, text)
        assert response.headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("host", "headers"),
    [
        ("evil.example", {}),
        ("local-tailscaled.sock", {"Origin": "http://evil.example"}),
        ("local-tailscaled.sock", {"Referer": "http://evil.example/"}),
    ],
)
async def test_browser_like_requests_are_refused_alike(
    pair: Pair, host: str, headers: dict[str, str]
) -> None:
    for response in await pair.get("status", host=host, headers=headers):
        assert (response.status_code, response.text) == (403, "invalid localapi request\n")


@pytest.fixture(name="serve_configs")
def _serve_configs(server: Node) -> Iterator[list[dict[str, Any] | None]]:
    """Real serve configs: after a reset, then with a --bg and a foreground session."""
    server.cli("serve", "reset")
    configs: list[dict[str, Any] | None] = [server.localapi_json("serve-config")]
    server.cli("serve", "--bg", "--http=8470", "http://127.0.0.1:8471")
    foreground = subprocess.Popen(
        [str(BIN_DIR / "tailscale"), f"--socket={server.socket}"]
        + ["serve", "--http=8472", "unix:/tmp/agentd-contract.sock"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=server.env(),
    )
    try:
        configs.append(_wait_for_foreground(server))
        yield configs
    finally:
        foreground.terminate()
        foreground.wait(10)
        server.cli("serve", "reset")


def _wait_for_foreground(server: Node) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        config = server.localapi_json("serve-config") or {}
        if config.get("Foreground") and config.get("Web"):
            return dict(config)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no foreground serve session appeared: {config}")
        time.sleep(0.1)


async def test_serve_config_has_the_real_shape(
    pair: Pair, fake: FakeTailnet, server: Node, serve_configs: list[dict[str, Any] | None]
) -> None:
    # never configured: null; after `tailscale serve reset`: {} (the real one is reset here)
    assert serve_configs[0] == {}
    assert fake.serve_config is None
    fresh = (await pair.get("serve-config"))[0]
    assert (fresh.text, fresh.headers["content-type"]) == ("null", "application/json")
    fake.serve_config = {}
    fake_answer, real_answer = await pair.get("serve-config")
    assert fake_answer.text == "{}"
    assert fake_answer.headers.get("etag")
    assert real_answer.headers.get("etag")

    # the fake, told the same config for its own name, answers in the same shape
    real_config = serve_configs[1]
    assert real_config is not None
    fake.serve_config = json.loads(json.dumps(real_config).replace(server.dns_name, fake.domain))
    fake_answer, real_answer = await pair.get("serve-config")
    assert_same_json_shape(fake_answer, real_answer, "serve-config")
    assert set(real_answer.json()) == {"TCP", "Web", "Foreground"}
    session = next(iter(real_answer.json()["Foreground"].values()))
    assert set(session) == {"TCP", "Web"}
    assert not shape_mismatches(next(iter(fake_answer.json()["Foreground"].values())), session)


def test_fake_cli_prints_what_the_real_cli_prints(
    tailnet: Tailnet, fake: FakeTailnet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_cli(tmp_path / "bin", fake, monkeypatch)
    server = tailnet["agentd-host"]
    real = server.cli("whois", "--json", "100.64.77.77:80", check=False)
    fake_run = subprocess.run(
        ["tailscale", "whois", "--json", "100.64.77.77:80"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (fake_run.returncode, fake_run.stderr) == (real.returncode, real.stderr)
    assert real.stderr == "peer not found\n"
    real_status = json.loads(server.cli("status", "--json", "--peers=false").stdout)
    fake_status = json.loads(
        subprocess.run(
            ["tailscale", "status", "--json", "--peers=false"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert set(fake_status) == set(real_status)
    assert not shape_mismatches(fake_status, real_status)
