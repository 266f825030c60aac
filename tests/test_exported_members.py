"""flowengine's public surface: one sorted, unique ``__all__`` whose names all resolve lazily."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import flowengine


def test_all_is_sorted_and_unique() -> None:
    names = flowengine.__all__
    assert len(names) == len(set(names)), "duplicate names in flowengine.__all__"
    assert names == sorted(names), "flowengine.__all__ is not sorted"


@pytest.mark.parametrize("name", flowengine.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    value = getattr(flowengine, name)
    assert value is not None
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__name__ == name
        assert value.__module__.startswith("flowengine."), value.__module__
        home = sys.modules[value.__module__]
        assert getattr(home, name) is value
        # the defining module lists it in its own __all__ when it has one
        if hasattr(home, "__all__"):
            assert name in home.__all__, f"{value.__module__}.__all__ lacks {name}"


def test_dir_lists_the_public_names() -> None:
    assert set(flowengine.__all__) <= set(dir(flowengine))


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = flowengine.nothing_here  # type: ignore[attr-defined]
    assert not hasattr(flowengine, "_private")


def test_importing_the_package_is_light() -> None:
    """Names load on first use: ``import flowengine`` pulls in no I/O library."""
    code = (
        "import sys, flowengine\n"
        "heavy = {'aiosqlite', 'anyio', 'httpx', 'authlib', 'transitions'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
        "flowengine.FlowState\n"
        "print('aiosqlite' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["[]", "False"]
