"""The resume file: which authorize messages the bot still watches, across restarts.

The ledger keeps only a hash of each flow's OAuth state, but polling
``/oauth/pending/<state>`` needs the state itself. So when the bot sends an authorize link
it notes ``flow_id -> {state, provider, chat_id, message_id}`` in
``<state dir>/telegram-flows.json`` (0600, atomic writes) and forgets it when the flow
ends. On start the runner reads it back and resumes polling; the ledger decides whether a
flow is still worth waiting for. Only the bot process writes this file. A device
authorization (RFC 8628) has no OAuth state: its entry's ``state`` is empty.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowengine.errors import TokenFileCorruptError
from flowengine.tokens import atomic_write_json, read_json_object

__all__ = ["ResumeEntry", "ResumeFile"]


@dataclass(frozen=True, slots=True)
class ResumeEntry:
    flow_id: str
    provider: str
    chat_id: int
    message_id: int | None
    state: str = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The entry as the file keeps it: every field but the flow id (the entry's key)."""
        data = asdict(self)
        del data["flow_id"]
        return data

    @classmethod
    def from_json(cls, flow_id: str, data: Any) -> ResumeEntry | None:
        if not isinstance(data, dict):
            return None
        state, provider, chat_id = data.get("state"), data.get("provider"), data.get("chat_id")
        message_id = data.get("message_id")
        if not (isinstance(state, str) and isinstance(provider, str)):
            return None
        if not isinstance(chat_id, int) or not (message_id is None or isinstance(message_id, int)):
            return None
        return cls(flow_id, provider, chat_id, message_id, state)


class ResumeFile:
    """A small JSON object keyed by flow id; unreadable entries are skipped, not fatal."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ResumeFile({str(self.path)!r})"

    def _read(self) -> dict[str, Any]:
        try:
            return read_json_object(self.path)
        except TokenFileCorruptError:
            # a broken resume file must not stop the bot: start over with a clean one
            return {}

    def load(self) -> dict[str, ResumeEntry]:
        out: dict[str, ResumeEntry] = {}
        for flow_id, data in self._read().items():
            entry = ResumeEntry.from_json(flow_id, data)
            if entry is not None:
                out[flow_id] = entry
        return out

    def put(self, entry: ResumeEntry) -> None:
        data = self._read()
        data[entry.flow_id] = entry.to_json()
        atomic_write_json(self.path, data)

    def drop(self, flow_id: str) -> None:
        data = self._read()
        if data.pop(flow_id, None) is not None:
            atomic_write_json(self.path, data)
