"""Bot fixtures: an in-memory chat, the real API served by Hypercorn on 127.0.0.1, a fake
provider behind the broker, and a BotRunner wired to all three.

``rig.running()`` is one daemon process: one FlowEngine and Broker shared by the API (which
exchanges codes as their callbacks arrive) and the bot (which waits on the engine's
in-process wake-up), plus the engine's watcher for other processes' commits. The port and
the redirect URI stay the same across restarts of the rig's daemon.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from api.app import create_app
from api.serve import serve
from api.settings import ApiSettings
from bot.dialogue import CallbackButton, Message, Tap, UrlButton
from bot.runner import BotRunner, ChatCommandHandler
from bot.transport import Button, TransportError
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.credentials import CredentialStore
from flowengine.engine import FlowEngine
from flowengine.protocol import code_challenge
from flowengine.tokens import TokenStore
from tests.fakes import FakeProvider

OWNER = 4242
STRANGER = 666
API_TOKEN = "bot-test-api-token-0123456789"


# ---------------------------------------------------------------- the chat


@dataclass
class ChatMessage:
    id: int
    chat_id: int
    text: str
    buttons: tuple[Button, ...] = ()
    edits: list[str] = field(default_factory=list)
    deleted: bool = False
    image: bytes | None = None
    from_bot: bool = True

    @property
    def current(self) -> str:
        return self.edits[-1] if self.edits else self.text


class FakeChat:
    """ChatTransport in memory: what the bot sent, edited, deleted and answered."""

    def __init__(self) -> None:
        self.messages: dict[int, ChatMessage] = {}
        self.answers: list[tuple[int, str | None]] = []
        self.fail_sends = 0
        self.can_delete = True
        self._ids = itertools.count(1000)
        self._changed = anyio.Event()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # ChatTransport
    async def send_message(self, chat_id: int, text: str, *, buttons: Sequence[Button] = ()) -> int:
        if self.fail_sends:
            self.fail_sends -= 1
            raise TransportError("send_message: network error ConnectionError")
        mid = next(self._ids)
        self.messages[mid] = ChatMessage(mid, chat_id, text, tuple(buttons))
        self._touch()
        return mid

    async def edit_message(self, chat_id: int, message_id: int, text: str) -> None:
        message = self.messages.get(message_id)
        if message is None or message.chat_id != chat_id:
            raise TransportError("edit_message: MessageIdInvalidError")
        message.edits.append(text)
        message.buttons = ()
        self._touch()

    async def delete_message(self, chat_id: int, message_id: int) -> bool:
        message = self.messages.get(message_id)
        if message is None or not self.can_delete:
            return False
        message.deleted = True
        self._touch()
        return True

    async def send_image(
        self, chat_id: int, data: bytes, *, caption: str = "", filename: str = "image.png"
    ) -> int:
        mid = next(self._ids)
        self.messages[mid] = ChatMessage(mid, chat_id, caption, image=data)
        self._touch()
        return mid

    async def answer_tap(self, query_id: int, text: str | None = None) -> None:
        self.answers.append((query_id, text))

    # what the owner does
    def incoming(self, chat_id: int, text: str) -> ChatMessage:
        mid = next(self._ids)
        message = ChatMessage(mid, chat_id, text, from_bot=False)
        self.messages[mid] = message
        return message

    # looking
    def sent(self, chat_id: int | None = None) -> list[ChatMessage]:
        return [
            m
            for m in self.messages.values()
            if m.from_bot and (chat_id is None or m.chat_id == chat_id)
        ]

    def texts(self, chat_id: int | None = None) -> list[str]:
        return [m.current for m in self.sent(chat_id)]

    async def wait_for(self, predicate: Callable[[], Any], *, timeout: float = 15.0) -> Any:
        with anyio.fail_after(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                await self._changed.wait()

    async def wait_message(
        self, predicate: Callable[[ChatMessage], bool], *, timeout: float = 15.0
    ) -> ChatMessage:
        def find() -> ChatMessage | None:
            for m in self.sent():
                if predicate(m):
                    return m
            return None

        return await self.wait_for(find, timeout=timeout)  # type: ignore[no-any-return]


def url_button(message: ChatMessage) -> UrlButton:
    buttons = [b for b in message.buttons if isinstance(b, UrlButton)]
    assert len(buttons) == 1, message
    return buttons[0]


def callback_button(message: ChatMessage) -> CallbackButton:
    buttons = [b for b in message.buttons if isinstance(b, CallbackButton)]
    assert len(buttons) == 1, message
    return buttons[0]


# ------------------------------------------------------------------ the daemon


@dataclass
class Daemon:
    base_url: str
    redirect_uri: str
    engine: FlowEngine


@asynccontextmanager
async def serve_daemon(
    engine: FlowEngine, catalog: Catalog, broker: Broker | None, port: int
) -> AsyncIterator[Daemon]:
    """The real API app (plain-test mode) on 127.0.0.1:``port``, completing flows."""
    settings = ApiSettings(mode="plain-test", host="127.0.0.1", port=port, api_token=API_TOKEN)
    redirect = f"http://127.0.0.1:{port}/oauth/callback"
    app = create_app(
        engine, settings=settings, catalog=catalog, broker=broker, redirect_uri=redirect
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        plan = await tg.start(
            lambda task_status: serve(
                app, settings, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        tg.start_soon(engine.watch_external)
        try:
            yield Daemon(plan.base_url, plan.redirect_uri, engine)
        finally:
            stop.set()
            tg.cancel_scope.cancel()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------- the bot


@dataclass
class BotRig:
    tmp: Path
    chat: FakeChat
    fake: FakeProvider
    catalog: Catalog
    http: httpx.AsyncClient  # the owner's browser
    provider_http: httpx.AsyncClient  # the broker's client to the fake provider
    credentials: CredentialStore
    tokens: TokenStore
    port: int = field(default_factory=_free_port)
    engine: FlowEngine | None = None
    broker: Broker | None = None
    runner: BotRunner | None = None
    daemon: Daemon | None = None
    awaiting_ttl: float = 600.0
    #: integration chat commands, made from the running broker and engine
    commands: Callable[[Broker, FlowEngine], Sequence[ChatCommandHandler]] | None = None
    _scope: anyio.CancelScope | None = None

    @property
    def ledger(self) -> Path:
        return self.tmp / "ledger.sqlite3"

    @property
    def resume_path(self) -> Path:
        return self.tmp / "state" / "telegram-flows.json"

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth/callback"

    @asynccontextmanager
    async def _daemon(
        self, *, bot: bool = True
    ) -> AsyncIterator[tuple[FlowEngine, Broker, Daemon]]:
        engine = await FlowEngine.open(
            self.ledger, awaiting_ttl=self.awaiting_ttl, poll_interval=0.05
        )
        broker = Broker(
            engine,
            catalog=self.catalog,
            credentials=self.credentials,
            tokens=self.tokens,
            http=self.provider_http,
        )
        try:
            async with serve_daemon(engine, self.catalog, broker, self.port) as daemon:
                yield engine, broker, daemon
        finally:
            await engine.close()

    @asynccontextmanager
    async def running(
        self,
        before_run: Callable[[], Awaitable[None]] | None = None,
        **runner_options: Any,
    ) -> AsyncIterator[BotRunner]:
        """The daemon process with its bot: API, engine, broker and runner running."""
        async with self._daemon() as (engine, broker, daemon):
            options: dict[str, Any] = {
                "owners": {OWNER},
                "redirect_uri": daemon.redirect_uri,
                "resume_path": self.resume_path,
                "commands": self.commands(broker, engine) if self.commands else (),
                "notify_interval": 3600.0,
            }
            options.update(runner_options)
            runner = BotRunner(self.chat, broker=broker, engine=engine, **options)
            self.engine, self.broker, self.runner, self.daemon = engine, broker, runner, daemon
            try:
                if before_run is not None:
                    await before_run()  # updates handled before run() starts
                async with anyio.create_task_group() as tg:
                    await tg.start(runner.run)
                    try:
                        yield runner
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                self.daemon = None

    async def say(self, text: str, *, sender: int = OWNER, chat_id: int | None = None) -> int:
        """The owner (or ``sender``) writes to the bot; returns the message id."""
        assert self.runner is not None
        chat = sender if chat_id is None else chat_id
        message = self.chat.incoming(chat, text)
        await self.runner.handle(Message(chat, sender, message.id, text))
        return message.id

    async def tap(self, message: ChatMessage, *, sender: int = OWNER, query_id: int = 1) -> None:
        assert self.runner is not None
        data = callback_button(message).data
        await self.runner.handle(Tap(message.chat_id, sender, message.id, query_id, data))

    async def authorize_message(self, provider_name: str = "Fake") -> ChatMessage:
        return await self.chat.wait_message(
            lambda m: any(
                isinstance(b, UrlButton) and b.text == f"Authorize {provider_name}"
                for b in m.buttons
            )
        )

    async def browser(self, message: ChatMessage, *, deny: bool = False) -> httpx.Response:
        """The owner opens the link, the provider redirects to the daemon's callback.

        With the rig's daemon down, a daemon without a bot serves the callback.
        """
        if self.daemon is None:
            async with self._daemon() as (engine, _, daemon):
                return await self._open(message, engine, daemon, deny=deny)
        assert self.engine is not None
        return await self._open(message, self.engine, self.daemon, deny=deny)

    async def _open(
        self, message: ChatMessage, engine: FlowEngine, daemon: Daemon, *, deny: bool
    ) -> httpx.Response:
        url = url_button(message).url
        query = parse_qs(urlsplit(url).query)
        state = query["state"][0]
        assert query["redirect_uri"] == [self.redirect_uri]
        if deny:
            params = {"state": state, "error": "access_denied"}
        else:
            flow = await engine.ledger.by_state_hash(_hash(state))
            assert flow is not None
            verifier = await engine.code_verifier(flow.id)
            assert verifier is not None
            assert query["code_challenge"] == [code_challenge(verifier)]
            code = self.fake.issue_code(redirect_uri=self.redirect_uri, code_verifier=verifier)
            params = {"state": state, "code": code}
        response = await self.http.get(f"{daemon.base_url}/oauth/callback", params=params)
        assert response.status_code == 200, response.text
        return response


def _hash(state: str) -> str:
    from flowengine.protocol import hash_state

    return hash_state(state)


@pytest.fixture(name="fake")
def _fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture(name="catalog")
def _catalog(fake: FakeProvider) -> Catalog:
    catalog = Catalog().with_override(fake.spec())
    catalog.register(fake.spec("plain", name="Plain", revocation_url=None))
    catalog.register(fake.spec("public", name="Public", token_auth_method="none"))
    return catalog


@asynccontextmanager
async def open_rig(
    tmp: Path,
    fake: FakeProvider,
    catalog: Catalog,
    credentials: CredentialStore,
    *,
    provider_transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[BotRig]:
    """A :class:`BotRig` with its two HTTP clients: the broker's to the provider (``fake``
    unless ``provider_transport`` routes elsewhere too) and the owner's browser."""
    async with (
        httpx.AsyncClient(transport=provider_transport or fake.transport()) as provider_http,
        httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as http,
    ):
        yield BotRig(
            tmp=tmp,
            chat=FakeChat(),
            fake=fake,
            catalog=catalog,
            http=http,
            provider_http=provider_http,
            credentials=credentials,
            tokens=TokenStore(tmp / "auth.json"),
        )


@pytest.fixture(name="rig")
async def _rig(tmp_path: Path, fake: FakeProvider, catalog: Catalog) -> AsyncIterator[BotRig]:
    credentials = CredentialStore(tmp_path / "state" / "credentials.json")
    credentials.put("fake", fake.credentials())
    credentials.put("plain", fake.credentials())
    async with open_rig(tmp_path, fake, catalog, credentials) as rig:
        yield rig
