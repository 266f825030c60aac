"""What a user installs: SPDX license, typed packages, run-time dependencies only."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES = ("flowengine", "api", "bot", "agentd", "integrations")
#: imported only by tests, benchmarks or the demo: never a run-time dependency
NOT_AT_RUN_TIME = {"trustme", "pytest", "freezegun", "hypothesis", "ruff", "mypy", "jsonschema"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match, requirement
    return match.group(0).lower()


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    # PEP 639 metadata needs setuptools 77 or later
    (requires,) = PYPROJECT["build-system"]["requires"]
    assert requires == "setuptools>=77"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_marked_typed_and_ships_the_marker(package: str) -> None:
    assert (ROOT / package / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"][package]


def test_run_time_dependencies_hold_no_test_or_demo_package() -> None:
    runtime = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime & NOT_AT_RUN_TIME
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {_name(r) for r in extras["demo"]} == {"trustme"}
    assert "trustme" in {_name(r) for r in extras["test"]}  # the suite makes CAs too


def test_no_product_module_imports_a_test_only_package_at_import_time() -> None:
    """Importing every module of the product (the demo aside) loads none of them."""
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if name != "agentd.demo_run":
                modules.append(name)
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {NOT_AT_RUN_TIME!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


def test_demo_without_its_extra_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['trustme'] = None  # as if the demo extra were not installed\n"
        "from agentd.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: agentd demo needs the demo extra:")
    assert "agentd-oauth[demo]" in result.stderr
    assert "Traceback" not in result.stderr
