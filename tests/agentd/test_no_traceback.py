"""No input gives a traceback: the real ``agentd`` (subprocesses, a pseudo-terminal for the
prompts) fed the cases users met, then hypothesis-generated argv and configuration values.

Every run must end with an exit code from README's table, print no traceback and no
"unexpected internal error" (the last-resort line in ``agentd.cli.main`` exists for bugs; a
test that reaches it has found one). No daemon runs and the provider's URLs point at a
closed port, so commands fail fast where they need the network.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.cli import build_parser
from agentd.config import SCHEMA
from tests.agentd.cli_helpers import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    AgentdInstance,
    TerminalRun,
    agentd_command,
    free_port,
    run_in_terminal,
)

ROOT = Path(__file__).resolve().parents[2]
CTRL_C, CTRL_D = b"\x03", b"\x04"
#: commands the generated argv never runs: they serve until stopped (serve) or run the
#: whole stack (demo, tested in test_demo_run.py)
LONG_RUNNING = {"serve", "demo"}


def documented_exit_codes() -> set[int]:
    """The codes in README.md's exit-code table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("Exit codes", 1)[1].split("\n\n", 2)[1]
    codes = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert {0, 1, 2, 130} <= codes, table
    return codes


DOCUMENTED = documented_exit_codes()


def assert_clean(returncode: int, output: str, *, expected: int | None = None) -> None:
    assert "Traceback" not in output, output
    assert "unexpected internal error" not in output, output
    assert returncode in DOCUMENTED, (returncode, output)
    if expected is not None:
        assert returncode == expected, (returncode, output)


