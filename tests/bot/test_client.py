"""The Telethon adapter, offline: Telethon's own client, requests and events built locally.

``OfflineClient`` is a real ``TelegramClient(None, 1, "1")`` whose single network entry
point (``_call``) answers from a script instead of a data centre, so Telethon still builds
every request (buttons, peers, random ids) exactly as it would online.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from telethon import TelegramClient, errors, events, functions, types

from bot import client as adapter
from bot import dialogue as d
from bot.client import TelethonTransport, attach, open_client, run_bot, to_inbound
from bot.dialogue import CallbackButton, Inbound, Message, Tap, UrlButton
from bot.settings import BotSettings
from bot.transport import TransportError
from flowengine.errors import ConfigError

OWNER = 4242
NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


class OfflineClient(TelegramClient):  # type: ignore[misc]
    """A TelegramClient that never touches the network."""

    def __init__(self) -> None:
        super().__init__(None, 1, "1")
        self.requests: list[Any] = []
        self.script: list[Any] = []  # exceptions to raise before answering normally
        self.next_id = 500

    async def _call(self, sender: Any, request: Any, ordered: bool = False, **_: Any) -> Any:
        self.requests.append(request)
        if isinstance(request, functions.users.GetUsersRequest):
            return [types.User(id=request.id[0].user_id, access_hash=77, first_name="Owner")]
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item
        if isinstance(request, list):
            return [self._answer(r) for r in request]
        return self._answer(request)

    def _answer(self, request: Any) -> Any:
        self.next_id += 1
        peer = types.PeerUser(OWNER)
        if isinstance(request, functions.messages.SendMessageRequest):
            return types.UpdateShortSentMessage(
                out=True, id=self.next_id, pts=1, pts_count=1, date=NOW
            )
        if isinstance(request, functions.messages.SendMediaRequest):
            message = types.Message(
                id=self.next_id, peer_id=peer, date=NOW, message=request.message, out=True
            )
            return types.Updates(
                updates=[
                    types.UpdateMessageID(id=self.next_id, random_id=request.random_id),
                    types.UpdateNewMessage(message=message, pts=2, pts_count=1),
                ],
                users=[],
                chats=[],
                date=NOW,
                seq=0,
            )
        if isinstance(request, functions.messages.EditMessageRequest):
            message = types.Message(id=request.id, peer_id=peer, date=NOW, message=request.message)
            return types.Updates(
                updates=[types.UpdateEditMessage(message=message, pts=3, pts_count=1)],
                users=[],
                chats=[],
                date=NOW,
                seq=0,
            )
        if isinstance(request, functions.messages.DeleteMessagesRequest):
            return types.messages.AffectedMessages(pts=4, pts_count=len(request.id))
        if isinstance(request, functions.upload.SaveFilePartRequest):
            return True
        if isinstance(request, functions.messages.SetBotCallbackAnswerRequest):
            return True
        if isinstance(request, functions.bots.SetBotCommandsRequest):
            bytes(request)  # serializes as Telegram's TL schema wants it
            return True
        raise AssertionError(f"unexpected request {type(request).__name__}")

    def sent(self, kind: type) -> list[Any]:
        flat = [r for item in self.requests for r in (item if isinstance(item, list) else [item])]
        return [r for r in flat if isinstance(r, kind)]


@pytest.fixture(name="client")
def _client() -> Iterator[OfflineClient]:
    client = OfflineClient()
    yield client
    client.session.close()


@pytest.fixture(name="slept")
def _slept() -> list[float]:
    return []


@pytest.fixture(name="transport")
def _transport(client: OfflineClient, slept: list[float]) -> TelethonTransport:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return TelethonTransport(client, max_flood_wait=60, network_retries=2, sleep=sleep)


# ------------------------------------------------------------------ sending


@pytest.mark.anyio
async def test_send_message_with_url_and_callback_buttons(
    client: OfflineClient, transport: TelethonTransport
) -> None:
    buttons = (
        UrlButton("Authorize Fake", "https://fake.test/authorize?state=s"),
        CallbackButton("Reconnect Fake", "connect:fake"),
    )
    message_id = await transport.send_message(OWNER, "Tap the `fake_x` button", buttons=buttons)
    assert message_id == 501
    (request,) = client.sent(functions.messages.SendMessageRequest)
    assert request.message == "Tap the `fake_x` button"
    assert not request.entities
    assert request.peer == types.InputPeerUser(OWNER, 77)
    assert request.no_webpage is True
    assert isinstance(request.reply_markup, types.ReplyInlineMarkup)
    (row,) = request.reply_markup.rows
    assert [(b.text, b.type) for b in row.buttons] == [
        ("Authorize Fake", types.InlineButtonTypeUrl(url="https://fake.test/authorize?state=s")),
        ("Reconnect Fake", types.InlineButtonTypeCallback(data=b"connect:fake")),
    ]


@pytest.mark.anyio
async def test_callback_data_over_64_bytes_is_left_out(
    client: OfflineClient, transport: TelethonTransport
) -> None:
    await transport.send_message(OWNER, "x", buttons=(CallbackButton("Long", "c:" + "p" * 63),))
    (request,) = client.sent(functions.messages.SendMessageRequest)
    assert request.reply_markup is None


@pytest.mark.anyio
async def test_edit_delete_answer_and_image(
    client: OfflineClient, transport: TelethonTransport
) -> None:
    await transport.edit_message(OWNER, 42, "❌ failed: access_denied **x**")
    (edit,) = client.sent(functions.messages.EditMessageRequest)
    assert (edit.id, edit.message, edit.reply_markup) == (
        42,
        "❌ failed: access_denied **x**",
        None,
    )
    assert not edit.entities  # plain text: no Markdown parsing

    assert await transport.delete_message(OWNER, 43) is True
    (delete,) = client.sent(functions.messages.DeleteMessagesRequest)
    assert delete.id == [43]

    await transport.answer_tap(99, "Sorry")
    (answer,) = client.sent(functions.messages.SetBotCallbackAnswerRequest)
    assert (answer.query_id, answer.message, answer.alert) == (99, "Sorry", False)

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    message_id = await transport.send_image(OWNER, png, caption="112 mg/dL ↗ _", filename="g.png")
    (media,) = client.sent(functions.messages.SendMediaRequest)
    assert message_id == client.next_id
    assert media.message == "112 mg/dL ↗ _"
    assert not media.entities
    assert isinstance(media.media, types.InputMediaUploadedPhoto)
    parts = client.sent(functions.upload.SaveFilePartRequest)
    assert b"".join(p.bytes for p in parts) == png


# ------------------------------------------------------------- flood & errors


@pytest.mark.anyio
async def test_flood_wait_is_slept_through(
    client: OfflineClient, transport: TelethonTransport, slept: list[float]
) -> None:
    client.script = [errors.FloodWaitError(None, capture=7), errors.FloodWaitError(None, 3)]
    assert await transport.send_message(OWNER, "hi") == 501
    assert slept == [7, 3]
    assert len(client.sent(functions.messages.SendMessageRequest)) == 3


@pytest.mark.anyio
async def test_a_flood_wait_too_long_gives_up(
    client: OfflineClient, transport: TelethonTransport, slept: list[float]
) -> None:
    client.script = [errors.FloodWaitError(None, capture=3600)]
    with pytest.raises(TransportError) as info:
        await transport.send_message(OWNER, "hi")
    assert info.value.retry_after == 3600
    assert slept == []


@pytest.mark.anyio
async def test_network_errors_are_retried_then_reported(
    client: OfflineClient, transport: TelethonTransport, slept: list[float]
) -> None:
    client.script = [ConnectionError("reset"), OSError("unreachable")]
    assert await transport.send_message(OWNER, "hi") == 501
    assert slept == [2.0, 4.0]

    slept.clear()
    client.script = [ConnectionError(), ConnectionError(), ConnectionError()]
    with pytest.raises(TransportError, match="network error ConnectionError"):
        await transport.send_message(OWNER, "hi")
    assert slept == [2.0, 4.0]


@pytest.mark.anyio
async def test_telegram_errors_become_transport_errors(
    client: OfflineClient, transport: TelethonTransport
) -> None:
    client.script = [errors.UserIsBlockedError(None)]
    with pytest.raises(TransportError, match="UserIsBlockedError"):
        await transport.send_message(OWNER, "hi")
    # an unchanged edit is fine, a vanished message is not
    client.script = [errors.MessageNotModifiedError(None)]
    await transport.edit_message(OWNER, 42, "same")
    client.script = [errors.MessageIdInvalidError(None)]
    with pytest.raises(TransportError):
        await transport.edit_message(OWNER, 42, "gone")
    # a message that may not be deleted is reported, not raised
    client.script = [errors.MessageDeleteForbiddenError(None)]
    assert await transport.delete_message(OWNER, 43) is False
    client.script = [[types.messages.AffectedMessages(pts=4, pts_count=0)]]
    assert await transport.delete_message(OWNER, 43) is False
    # an expired callback query is only logged
    client.script = [errors.QueryIdInvalidError(None)]
    await transport.answer_tap(99)


# ------------------------------------------------------------------- events in


def _message_event(client: OfflineClient, text: str, *, group: bool = False) -> Any:
    if group:
        message = types.Message(
            id=8,
            peer_id=types.PeerChat(555),
            from_id=types.PeerUser(OWNER),
            date=NOW,
            message=text,
        )
    else:  # in a private chat Telegram sends no from_id: the peer is the sender
        message = types.Message(id=7, peer_id=types.PeerUser(OWNER), date=NOW, message=text)
    event = events.NewMessage.Event(message)
    event._set_client(client)
    return event


def _tap_event(client: OfflineClient, data: bytes) -> Any:
    update = types.UpdateBotCallbackQuery(
        query_id=99,
        user_id=OWNER,
        peer=types.PeerUser(OWNER),
        msg_id=12,
        chat_instance=1,
        data=data,
    )
    event = events.CallbackQuery.build(update)
    event._set_client(client)
    return event


def test_to_inbound_private_and_group_messages(client: OfflineClient) -> None:
    assert to_inbound(_message_event(client, "connect fake")) == Message(
        OWNER, OWNER, 7, "connect fake"
    )
    assert to_inbound(_message_event(client, "/status", group=True)) == Message(
        -555, OWNER, 8, "/status"
    )


def test_to_inbound_callback_query(client: OfflineClient) -> None:
    assert to_inbound(_tap_event(client, b"connect:fake")) == Tap(
        OWNER, OWNER, 12, 99, "connect:fake"
    )


def test_outgoing_messages_and_other_objects_are_ignored(client: OfflineClient) -> None:
    message = types.Message(id=9, peer_id=types.PeerUser(OWNER), date=NOW, message="x", out=True)
    event = events.NewMessage.Event(message)
    event._set_client(client)
    assert to_inbound(event) is None
    assert to_inbound(object()) is None


@pytest.mark.anyio
async def test_attach_registers_handlers_that_dispatch(client: OfflineClient) -> None:
    got: list[Inbound] = []

    async def dispatch(inbound: Inbound) -> None:
        got.append(inbound)

    (handler,) = attach(client, dispatch)
    registered = client.list_event_handlers()
    assert {type(builder) for _, builder in registered} == {
        events.NewMessage,
        events.CallbackQuery,
    }
    await handler(_message_event(client, "help"))
    await handler(_tap_event(client, b"connect:fake"))
    assert got == [Message(OWNER, OWNER, 7, "help"), Tap(OWNER, OWNER, 12, 99, "connect:fake")]


# ---------------------------------------------------------------------- run_bot


def _settings(tmp_path: Path, **overrides: Any) -> BotSettings:
    values: dict[str, Any] = {
        "bot_token": "123:bot-token-value",
        "api_id": 1,
        "api_hash": "hash-value",
        "owner_ids": frozenset({OWNER}),
        "redirect_uri": "http://127.0.0.1:9/oauth/callback",
        "session_path": tmp_path / "state" / "telegram.session",
        "resume_path": tmp_path / "state" / "telegram-flows.json",
    }
    values.update(overrides)
    return BotSettings(**values)


def test_settings_hide_secrets_and_list_problems(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.check() is settings
    for secret in ("bot-token-value", "hash-value"):
        assert secret not in repr(settings)
    bad = _settings(tmp_path, bot_token="", api_id=0, owner_ids=frozenset())
    with pytest.raises(ConfigError) as info:
        bad.check()
    assert "telegram.bot_token" in info.value.message
    assert "telegram.api_id" in info.value.message
    assert "telegram.owner_ids" in info.value.message


def test_settings_from_config_values(tmp_path: Path) -> None:
    telegram = SimpleNamespace(
        bot_token="t", api_id=5, api_hash="h", owner_ids=[1, "2"], timezone="Europe/Berlin"
    )
    settings = BotSettings.from_config(
        telegram, redirect_uri="https://host.ts.net:8400/oauth/callback", state_dir=tmp_path
    )
    assert settings.owner_ids == {1, 2}
    assert settings.session_path == tmp_path / "telegram.session"
    assert settings.resume_path == tmp_path / "telegram-flows.json"
    assert settings.timezone == "Europe/Berlin"
    with pytest.raises(ConfigError, match="not a Telegram user id"):
        BotSettings.from_config(
            SimpleNamespace(**{**vars(telegram), "owner_ids": ["me"]}), redirect_uri=""
        )


def test_settings_from_env(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path),
        "AGENTD_STATE_DIR": str(tmp_path / "st"),
        "AGENTD_TELEGRAM_BOT_TOKEN": "t",
        "AGENTD_TELEGRAM_API_ID": "9",
        "AGENTD_TELEGRAM_API_HASH": "h",
        "AGENTD_TELEGRAM_OWNER_IDS": "1, 2",
        "AGENTD_SERVER_REDIRECT_URI": "https://h:8400/oauth/callback",
    }
    settings = BotSettings.from_env(env)
    assert settings.check() is settings
    assert (settings.api_id, settings.owner_ids) == (9, frozenset({1, 2}))
    assert settings.session_path == tmp_path / "st" / "telegram.session"


def test_open_client_keeps_the_session_private(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    client = open_client(settings)
    try:
        assert settings.session_path.exists()
        assert stat.S_IMODE(os.stat(settings.session_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(settings.session_path.parent).st_mode) == 0o700
    finally:
        client.session.close()


class LoopClient(OfflineClient):
    """Logs in (failing once), then stays connected until told to drop."""

    def __init__(self) -> None:
        super().__init__()
        self.logins: list[str] = []
        self.fail_logins = 2
        self.drop = anyio.Event()

    async def start(self, *, bot_token: str) -> LoopClient:  # type: ignore[override]
        self.logins.append(bot_token)
        if self.fail_logins:
            self.fail_logins -= 1
            raise ConnectionError("no route") if self.fail_logins else RuntimeError("odd")
        return self

    async def run_until_disconnected(self) -> None:  # type: ignore[override]
        await self.drop.wait()
        self.drop = anyio.Event()

    async def disconnect(self) -> None:  # type: ignore[override]
        return None


@pytest.mark.anyio
async def test_run_bot_logs_in_retries_and_serves(tmp_path: Path) -> None:
    from flowengine.broker import Broker
    from flowengine.catalog import Catalog
    from flowengine.credentials import CredentialStore
    from flowengine.engine import FlowEngine
    from flowengine.tokens import TokenStore

    settings = _settings(tmp_path)
    engine = await FlowEngine.open(tmp_path / "ledger.sqlite3")
    broker = Broker(
        engine,
        catalog=Catalog(),
        credentials=CredentialStore(tmp_path / "creds.json"),
        tokens=TokenStore(tmp_path / "auth.json"),
    )
    client = LoopClient()
    try:
        async with anyio.create_task_group() as tg:
            runner = await tg.start(
                lambda task_status: run_bot(
                    settings,
                    broker=broker,
                    engine=engine,
                    client=client,
                    backoff=0.01,
                    task_status=task_status,
                )
            )
            # handed over before the login; serving once logged in (after two failures)
            with anyio.fail_after(30):
                while len(client.logins) < 3:
                    await anyio.sleep(0.01)
            assert client.logins == ["123:bot-token-value"] * 3
            # the "/" menu is the dialogue's command table, set once after the login
            (menu,) = client.sent(functions.bots.SetBotCommandsRequest)
            assert isinstance(menu.scope, types.BotCommandScopeDefault)
            assert menu.lang_code == ""
            assert [(c.command, c.description) for c in menu.commands] == d.menu(runner.state)
            assert [c.command for c in menu.commands] == [
                "connect", "connections", "disconnect", "flows", "cancel", "audit", "help"
            ]  # fmt: skip
            # an owner's message goes through the registered handler to the runner
            ((handler, _), *_) = client.list_event_handlers()
            await handler(_message_event(client, "help"))
            (send,) = client.sent(functions.messages.SendMessageRequest)
            assert send.message.startswith("I connect your agent")
            # a dropped connection logs in again
            client.drop.set()
            with anyio.fail_after(30):
                while len(client.logins) < 4:
                    await anyio.sleep(0.01)
            assert runner.watching == []
            tg.cancel_scope.cancel()
    finally:
        await engine.close()
        client.session.close()


@pytest.mark.anyio
async def test_a_refused_menu_is_logged_not_fatal(
    client: OfflineClient, caplog: pytest.LogCaptureFixture
) -> None:
    client.script.append(errors.BotCommandInvalidError(request=None))
    assert await adapter.set_menu(client, [("connect", "authorize a provider")]) is False
    assert "command menu not set: BotCommandInvalidError" in caplog.text
    assert await adapter.set_menu(client, [("connect", "authorize a provider")]) is True


def test_telethon_is_imported_only_by_the_adapter() -> None:
    bot_dir = Path(adapter.__file__).parent
    importers = sorted(
        p.name
        for p in bot_dir.glob("*.py")
        if "telethon" in p.read_text(encoding="utf-8")
        and ("import telethon" in p.read_text() or "from telethon" in p.read_text())
    )
    assert importers == ["client.py"]
