"""Import rules of the module map, checked on the source (ast) of every module.

- flowengine never imports the web server, the Telegram library or the packages above it;
- pure modules import only the standard library, ``transitions`` and other pure modules
  of their own package;
- api and bot never import each other.

Extend the data below when a module is added; the rules themselves stay put.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flowengine", "api", "bot", "agentd")

#: modules that must stay free of I/O libraries (house style "[pure]")
PURE_MODULES: tuple[str, ...] = (
    "flowengine.states",
    "flowengine.machine",
    "flowengine.protocol",
    "flowengine.models",
    "flowengine.errors",
    "flowengine.paths",
    "bot.dialogue",
    "bot.texts",
)
#: third-party packages a pure module may use
PURE_THIRD_PARTY = frozenset({"transitions"})
#: package -> top-level names it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "flowengine": frozenset({"quart", "hypercorn", "telethon", "api", "bot", "agentd"}),
    "api": frozenset({"bot", "telethon", "agentd"}),
    "bot": frozenset({"api", "quart", "hypercorn", "agentd"}),
}
#: I/O libraries a pure module would drag in (checked at run time too)
IO_LIBRARIES = ("aiosqlite", "anyio", "httpx", "quart", "hypercorn", "telethon", "authlib")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        root = REPO / package
        if root.is_dir():
            for path in sorted(root.rglob("*.py")):
                found[module_name(path)] = path
    return found


MODULES = all_modules()


def imports_of(name: str) -> set[str]:
    """Absolute names of every module ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                assert node.module is not None
                target = node.module
            for alias in node.names:
                # "from . import texts" imports the submodule bot.texts, not a name of bot
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in MODULES else target)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_parser_sees_imports() -> None:
    """Guard against a vacuous check: known imports are found and resolved."""
    assert {"flowengine.states", "dataclasses", "typing"} <= imports_of("flowengine.models")
    assert "transitions" in imports_of("flowengine.machine")
    assert "aiosqlite" in imports_of("flowengine.ledger")
    if "bot.dialogue" in MODULES:
        assert "bot.texts" in imports_of("bot.dialogue")
    assert len([m for m in MODULES if top(m) == "flowengine"]) >= 10


@pytest.mark.parametrize("name", sorted(m for m in MODULES if top(m) in FORBIDDEN))
def test_no_forbidden_imports(name: str) -> None:
    bad = sorted(i for i in imports_of(name) if top(i) in FORBIDDEN[top(name)])
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_modules_import_only_stdlib_transitions_and_pure_siblings(name: str) -> None:
    if name not in MODULES:
        pytest.skip(f"{name} does not exist (yet)")
    package = top(name)
    bad = []
    for imported in sorted(imports_of(name)):
        root = top(imported)
        if root == "__future__" or root in sys.stdlib_module_names or root in PURE_THIRD_PARTY:
            continue
        if root == package and (imported == package or imported in PURE_MODULES):
            # the package itself: only its pure modules, never its lazy __init__ re-exports
            if imported == package:
                bad.append(imported)
            continue
        bad.append(imported)
    assert not bad, f"pure module {name} imports {bad}"


def test_pure_modules_load_no_io_library() -> None:
    """At run time too: importing every pure module leaves the I/O libraries unloaded."""
    present = [m for m in PURE_MODULES if m in MODULES]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in present)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(IO_LIBRARIES)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"


def test_every_pure_module_is_marked_pure_in_its_docstring() -> None:
    for name in PURE_MODULES:
        if name in MODULES and top(name) == "flowengine":
            doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8"))) or ""
            assert "[pure]" in doc, f"{name} docstring lacks the [pure] mark"
