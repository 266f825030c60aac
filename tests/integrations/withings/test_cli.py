"""``agentd withings latest|range`` as a person runs them: subprocesses of the installed CLI
against the simulated Withings over HTTPS (Hypercorn, trustme CA), tokens in auth.json."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowengine.clock import SystemClock, to_ms
from flowengine.tokens import TokenSet, TokenStore
from flowengine.vault import Vault, vault_root
from integrations.withings.sim import WithingsSim
from tests.agentd.cli_helpers import SIM_CLIENT_ID, SIM_CLIENT_SECRET, AgentdInstance, SimServer


@pytest.fixture(name="instance", scope="module")
def _instance(tmp_path_factory: pytest.TempPathFactory) -> AgentdInstance:
    instance = AgentdInstance(tmp_path_factory.mktemp("withings-cli"))
    instance.write_config()
    return instance


@pytest.fixture(name="server", scope="module")
def _server(instance: AgentdInstance) -> Iterator[SimServer]:
    server = SimServer(
        instance.cert_file,
        instance.key_file,
        api=WithingsSim(clock=SystemClock()),
        clients={SIM_CLIENT_ID: SIM_CLIENT_SECRET},
        redirect_uris=[instance.redirect_uri],
    )
    server.start()
    (instance.config_home / "agent" / "providers.toml").write_text(
        f"""
[providers.withings]
authorize_url = "{server.base_url}/oauth2_user/authorize2"
token_url = "{server.base_url}/v2/oauth2"
api_base_url = "{server.base_url}"
""",
        encoding="utf-8",
    )
    result = instance.run(
        "credentials", "withings", "--client-id", SIM_CLIENT_ID, "--secret-stdin",
        input=SIM_CLIENT_SECRET + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    yield server
    server.stop()


def _forget(instance: AgentdInstance) -> None:
    """No Withings tokens anywhere: not in the vault (the source of truth), not in auth.json."""
    Vault(vault_root(instance.state_dir)).provider("withings").remove()
    TokenStore(Path(instance.auth_file)).delete("withings")


def _seed(instance: AgentdInstance, server: SimServer) -> dict[str, str]:
    issued = server.sim.issue_tokens(SIM_CLIENT_ID, scope="user.metrics")
    _forget(instance)  # the pair written to auth.json below is taken over by the vault
    TokenStore(Path(instance.auth_file)).write(
        "withings",
        TokenSet(
            access=issued["access_token"],
            refresh=issued["refresh_token"],
            expires=to_ms(SystemClock().now()) + 3_600_000,
            scope="user.metrics",
        ),
    )
    return issued


def test_latest(instance: AgentdInstance, server: SimServer) -> None:
    _seed(instance, server)
    result = instance.run("withings", "latest")
    assert result.returncode == 0, result.stderr
    weight, pressure = result.stdout.splitlines()
    assert re.fullmatch(r"weight +\d+\.\d kg .+ ago", weight)
    assert re.match(r"blood pressure +\d+/\d+ mmHg, pulse \d+ ", pressure)


def test_range_as_json_csv_and_table(instance: AgentdInstance, server: SimServer) -> None:
    _seed(instance, server)
    as_json = instance.run("withings", "range", "--since", "30d", "--json")
    assert as_json.returncode == 0, as_json.stderr
    items = json.loads(as_json.stdout)
    assert 50 <= len(items) <= 70  # a weigh-in most days, a blood pressure every day
    assert [i["taken_at"] for i in items] == sorted(i["taken_at"] for i in items)
    assert any(i["uncertain"] for i in items)
    as_csv = instance.run("withings", "range", "--since", "30d", "--csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["taken_at"] for r in rows] == [i["taken_at"] for i in items]
    table = instance.run("withings", "range", "--since", "3d")
    assert table.returncode == 0
    assert re.search(r"^\d+ measurements$", table.stderr, re.MULTILINE)
    assert "kg" in table.stdout
    assert "mmHg" in table.stdout


def test_an_expired_access_token_is_refreshed_in_withings_dialect(
    instance: AgentdInstance, server: SimServer
) -> None:
    issued = _seed(instance, server)
    server.sim.expire_access_tokens()  # auth.json still believes it is valid
    before = server.sim.counters.token_requests["refresh_token"]
    result = instance.run("withings", "latest")
    assert result.returncode == 0, result.stderr
    assert server.sim.counters.token_requests["refresh_token"] == before + 1
    entry = TokenStore(Path(instance.auth_file)).read("withings")
    assert entry is not None
    assert entry.refresh != issued["refresh_token"]  # rotated, and stored
    for secret in (issued["access_token"], issued["refresh_token"], SIM_CLIENT_SECRET):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("range", "--since", "soon"), 2, "--since"),
        (("latest", "--provider", "dexcom"), 2, "not a Withings provider"),
        (("latest", "--provider", "withingz"), 2, "did you mean"),
    ],
)
def test_bad_input_is_one_line_and_a_usage_exit(
    instance: AgentdInstance, server: SimServer, args: tuple[str, ...], code: int, message: str
) -> None:
    result = instance.run("withings", *args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_not_connected_exits_3(instance: AgentdInstance, server: SimServer) -> None:
    _forget(instance)
    result = instance.run("withings", "latest")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
