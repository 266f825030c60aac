"""The Telethon adapter: the only module that imports telethon.

* :class:`TelethonTransport` implements :class:`~bot.transport.ChatTransport` on a
  ``TelegramClient`` logged in as a bot: inline URL / callback buttons, edits, deletes,
  images, callback answers; texts go out as plain text (no Markdown parsing, so ids like
  ``access_denied`` stay as they are). FloodWait is slept through (up to ``max_flood_wait`` seconds,
  then :class:`~bot.transport.TransportError`); network trouble is retried briefly; every
  other Telegram error becomes a TransportError. Nothing else escapes.
* :func:`to_inbound` turns a NewMessage / CallbackQuery event into a dialogue inbound;
  :func:`attach` registers the two handlers that pass them to the runner.
* :func:`set_menu` offers the dialogue's command table in Telegram's "/" menu.
* :func:`run_bot` logs in (session file in the state dir, 0600), sets the menu, runs the
  :class:`~bot.runner.BotRunner` and reconnects with backoff until cancelled; it fits in
  an anyio task group next to the daemon's server and timer.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from telethon import Button, TelegramClient, errors, events, functions, types

from flowengine.broker import Broker
from flowengine.engine import FlowEngine

from . import dialogue as d
from .runner import BotRunner, ChatCommandHandler
from .settings import BotSettings
from .transport import Button as ButtonSpec
from .transport import TransportError

__all__ = ["TelethonTransport", "attach", "open_client", "run_bot", "set_menu", "to_inbound"]

log = logging.getLogger("bot.telegram")

#: Telegram's limit on callback data
_MAX_CALLBACK_DATA = 64
_NETWORK_ERRORS = (ConnectionError, OSError, TimeoutError)

Sleep = Callable[[float], Awaitable[Any]]


def _markup(buttons: Sequence[ButtonSpec]) -> list[Any] | None:
    """One row of Telethon buttons; callback data too long for Telegram is left out."""
    row: list[Any] = []
    for spec in buttons:
        if isinstance(spec, d.UrlButton):
            row.append(Button.url(spec.text, spec.url))
        else:
            data = spec.data.encode("utf-8")
            if len(data) > _MAX_CALLBACK_DATA:
                log.warning("button %r left out: callback data over 64 bytes", spec.text)
                continue
            row.append(Button.inline(spec.text, data))
    return [row] if row else None


class TelethonTransport:
    """ChatTransport over a connected Telethon client."""

    def __init__(
        self,
        client: TelegramClient,
        *,
        max_flood_wait: float = 300.0,
        network_retries: int = 3,
        retry_delay: float = 2.0,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self.client = client
        self.max_flood_wait = max_flood_wait
        self.network_retries = network_retries
        self.retry_delay = retry_delay
        self._sleep = sleep

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Telegram request with FloodWait and network retries."""
        network_failures = 0
        while True:
            try:
                return await fn()
            except errors.FloodWaitError as err:
                if err.seconds > self.max_flood_wait:
                    raise TransportError(
                        f"{what}: Telegram asks to wait {err.seconds} s", retry_after=err.seconds
                    ) from err
                log.warning("%s: flood wait of %s s", what, err.seconds)
                await self._sleep(err.seconds)
            except errors.RPCError as err:
                raise TransportError(f"{what}: {type(err).__name__}") from err
            except _NETWORK_ERRORS as err:
                network_failures += 1
                if network_failures > self.network_retries:
                    raise TransportError(f"{what}: network error {type(err).__name__}") from err
                log.warning("%s: network error %s, retrying", what, type(err).__name__)
                await self._sleep(self.retry_delay * network_failures)

    async def send_message(
        self, chat_id: int, text: str, *, buttons: Sequence[ButtonSpec] = ()
    ) -> int:
        markup = _markup(buttons)
        message = await self._call(
            "send_message",
            lambda: self.client.send_message(
                chat_id, text, buttons=markup, link_preview=False, parse_mode=None
            ),
        )
        return int(message.id)

    async def edit_message(self, chat_id: int, message_id: int, text: str) -> None:
        try:
            await self._call(
                "edit_message",
                lambda: self.client.edit_message(
                    chat_id, message_id, text, link_preview=False, parse_mode=None
                ),
            )
        except TransportError as err:
            if isinstance(err.__cause__, errors.MessageNotModifiedError):
                return  # it already says so (e.g. re-reported after a restart)
            raise

    async def delete_message(self, chat_id: int, message_id: int) -> bool:
        try:
            affected = await self._call(
                "delete_message", lambda: self.client.delete_messages(chat_id, [message_id])
            )
        except TransportError as err:
            if isinstance(err.__cause__, errors.RPCError):
                return False  # too old, or no right to delete it
            raise
        return sum(getattr(a, "pts_count", 0) for a in affected or ()) > 0

    async def send_image(
        self, chat_id: int, data: bytes, *, caption: str = "", filename: str = "image.png"
    ) -> int:
        def upload() -> Any:
            stream = io.BytesIO(data)
            stream.name = filename
            return self.client.send_file(
                chat_id, stream, caption=caption, force_document=False, parse_mode=None
            )

        message = await self._call("send_image", upload)
        return int(message.id)

    async def answer_tap(self, query_id: int, text: str | None = None) -> None:
        request = functions.messages.SetBotCallbackAnswerRequest(
            query_id=query_id, cache_time=0, message=text, alert=False
        )
        try:
            await self._call("answer_tap", lambda: self.client(request))
        except TransportError as err:
            # an expired query only means the spinner stopped on its own
            log.info("callback answer not delivered: %s", err.message)


