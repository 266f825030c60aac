"""Every subcommand's ``--help`` explains itself; ``--version``; ``python -m agentd``."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from agentd.cli import build_parser
from agentd.exits import EXIT_MEANINGS

ROOT = Path(__file__).resolve().parents[2]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


SUBCOMMANDS = _subcommands()


def test_every_readme_command_has_a_parser() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"^\| `agentd (\w+)", readme, re.MULTILINE))
    assert named <= set(SUBCOMMANDS)
    assert {"serve", "connect", "token", "status", "config", "providers"} <= named


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_help_has_a_description_an_example_and_exit_codes(name: str) -> None:
    text = SUBCOMMANDS[name].format_help()
    assert SUBCOMMANDS[name].description, name
    example = text.split("examples:\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(rf"^  (agentd {name}\b|make |sudo |curl |pass )", example, re.M), text
    codes = text.split("exit codes:\n", 1)[1]
    assert codes.startswith(f"  0    {EXIT_MEANINGS[0]}\n"), text
    assert "1, 130, 141: as for every command" in codes


@pytest.mark.parametrize(
    ("name", "default"),
    [("connect", "(default: 600)"), ("flows", "(default: 20)"), ("diagram", "(default: mermaid")],
)
def test_help_names_the_defaults(name: str, default: str) -> None:
    assert default in " ".join(SUBCOMMANDS[name].format_help().split())


def test_top_level_help_lists_every_exit_code() -> None:
    text = build_parser().format_help()
    for code, meaning in EXIT_MEANINGS.items():
        assert f"  {code:<3}  {meaning}" in text


def test_version_and_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentd", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"agentd {version('agentd-oauth')} (Python ")
    usage = subprocess.run(
        [sys.executable, "-m", "agentd", "frobnicate"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert usage.returncode == 2
    assert usage.stderr.startswith("error: argument COMMAND: invalid choice: 'frobnicate'")
