"""ChatTransport: what the runner needs from a chat service (Telegram via bot/client.py).

The runner talks to the chat only through this protocol, so the conversation can be
driven end to end with an in-memory fake in tests and with Telethon in production.
Implementations retry what is worth retrying (FloodWait, brief network trouble) and raise
:class:`TransportError` for the rest; they never raise anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from flowengine.errors import TransportError

from .dialogue import CallbackButton, UrlButton

__all__ = ["Button", "ChatTransport", "TransportError"]

Button = UrlButton | CallbackButton


class ChatTransport(Protocol):
    async def send_message(self, chat_id: int, text: str, *, buttons: Sequence[Button] = ()) -> int:
        """Send ``text`` (with one row of inline buttons); the new message's id."""
        ...

    async def edit_message(self, chat_id: int, message_id: int, text: str) -> None:
        """Replace a message's text; its inline buttons are removed."""
        ...

    async def delete_message(self, chat_id: int, message_id: int) -> bool:
        """Delete a message; False when the service would not (too old, no right)."""
        ...

    async def send_image(
        self, chat_id: int, data: bytes, *, caption: str = "", filename: str = "image.png"
    ) -> int:
        """Send a PNG with a caption; the new message's id."""
        ...

    async def answer_tap(self, query_id: int, text: str | None = None) -> None:
        """Answer a callback query (stops the button's spinner; ``text`` shows a toast)."""
        ...
