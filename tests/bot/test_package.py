"""The bot package's surface, and the purity of its conversation modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bot


@pytest.mark.parametrize("name", bot.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(bot, name).__name__ == name


def test_unknown_name_raises() -> None:
    with pytest.raises(AttributeError):
        _ = bot.nothing_here  # type: ignore[attr-defined]


def test_dialogue_and_texts_import_no_io_library() -> None:
    code = (
        "import sys, bot.dialogue, bot.texts\n"
        "heavy = {'telethon', 'httpx', 'anyio', 'aiosqlite', 'quart', 'hypercorn'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