@pytest.fixture(name="inst", scope="module")
def _inst(tmp_path_factory: pytest.TempPathFactory) -> AgentdInstance:
    instance = AgentdInstance(tmp_path_factory.mktemp("no-traceback"))
    instance.write_config()
    instance.write_catalog(f"https://localhost:{free_port()}")  # nothing listens there
    stored = instance.run(
        "credentials", "dexcom", "--client-id", SIM_CLIENT_ID, "--secret-stdin",
        input=SIM_CLIENT_SECRET + "\n",
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    return instance


def run(inst: AgentdInstance, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = inst.run(*args, input="", env=env, timeout=120)
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------- prompts


def terminal(inst: AgentdInstance, *args: str, steps: list[tuple[str, bytes]]) -> TerminalRun:
    return run_in_terminal([*agentd_command(), *args], env=inst.env(), cwd=inst.root, steps=steps)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("args", "steps", "code", "message"),
    [
        (
            ("credentials", "oura"),
            [("Oura client id: ", CTRL_D)],
            2,
            "error: --client-id: standard input ended before the client id was given",
        ),
        (
            ("credentials", "oura"),
            [("Oura client id: ", b"some-id\n"), ("(not echoed): ", CTRL_D)],
            2,
            "error: client_secret: standard input ended before the Oura client secret was given",
        ),
        (
            ("credentials", "oura"),
            [("Oura client id: ", b"\x1b[A\x1b[B\n")],
            2,
            "error: --client-id: client id may hold only printable ASCII characters"
            " (RFC 6749 Appendix A)",
        ),
        (("credentials", "oura"), [("Oura client id: ", CTRL_C)], 130, None),
        (
            ("credentials", "oura"),
            [("Oura client id: ", b"some-id\n"), ("(not echoed): ", CTRL_C)],
            130,
            None,
        ),
        (
            ("connect", "oura", "--no-qr"),
            [("Oura client id: ", CTRL_D)],
            2,
            "error: oura: standard input ended before the Oura client id was given"
            " (hint: or store them first: agentd credentials oura)",
        ),
        (
            ("connect", "oura", "--no-qr"),
            [("Oura client id: ", b"some-id\n"), ("(not echoed): ", CTRL_D)],
            2,
            "error: oura: standard input ended before the Oura client secret was given"
            " (hint: or store them first: agentd credentials oura)",
        ),
        (("connect", "oura", "--no-qr"), [("Oura client id: ", CTRL_C)], 130, None),
    ],
    ids=[
        "credentials-ctrl-d-at-id",
        "credentials-ctrl-d-at-secret",
        "credentials-garbage-id",
        "credentials-ctrl-c-at-id",
        "credentials-ctrl-c-at-secret",
        "connect-ctrl-d-at-id",
        "connect-ctrl-d-at-secret",
        "connect-ctrl-c-at-id",
    ],
)
def test_prompts_end_with_one_line_and_store_nothing(
    inst: AgentdInstance,
    args: tuple[str, ...],
    steps: list[tuple[str, bytes]],
    code: int,
    message: str | None,
) -> None:
    result = terminal(inst, *args, steps=steps)
    assert_clean(result.returncode, result.output, expected=code)
    if message is None:
        assert result.output.rstrip().endswith("interrupted"), result.output
    else:
        assert error_lines(result.output) == [message], result.output
    stored = json.loads((inst.state_dir / "credentials.json").read_text())
    assert "oura" not in stored  # nothing half-stored


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command path -> its parser, integration subcommands included."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[prefix] = parser
            return
        for name, child in subs[0].choices.items():
            walk(f"{prefix} {name}".strip(), child)

    walk("", build_parser())
    return found


# ---------------------------------------------------------------- known cases


def _known_argv() -> list[Any]:
    cases: list[Any] = [
        (("flows", "--limit", "1" + "0" * 30), 2, "--limit: must be between 1 and 10000"),
        (("flows", "--limit", "-1"), 2, "--limit: must be between 1 and 10000"),
        (("flows", "--limit", "0"), 2, "--limit: must be between 1 and 10000"),
        (("flows", "--limit", "ten"), 2, "is not a whole number"),
        (("flows", "--provider", "\udcff\udcfe"), 2, "a provider id is"),
        (("connect", "dexcom", "--timeout", "nan"), 2, "--timeout: must be above 0"),
        (("connect", "dexcom", "--timeout", "inf"), 2, "--timeout: must be above 0"),
        (("connect", "dexcom", "--timeout", "-5"), 2, "--timeout: must be above 0"),
        (("connect", "dexcom", "--timeout", "1e400"), 2, "--timeout: must be above 0"),
        (("connect", "dexcom", "--scope", "a b"), 2, "is not a scope"),
        (("connect", "dexcom", "--no-qr"), 5, "the daemon is not running"),
        # issue 13: a URL to discover, the device grant
        (("connect", "dexcom", "--device"), 2, "has no device authorization endpoint"),
        (("connect", "http://example.com/mcp", "--device"), 2, "must use https"),
        (("connect", "https://user:pw@example.com/mcp", "--device"), 2, "user name or password"),
        (("connect", "https://127.0.0.1:1/mcp", "--device"), 5, "cannot reach 127.0.0.1"),
        (("connect", "https://a b/mcp"), 2, "a URL is printable ASCII"),
        (("connect", "https://example.com/" + "x" * 3000), 2, "a URL is printable ASCII"),
        (("connect", "https://example.com/mcp", "--no-qr"), 5, "the daemon is not running"),
        (("token", "\u202edexcom"), 2, "a provider id is"),
        (("flow", "x" * 1000), 2, "a flow id is"),
        (("flow", "no-such-flow"), 2, "no flow no-such-flow"),
        (("diagram", "--flow", "nope", "--format", "dot"), 2, "no flow nope"),
        (("disconnect", "dexcom"), 3, "not connected"),
        (("token", "oura"), 3, "not connected"),
        (("credentials", "oura", "--client-id", "\x07bell", "--secret-stdin"), 2, "printable"),
        (("connect", "dexcom", "--qr", "--no-qr"), 2, "not allowed with argument"),
        (("status", "--json", "dexcom"), 2, "unrecognized arguments: dexcom"),
        (("providers", "nope", "--json"), 2, "unknown provider 'nope'"),
        (("flow", "no-such-flow", "--json"), 2, "no flow no-such-flow"),
        (("config", "shoe"), 2, "invalid choice: 'shoe'"),
        (("token", "dexcom", "--from", "http://localhost:8400"), 2, "not the daemon's address"),
        (("token", "dexcom", "--from", "https://localhost:0x1"), 2, "not the daemon's address"),
        (("token", "dexcom", "--from", f"https://localhost:{free_port()}"), 5, "not be reached"),
        (("audit", "--limit", "0"), 2, "--limit: must be between 1 and 10000"),
        (("audit", "--who", "a b"), 2, "an identity is a login"),
        (("audit", "--provider", "\u202edexcom"), 2, "a provider id is"),
    ]
    # a look-back reaching past year 1 used to overflow `now - since`
    for command in ("dexcom egvs", "withings range"):
        if command in _commands():
            cases.append(((*command.split(), "--since", "99999999d"), 2, "too long"))
    return cases


@pytest.mark.parametrize(("args", "code", "message"), _known_argv())
def test_known_bad_arguments(
    inst: AgentdInstance, args: tuple[str, ...], code: int, message: str
) -> None:
    returncode, output = run(inst, *args)
    assert_clean(returncode, output, expected=code)
    assert message in output
    assert len(error_lines(output)) == 1, output


def test_a_closed_stdout_exits_141_quietly(inst: AgentdInstance) -> None:
    # `agentd providers | head -0`: the reader is gone before anything is written
    process = subprocess.Popen(
        [*agentd_command(), "diagram"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=inst.env(),
        cwd=inst.root,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    returncode = process.wait(60)
    assert_clean(returncode, stderr, expected=141)
    assert stderr == ""


# -------------------------------------------------------------- configuration


BAD_CONFIGS = {
    "interval-nan": ("[timer]\ninterval = nan\n", "timer.interval"),
    "interval-inf": ("[timer]\ninterval = inf\n", "timer.interval"),
    "interval-negative": ("[timer]\ninterval = -1\n", "timer.interval"),
    "ttl-huge": ("[timer]\nawaiting_ttl = 1e300\n", "timer.awaiting_ttl"),
    "ttl-huge-int": ("[timer]\ncode_ttl = 9223372036854775807\n", "timer.code_ttl"),
    "fraction-nan": ("[timer]\nrefresh_fraction = nan\n", "timer.refresh_fraction"),
    "port-text": ('[server]\nport = "8400"\n', "server.port"),
    "port-huge": ("[server]\nport = 9223372036854775807\n", "server.port"),
    "interval-list": ("[timer]\ninterval = [1]\n", "timer.interval"),
    "owner-ids-bools": ("[telegram]\nowner_ids = [true, 1.5]\n", "telegram.owner_ids"),
    "logins-not-text": ("[server]\nallowed_logins = [1, {a = 1}]\n", "server.allowed_logins"),
    "section-not-table": ("server = 1\n", "server"),
    "nul-in-path": ('[paths]\nstate_dir = "a\\u0000b"\n', "paths.state_dir"),
    "public-name": ('[server]\npublic_name = "not a host"\n', "server.public_name"),
    "api-id-huge": ("[telegram]\napi_id = 9223372036854775807\n", "telegram.api_id"),
    "datetime": ("[server]\nhost = 1979-05-27T07:32:00Z\n", "server.host"),
    "not-toml": ("[server\n", "not valid TOML"),
    "access-not-array": ('[access]\nwho = ["tag:ci"]\n', "access: must be an array"),
    "access-tag": ('[[access]]\nwho = ["tag:"]\nproviders = ["oura"]\n', "access[1].who[1]"),
    "access-login": ('[[access]]\nwho = ["owner"]\nproviders = ["oura"]\n', "access[1].who[1]"),
    "access-provider": (
        '[[access]]\nwho = ["tag:ci"]\nproviders = ["dexcon"]\n',
        "access[1].providers[1]",
    ),
    "access-key": ('[[access]]\nwho = ["tag:ci"]\nproviders = ["oura"]\nx = 1\n', "access[1].x"),
    "remote-rate-nan": ("[remote]\nrate = nan\n", "remote.rate"),
    "remote-burst-zero": ("[remote]\nburst = 0\n", "remote.burst"),
    "remote-days-huge": ("[remote]\naudit_days = 1e300\n", "remote.audit_days"),
}


@pytest.mark.parametrize(("body", "key"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_configuration_values_fail_config_check_and_every_command(
    inst: AgentdInstance, tmp_path: Path, body: str, key: str
) -> None:
    config = tmp_path / "agentd.toml"
    paths = f'[paths]\nstate_dir = "{inst.state_dir}"\nauth_file = "{inst.auth_file}"\n'
    config.write_text(body + "\n" + ("" if "[paths]" in body else paths), encoding="utf-8")
    env = inst.env(AGENTD_CONFIG=str(config))
    for args in (("config", "check"), ("serve",), ("status",), ("token", "dexcom")):
        returncode, output = run(inst, *args, env=env)
        assert_clean(returncode, output, expected=2)
        assert key in output, (args, output)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("not a certificate\n", "client.ca_file"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "client.ca_file"),
    ],
)
def test_a_ca_file_that_is_not_pem_fails_config_check(
    inst: AgentdInstance, tmp_path: Path, body: str, key: str
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text(body, encoding="utf-8")
    env = inst.env(AGENTD_CLIENT_CA_FILE=str(bad))
    for args in (("config", "check"), ("connect", "dexcom"), ("token", "dexcom")):
        returncode, output = run(inst, *args, env=env)
        assert_clean(returncode, output, expected=2)
        assert key in output


def test_a_config_file_that_is_not_utf8_or_nested_too_deep(
    inst: AgentdInstance, tmp_path: Path
) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[server]\npublic_name = "caf\xe9"\n')
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    for config in (latin, deep):
        returncode, output = run(inst, "config", "check", env=inst.env(AGENTD_CONFIG=str(config)))
        assert_clean(returncode, output, expected=2)


# ------------------------------------------------------------- generated input


COMMANDS = {k: v for k, v in _commands().items() if k.split()[0] not in LONG_RUNNING}

NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e400", "-0", str(10**30), "9" * 5000, "0x10"]
NASTY = [
    "",
    "-",
    "--",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e400",
    str(10**30),
    "9" * 5000,
    "dexcom",
    "oura",
    "../nowhere/x",
    "%s%n%x",
    "\u202edexcom",
    "a b",
    "x" * 300,
    "\udcff",
    "1h",
    "99999999d",
    "-5m",
]


def _values(action: argparse.Action) -> st.SearchStrategy[str]:
    if action.dest in ("output", "config"):
        # file names stay inside the instance's directory (the CLI's cwd): no absolute paths
        return st.one_of(
            st.sampled_from(["out.txt", "missing/out.txt", ".", "gen"]),
            _junk().map(lambda text: "gen/" + text),
        )
    junk = _junk()
    if action.choices:
        return st.one_of(st.sampled_from([str(c) for c in action.choices]), junk)
    if action.type is not None and action.type is not str:
        # a typed option (a number, a bounded value): numbers at the edges half of the time
        return st.one_of(st.sampled_from(NUMBERS), junk)
    return junk


def _junk() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY),
        st.sampled_from(NASTY),
        st.text(
            st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40
        ),
        st.binary(max_size=20).map(
            lambda b: b.replace(b"\x00", b"").decode("utf-8", "surrogateescape")
        ),
        st.integers().map(str),
        st.floats().map(str),
    )


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    path = draw(st.sampled_from(sorted(COMMANDS)))
    parser = COMMANDS[path]
    out = path.split()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # positional: usually given
            if draw(st.integers(0, 9)):
                out.append(draw(_values(action)))
            continue
        if not draw(st.booleans()):
            continue
        out.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs != 0:
            out.append(draw(_values(action)))
    if draw(st.integers(0, 9)) == 0:
        out.insert(draw(st.integers(0, len(out))), draw(_values(parser._actions[0])))
    return out


def _run_many(inst: AgentdInstance, argvs: list[list[str]]) -> list[tuple[int, str]]:
    """Run several at once (each is a cold start); results in order."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda args: run(inst, *args), argvs))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(argv(), min_size=5, max_size=5))
def test_generated_argv_never_gives_a_traceback(
    inst: AgentdInstance, batch: list[list[str]]
) -> None:
    for args, (returncode, output) in zip(batch, _run_many(inst, batch), strict=True):
        try:
            assert_clean(returncode, output)
        except AssertionError as err:
            raise AssertionError(f"agentd {args!r}") from err


_TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=30
)
_SCALAR = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    _TEXT,
    st.sampled_from(["nan", "inf", "-1", "1e400", "", "https://", "localhost:0"]),
)
_VALUE = st.one_of(
    _SCALAR, st.lists(_SCALAR, max_size=3), st.dictionaries(_TEXT, _SCALAR, max_size=2)
)
_KEYS = [(section, key) for section, keys in SCHEMA.items() for key in keys]
#: ``who``/``providers`` lists: good entries, near misses and junk
_ACCESS_LIST = st.lists(
    st.one_of(
        st.sampled_from(
            ["tag:ci", "tag:", "tag:1x", "owner@example.com", "owner", "dexcom", "dexcon", "*"]
        ),
        _TEXT,
    ),
    max_size=3,
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    values=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUE), min_size=1, max_size=4),
    env=st.lists(st.tuples(st.sampled_from(_KEYS), _TEXT), max_size=2),
    access=st.lists(
        st.dictionaries(
            st.sampled_from(["who", "providers", "extra"]),
            st.one_of(_ACCESS_LIST, _VALUE),
            max_size=3,
        ),
        max_size=2,
    ),
)
def test_generated_configuration_never_gives_a_traceback(
    inst: AgentdInstance,
    values: list[tuple[tuple[str, str], object]],
    env: list[tuple[tuple[str, str], str]],
    access: list[dict[str, object]],
) -> None:
    base = {
        key: line
        for line in inst.config_file.read_text().splitlines()
        if "=" in line
        for key in [line.split("=", 1)[0].strip()]
    }
    sections: dict[str, dict[str, str]] = {}
    for (section, key), value in values:
        sections.setdefault(section, {})[key] = _toml_value(value)
    # keep the instance's paths unless the example overrides them
    sections.setdefault("paths", {}).setdefault("state_dir", base["state_dir"].split("=", 1)[1])
    sections["paths"].setdefault("auth_file", base["auth_file"].split("=", 1)[1])
    text = "\n".join(
        f"[{section}]\n" + "\n".join(f"{k} = {v}" for k, v in keys.items())
        for section, keys in sections.items()
    )
    for table in access:  # [[access]] tables go last: they would swallow following keys
        text += "\n[[access]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
    config = inst.root / "generated.toml"
    config.write_text(text + "\n", encoding="utf-8")
    overrides = {f"AGENTD_{s.upper()}_{k.upper()}": v for (s, k), v in env}
    environ = inst.env(AGENTD_CONFIG=str(config), **overrides)
    returncode, output = run(inst, "config", "check", env=environ)
    assert_clean(returncode, output)
    assert returncode in (0, 2)
    if returncode == 2:  # a configuration it refuses: serve refuses it as well, at once
        for args in (("serve",), ("status",)):
            code, out = run(inst, *args, env=environ)
            assert_clean(code, out, expected=2)


BAD_CATALOGS = {
    "ipv6-bracket": 'authorize_url = "https://[x"',
    "port": 'token_url = "https://h:99999/token"',
    "control-character": 'authorize_url = "https://a\\u0000b/"',
    "lifetime-nan": "access_token_lifetime = nan",
    "lifetime-huge": "access_token_lifetime = 99999999999999999999",
    "scopes-number": "scopes = 5",
    "pkce-text": 'use_pkce = "yes"',
}


@pytest.mark.parametrize("line", BAD_CATALOGS.values(), ids=BAD_CATALOGS.keys())
def test_bad_provider_catalog_values(inst: AgentdInstance, tmp_path: Path, line: str) -> None:
    config_home = tmp_path / "config"
    (config_home / "agent").mkdir(parents=True)
    (config_home / "agent" / "providers.toml").write_text(f"[providers.dexcom]\n{line}\n")
    env = inst.env(XDG_CONFIG_HOME=str(config_home))
    for args in (("providers",), ("token", "dexcom"), ("connect", "dexcom")):
        returncode, output = run(inst, *args, env=env)
        assert_clean(returncode, output, expected=2)
        assert "providers.toml: providers.dexcom." in output
