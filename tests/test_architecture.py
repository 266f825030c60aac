"""Import rules of the module map, checked on the source (ast) of every module.

- flowengine never imports the web server, the Telegram library or the packages above it;
- pure modules import only the standard library, ``transitions`` and other pure modules
  of their own package (bot's also flowengine's pure modules: bot depends on flowengine);
- api and bot never import each other;
- integrations plug in from outside: flowengine, api and bot never import ``integrations``;
  agentd (the composition root) imports only its interface, never one integration; no
  integration's name or chat command is written in the code of flowengine, api, bot or
  agentd; an integration imports the engine's public surface (``flowengine`` and its pure
  modules, e.g. ``flowengine.timefmt``) only, never api, bot or agentd, and never another
  integration;
- no import cycle between the project's modules: every import statement counts, those inside
  functions and under ``if TYPE_CHECKING:`` too (a cycle hidden by a local import is still
  one module needing the other).

Extend the data below when a module is added; the rules themselves stay put.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flowengine", "api", "bot", "agentd", "integrations")

#: modules that must stay free of I/O libraries (house style "[pure]")
PURE_MODULES: tuple[str, ...] = (
    "flowengine.states",
    "flowengine.machine",
    "flowengine.protocol",
    "flowengine.models",
    "flowengine.errors",
    "flowengine.paths",
    "flowengine.forecast",
    "flowengine.catalog",
    "flowengine.schedule",
    "flowengine.timefmt",
    "flowengine.access",
    "flowengine.ratelimit",
    "bot.dialogue",
    "bot.texts",
    "integrations.durations",
)
#: third-party packages a pure module may use
PURE_THIRD_PARTY = frozenset({"transitions"})
#: package -> top-level names it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "flowengine": frozenset(
        {"quart", "hypercorn", "telethon", "api", "bot", "agentd", "integrations"}
    ),
    "api": frozenset({"bot", "telethon", "agentd", "integrations"}),
    "bot": frozenset({"api", "quart", "hypercorn", "agentd", "integrations"}),
    "integrations": frozenset({"api", "bot", "agentd", "telethon", "hypercorn"}),
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


def project_module(imported: str) -> str | None:
    """The project module an imported name lives in (``api.app.create_app`` -> ``api.app``),
    or None for the standard library and third parties."""
    parts = imported.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (itself left out)."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        targets = {project_module(i) for i in imports_of(name)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_parser_sees_imports() -> None:
    """Guard against a vacuous check: known imports are found and resolved."""
    assert {"flowengine.states", "dataclasses", "typing"} <= imports_of("flowengine.models")
    assert "transitions" in imports_of("flowengine.machine")
    assert "aiosqlite" in imports_of("flowengine.ledger")
    if "bot.dialogue" in MODULES:
        assert "bot.texts" in imports_of("bot.dialogue")
    assert len([m for m in MODULES if top(m) == "flowengine"]) >= 10


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert sorted(cycles(graph)) == expected


def test_the_import_graph_sees_local_and_type_checking_imports() -> None:
    """Guard against a vacuous cycle check: imports inside functions and under
    ``TYPE_CHECKING`` are edges of the graph."""
    graph = import_graph()
    assert "agentd.commands" in graph["agentd.cli"]  # imported inside _run
    assert "flowengine.access" in graph["agentd.config"]  # TYPE_CHECKING and local
    assert "api.context" in graph["api.oauth"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    described = [
        "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found
    ]
    assert not found, f"import cycles: {described}"


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
        if root == "flowengine" and package in ("bot", "integrations") and imported in PURE_MODULES:
            continue  # bot/integrations -> flowengine is an allowed direction; pure stays pure
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


# ------------------------------------------------------------------- integrations


def _integration_packages() -> list[str]:
    return sorted(
        m
        for m in MODULES
        if top(m) == "integrations" and m.count(".") == 1 and MODULES[m].name == "__init__.py"
    )


def test_there_are_integrations_to_check() -> None:
    assert {"integrations.dexcom", "integrations.withings"} <= set(_integration_packages())


@pytest.mark.parametrize("name", sorted(m for m in MODULES if top(m) == "integrations"))
def test_integrations_use_the_engine_through_its_public_surface_only(name: str) -> None:
    """``from flowengine import Broker``, never ``flowengine.broker`` (the facade only; a pure
    module such as ``flowengine.timefmt`` is public too)."""
    inner = sorted(
        i for i in imports_of(name) if i.startswith("flowengine.") and i not in PURE_MODULES
    )
    assert not inner, f"{name} reaches into {inner}; import from flowengine instead"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if top(m) == "integrations"))
def test_an_integration_never_imports_another(name: str) -> None:
    parts = name.split(".")
    if len(parts) < 2 or f"integrations.{parts[1]}" not in _integration_packages():
        return  # the interface and shared helpers
    own = f"integrations.{parts[1]}"
    others = sorted(
        i
        for i in imports_of(name)
        if i.startswith("integrations.")
        and i.split(".")[:2] != own.split(".")
        and f"integrations.{i.split('.')[1]}" in _integration_packages()
    )
    assert not others, f"{name} imports {others}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if top(m) == "agentd"))
def test_the_composition_root_imports_the_interface_only(name: str) -> None:
    specific = sorted(
        i
        for i in imports_of(name)
        if top(i) == "integrations"
        and i.count(".") >= 1
        and f"integrations.{i.split('.')[1]}" in _integration_packages()
    )
    assert not specific, f"{name} imports {specific}; discover integrations instead"


def _code_words(path: Path) -> set[str]:
    """Identifiers and string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                words.update(re.findall(r"[a-z0-9_-]+", node.value.lower()))
        elif isinstance(node, ast.Name):
            words.update(node.id.lower().split("_"))
        elif isinstance(node, ast.Attribute):
            words.update(node.attr.lower().split("_"))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            words.update(node.name.lower().split("_"))
        elif isinstance(node, ast.alias):
            words.update(re.split(r"[._]", node.name.lower()))
    return words


def _integration_words() -> set[str]:
    from integrations import discover

    words: set[str] = set()
    for integration in discover():
        words.add(integration.name)
        words.update(integration.providers)
        for command in integration.chat_commands():
            words.add(command.name)
            words.update(command.aliases)
    return words


def test_the_word_list_is_not_empty() -> None:
    assert {"dexcom", "glucose", "withings", "weight"} <= _integration_words()
    assert "glucose" in _code_words(REPO / "integrations" / "dexcom" / "__init__.py")


@pytest.mark.parametrize(
    "name", sorted(m for m in MODULES if top(m) in ("flowengine", "api", "bot", "agentd"))
)
def test_no_integration_is_named_outside_integrations(name: str) -> None:
    """The CLI, the bot, the API and the engine find integrations; they never name one."""
    named = sorted(_code_words(MODULES[name]) & _integration_words())
    assert not named, f"{name} names integration(s) {named} in its code"


def test_importing_and_discovering_integrations_is_light() -> None:
    """Discovery and argparse set-up load no chart library, web framework or HTTP client."""
    code = (
        "import argparse, sys, integrations\n"
        "for i in integrations.discover():\n"
        "    i.configure_cli(argparse.ArgumentParser())\n"
        "    i.chat_commands()\n"
        "heavy = {'matplotlib', 'quart', 'httpx', 'anyio', 'aiosqlite', 'telethon'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"