# ------------------------------------------------------------------ events in


def to_inbound(event: Any) -> d.Message | d.Tap | None:
    """A NewMessage or CallbackQuery event as a dialogue inbound (None: not for us)."""
    if isinstance(event, events.CallbackQuery.Event):
        data = event.data or b""
        return d.Tap(
            chat_id=int(event.chat_id or event.sender_id or 0),
            sender_id=int(event.sender_id or 0),
            message_id=int(event.message_id or 0),
            query_id=int(event.query.query_id),
            data=data.decode("utf-8", errors="replace"),
        )
    if isinstance(event, events.NewMessage.Event):
        message = event.message
        if message.out:
            return None
        return d.Message(
            chat_id=int(event.chat_id or 0),
            sender_id=int(message.sender_id or 0),
            message_id=int(message.id),
            text=message.raw_text or "",
        )
    return None


Dispatch = Callable[[d.Inbound], Awaitable[None]]


def attach(client: TelegramClient, dispatch: Dispatch) -> list[Callable[[Any], Awaitable[None]]]:
    """Register the NewMessage and CallbackQuery handlers; returns them (for removal)."""

    async def on_event(event: Any) -> None:
        try:
            inbound = to_inbound(event)
        except Exception:  # noqa: BLE001 - a malformed update must not kill the loop
            log.exception("could not read a Telegram update")
            return
        if inbound is not None:
            await dispatch(inbound)

    client.add_event_handler(on_event, events.NewMessage(incoming=True))
    client.add_event_handler(on_event, events.CallbackQuery())
    return [on_event]


# --------------------------------------------------------------------- running


async def set_menu(client: TelegramClient, commands: Sequence[tuple[str, str]]) -> bool:
    """Offer the command table in Telegram's "/" menu (bots.setBotCommands, default scope,
    every language); False when Telegram refused or could not be reached (logged)."""
    request = functions.bots.SetBotCommandsRequest(
        scope=types.BotCommandScopeDefault(),
        lang_code="",
        commands=[types.BotCommand(command=name, description=text) for name, text in commands],
    )
    try:
        await client(request)
    except (errors.RPCError, *_NETWORK_ERRORS) as err:
        log.warning("command menu not set: %s", type(err).__name__)
        return False
    log.info("command menu set: %s", ", ".join(name for name, _ in commands))
    return True


def _private_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def open_client(settings: BotSettings) -> TelegramClient:
    """A client with its SQLite session in the state dir (0600); not connected yet."""
    _private_file(settings.session_path)
    return TelegramClient(
        str(settings.session_path),
        settings.api_id,
        settings.api_hash,
        connection_retries=-1,  # keep trying; run_bot adds its own backoff on top
        auto_reconnect=True,
        flood_sleep_threshold=30,
    )


async def run_bot(
    settings: BotSettings,
    *,
    broker: Broker,
    engine: FlowEngine,
    commands: Sequence[ChatCommandHandler] = (),
    client: TelegramClient | None = None,
    backoff: float = 1.0,
    max_backoff: float = 300.0,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the bot until cancelled: log in, serve the owners, reconnect after failures.

    ``task_status.started(runner)`` hands the BotRunner over at once, before the login,
    so a daemon starting the bot in its task group never waits for Telegram; the runner's
    own loop (resumed flows, notifications) starts after the first successful login.
    """
    settings.check()
    tg_client = client or open_client(settings)
    transport = TelethonTransport(tg_client, max_flood_wait=settings.max_flood_wait)
    runner = BotRunner(
        transport,
        broker=broker,
        engine=engine,
        owners=settings.owner_ids,
        redirect_uri=settings.redirect_uri,
        resume_path=settings.resume_path,
        commands=commands,
        tz=settings.timezone,
        notify_interval=settings.notify_interval,
    )
    attach(tg_client, runner.handle)
    task_status.started(runner)
    started = False
    first_backoff = backoff
    try:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    await tg_client.start(bot_token=settings.bot_token)
                    if settings.session_path.exists():
                        os.chmod(settings.session_path, 0o600)
                    if not started:
                        await set_menu(tg_client, d.menu(runner.state))
                        await tg.start(runner.run)
                        started = True
                        log.info("telegram bot running for %d owner(s)", len(settings.owner_ids))
                    backoff = first_backoff
                    await tg_client.run_until_disconnected()
                    log.warning("telegram connection closed; reconnecting")
                except (errors.RPCError, *_NETWORK_ERRORS) as err:
                    log.warning("telegram: %s; retrying in %.0f s", type(err).__name__, backoff)
                except Exception:  # noqa: BLE001 - the bot keeps trying; cancellation still ends it
                    log.exception("telegram client failed; retrying in %.0f s", backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await tg_client.disconnect()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("disconnect failed", exc_info=True)
