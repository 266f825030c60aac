"""The bot's conversation as a pure table: ``step(state, inbound) -> (state, effects)``. [pure]

Nothing here does I/O. The runner (bot/runner.py) feeds in what the owner said or tapped
(:class:`Message`, :class:`Tap`) and what its own I/O produced (the ``*Result``-like
inbounds below: :class:`ConnectStarted`, :class:`FlowEnded`, ...), then carries out the
effects it gets back, in order:

* outgoing messages — :class:`Send`, :class:`Edit`, :class:`SendImage`, :class:`AnswerTap`;
* commands for the runner — :class:`BeginConnect`, :class:`SaveCredentials`,
  :class:`DeleteSecret`, :class:`ListConnections`, :class:`Disconnect`, :class:`ListFlows`,
  :class:`CancelFlows`, :class:`ListAudit`, :class:`RunCommand`, :class:`MarkDelivered`,
  :class:`LogRefusal`.
  Each command's outcome comes back as another inbound.

Besides its own commands the bot offers those of the integrations (``glucose``, ...), which
arrive as :class:`CommandSpec` rows in :attr:`ConversationState.commands`: a name, help and
usage lines, and a pure ``parse`` of the words after the name. The table never names one.

Per chat the conversation is in one of three modes::

    IDLE --connect, no credentials--> AWAITING_CLIENT_ID --id--> AWAITING_CLIENT_SECRET
      ^                                   |  (public client: id only)    |
      +------------ cancel / a /command / the credentials were sent -----+

Only owners are served: anyone else gets :data:`texts.REFUSAL` once and is ignored after
that (the runner logs each attempt, never its content). Message text and client secrets
are ``repr=False`` so a logged effect or state never shows them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from flowengine.errors import BrokerError

from . import texts

__all__ = [
    "AnswerTap",
    "AuditListed",
    "BUILTIN_COMMANDS",
    "BeginConnect",
    "BotCommand",
    "CallbackButton",
    "CancelFlows",
    "ChatState",
    "CommandAnswered",
    "CommandFailed",
    "CommandSpec",
    "CommandUnavailable",
    "ConnectStarted",
    "ConnectionView",
    "ConnectionsListed",
    "ConversationState",
    "CredentialsNeeded",
    "CredentialsSaved",
    "DeleteSecret",
    "DeviceStarted",
    "Disconnect",
    "Disconnected",
    "Edit",
    "Effect",
    "FlowEnded",
    "FlowView",
    "FlowsCancelled",
    "FlowsListed",
    "Inbound",
    "ListConnections",
    "HandOutView",
    "ListAudit",
    "ListFlows",
    "LogRefusal",
    "MarkDelivered",
    "Message",
    "Mode",
    "NotConnected",
    "NotificationDue",
    "Outcome",
    "ProviderInChat",
    "ProviderUnknown",
    "RunCommand",
    "SaveCredentials",
    "SecretDeleted",
    "Send",
    "SendImage",
    "Tap",
    "UrlButton",
    "Watch",
    "RECONNECT_PREFIX",
    "command_table",
    "menu",
    "parse_command",
    "step",
    "suggest",
]

#: callback data of a "Reconnect <Provider>" button is this prefix + the provider id
RECONNECT_PREFIX = "connect:"
#: notification kinds that are news, not trouble: no "Reconnect" button
_NEWS_KINDS = frozenset({"first_handout"})


# =========================================================================== state


class Mode(StrEnum):
    IDLE = "idle"
    AWAITING_CLIENT_ID = "awaiting_client_id"
    AWAITING_CLIENT_SECRET = "awaiting_client_secret"


@dataclass(frozen=True, slots=True)
class ChatState:
    """Where the conversation in one chat stands. The client id is not a secret."""

    mode: Mode = Mode.IDLE
    provider: str | None = None
    name: str | None = None
    needs_secret: bool = True
    client_id: str | None = None


_IDLE = ChatState()


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """An integration's chat command as the table sees it.

    ``parse`` is pure: the words after the command (lower-cased) -> a request, or None when
    they do not fit (then ``usage`` is the answer). ``failure`` opens the line shown when
    the command fails ("No glucose reading").
    """

    name: str
    help: str
    usage: str
    failure: str
    parse: Callable[[tuple[str, ...]], Hashable | None] = field(compare=False, repr=False)
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConversationState:
    """The whole bot: who may talk to it, each chat's state, who was already refused."""

    owners: frozenset[int]
    tz: str = "UTC"
    #: integration commands by name
    commands: Mapping[str, CommandSpec] = field(default_factory=dict)
    chats: Mapping[int, ChatState] = field(default_factory=dict)
    refused: frozenset[int] = frozenset()

    def chat(self, chat_id: int) -> ChatState:
        return self.chats.get(chat_id, _IDLE)

    def with_chat(self, chat_id: int, chat: ChatState) -> ConversationState:
        chats = dict(self.chats)
        if chat == _IDLE:
            chats.pop(chat_id, None)
        else:
            chats[chat_id] = chat
        return replace(self, chats=chats)


# ========================================================================= inbound


@dataclass(frozen=True, slots=True)
class Message:
    """A text message to the bot."""

    chat_id: int
    sender_id: int
    message_id: int
    text: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Tap:
    """An inline (callback) button was tapped."""

    chat_id: int
    sender_id: int
    message_id: int
    query_id: int
    data: str


@dataclass(frozen=True, slots=True)
class ProviderInChat:
    """What the records below about one provider in one chat share (they extend it): the
    chat, the provider's catalog id and the name the owner knows it by."""

    chat_id: int
    provider: str
    name: str


@dataclass(frozen=True, slots=True)
class ConnectStarted(ProviderInChat):
    """The broker started a flow; ``state`` is the raw OAuth state (for polling only)."""

    flow_id: str
    url: str = field(repr=False)
    state: str = field(repr=False)
    valid_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceStarted(ProviderInChat):
    """The broker started a device authorization (RFC 8628): a code for the owner to enter.

    ``qr`` is a PNG of the complete verification URI (the runner renders it), if any.
    """

    flow_id: str
    user_code: str = field(repr=False)
    verification_uri: str
    verification_uri_complete: str | None = field(default=None, repr=False)
    valid_seconds: float | None = None
    qr: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ProviderUnknown:
    chat_id: int
    provider: str
    suggestions: tuple[str, ...] = ()
    known: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CredentialsNeeded(ProviderInChat):
    needs_secret: bool


@dataclass(frozen=True, slots=True)
class CredentialsSaved(ProviderInChat):
    """The client credentials are stored; connecting goes on."""


@dataclass(frozen=True, slots=True)
class SecretDeleted:
    chat_id: int
    ok: bool


@dataclass(frozen=True, slots=True)
class CommandFailed:
    """A command's I/O raised a BrokerError (its message holds no secret); texts words it."""

    chat_id: int
    error: BrokerError


class Outcome(StrEnum):
    CONNECTED = "connected"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """A watched authorization finished; ``message_id`` is the link message (None: unknown)."""

    chat_id: int
    message_id: int | None
    flow_id: str
    provider: str
    name: str
    outcome: Outcome
    now_ms: int = 0
    scopes: tuple[str, ...] = ()
    expires: int | None = None
    detail: str | None = None
    #: a device authorization (a code, no link)
    device: bool = False
    #: a link that expired for a provider with a device endpoint: suggest the device flow
    device_hint: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionView:
    provider: str
    name: str
    state: str
    expires: int | None
    last_refresh: int | None
    scopes: tuple[str, ...] = ()
    #: epoch ms by which the owner must connect again (the provider ends the grant)
    reconnect_by: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionsListed:
    chat_id: int
    items: tuple[ConnectionView, ...]
    now_ms: int


@dataclass(frozen=True, slots=True)
class Disconnected(ProviderInChat):
    revoked_remotely: bool
    has_revocation_endpoint: bool


@dataclass(frozen=True, slots=True)
class NotConnected(ProviderInChat):
    """A disconnect found no connection to end."""


@dataclass(frozen=True, slots=True)
class FlowView:
    id: str
    provider: str
    state: str
    updated_at: int
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class FlowsListed:
    chat_id: int
    provider: str | None
    items: tuple[FlowView, ...]
    now_ms: int


@dataclass(frozen=True, slots=True)
class FlowsCancelled:
    chat_id: int
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandOutView:
    """One token hand-out of the audit (no token: a hash prefix names it)."""

    at: int
    who: str
    node: str
    address: str
    provider: str
    name: str
    token_sha: str


@dataclass(frozen=True, slots=True)
class AuditListed:
    chat_id: int
    provider: str | None
    who: str | None
    items: tuple[HandOutView, ...]
    now_ms: int


@dataclass(frozen=True, slots=True)
class CommandAnswered:
    """An integration command's answer: a caption and, optionally, a PNG."""

    chat_id: int
    text: str
    image: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CommandUnavailable:
    """An integration command failed (``error``: why, if it said); ``name`` is the
    provider's name when the error names a provider."""

    chat_id: int
    command: str
    error: BrokerError | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class NotificationDue:
    """An undelivered ledger notification; ``chat_id`` None means every owner.

    ``kind``, ``reason`` (a code, e.g. "answer_lost") and ``data`` are what texts.notification
    words; ``message`` is the text an older version wrote instead of data.
    """

    id: int
    kind: str
    provider: str
    name: str
    chat_id: int | None = None
    reason: str | None = None
    data: Mapping[str, object] = field(default_factory=dict)
    message: str = ""


Inbound = (
    Message
    | Tap
    | ConnectStarted
    | DeviceStarted
    | ProviderUnknown
    | CredentialsNeeded
    | CredentialsSaved
    | SecretDeleted
    | CommandFailed
    | FlowEnded
    | ConnectionsListed
    | Disconnected
    | NotConnected
    | FlowsListed
    | FlowsCancelled
    | AuditListed
    | CommandAnswered
    | CommandUnavailable
    | NotificationDue
)


# ========================================================================= effects


@dataclass(frozen=True, slots=True)
class UrlButton:
    text: str
    url: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CallbackButton:
    text: str
    data: str


@dataclass(frozen=True, slots=True)
class Watch:
    """Poll this flow until it ends, and edit the message just sent when it does."""

    flow_id: str
    provider: str
    name: str
    state: str = field(repr=False)
    #: a device authorization: the watcher polls the token endpoint (nothing comes back)
    device: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    chat_id: int
    text: str
    buttons: tuple[UrlButton | CallbackButton, ...] = ()
    watch: Watch | None = None


@dataclass(frozen=True, slots=True)
class Edit:
    chat_id: int
    message_id: int
    text: str


@dataclass(frozen=True, slots=True)
class SendImage:
    chat_id: int
    data: bytes = field(repr=False)
    caption: str = ""
    filename: str = "chart.png"


@dataclass(frozen=True, slots=True)
class AnswerTap:
    query_id: int
    text: str | None = None


@dataclass(frozen=True, slots=True)
class BeginConnect:
    """Start connecting ``provider`` (a catalog id, or a URL to discover); ``device``: with
    the device grant (a code to enter) instead of a link."""

    chat_id: int
    provider: str
    device: bool = False


@dataclass(frozen=True, slots=True)
class SaveCredentials(ProviderInChat):
    client_id: str
    client_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DeleteSecret:
    chat_id: int
    message_id: int


@dataclass(frozen=True, slots=True)
class ListConnections:
    chat_id: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    chat_id: int
    provider: str


@dataclass(frozen=True, slots=True)
class ListFlows:
    chat_id: int
    provider: str | None = None


@dataclass(frozen=True, slots=True)
class CancelFlows:
    chat_id: int


@dataclass(frozen=True, slots=True)
class ListAudit:
    """Recent token hand-outs, of one provider or one identity (a login or a tag)."""

    chat_id: int
    provider: str | None = None
    who: str | None = None


@dataclass(frozen=True, slots=True)
class RunCommand:
    """Run an integration's command with the request its ``parse`` made."""

    chat_id: int
    command: str
    request: Hashable


@dataclass(frozen=True, slots=True)
class MarkDelivered:
    notification_id: int


@dataclass(frozen=True, slots=True)
class LogRefusal:
    sender_id: int
    chat_id: int
    kind: str  # "message" or "tap"


Effect = (
    Send
    | Edit
    | SendImage
    | AnswerTap
    | BeginConnect
    | SaveCredentials
    | DeleteSecret
    | ListConnections
    | Disconnect
    | ListFlows
    | CancelFlows
    | ListAudit
    | RunCommand
    | MarkDelivered
    | LogRefusal
)

Step = tuple[ConversationState, list[Effect]]


# =================================================================== the table


@dataclass(frozen=True, slots=True)
class BotCommand:
    """One row of the command table, which the dialogue, Telegram's "/" menu, the help and
    "did you mean" all read: a name, its aliases, what it takes (``args``, as help writes
    it), what it does, and which function of :data:`_HANDLERS` runs it (``handler``)."""

    name: str
    aliases: tuple[str, ...] = ()
    args: str = ""
    description: str = ""
    handler: str = ""

    @property
    def help(self) -> str:
        return texts.help_line(self.name, self.args, self.description)


def _builtin(name: str, *aliases: str) -> BotCommand:
    return BotCommand(
        name, aliases, texts.COMMAND_ARGS.get(name, ""), texts.COMMAND_HELP[name], name
    )


#: the bot's own commands, in help order; integration commands go before ``help``
BUILTIN_COMMANDS: tuple[BotCommand, ...] = (
    _builtin("connect"),
    _builtin("connections", "status"),
    _builtin("disconnect"),
    _builtin("flows"),
    _builtin("cancel"),
    _builtin("audit"),
)
HELP_COMMAND = _builtin("help")
#: words that run a command without being offered anywhere (Telegram sends /start first)
_HIDDEN_ALIASES = {"start": "help"}
#: handler key of an integration's command (its CommandSpec parses the arguments)
INTEGRATION = "integration"


def _integration_row(spec: CommandSpec) -> BotCommand:
    """An integration command as a row: ``spec.help`` is ``"name args — what it does"``."""
    head, sep, description = spec.help.partition(" — ")
    if not sep:
        head, description = spec.name, spec.help
    args = head[len(spec.name) :].strip() if head.startswith(spec.name) else ""
    return BotCommand(spec.name, spec.aliases, args, description, INTEGRATION)


def command_table(commands: Mapping[str, CommandSpec] | None = None) -> tuple[BotCommand, ...]:
    """Every command the bot answers, in help and menu order."""
    extra = tuple(_integration_row(spec) for spec in (commands or {}).values())
    return (*BUILTIN_COMMANDS, *extra, HELP_COMMAND)


def _words(table: tuple[BotCommand, ...]) -> dict[str, BotCommand]:
    """Every word that names a command (names, aliases, hidden aliases) -> its row."""
    out: dict[str, BotCommand] = {}
    by_name = {row.name: row for row in table}
    for row in table:
        out.setdefault(row.name, row)
    for row in table:
        for alias in row.aliases:
            out.setdefault(alias, row)
    for alias, name in _HIDDEN_ALIASES.items():
        out.setdefault(alias, by_name[name])
    return out


def menu(state: ConversationState) -> list[tuple[str, str]]:
    """Telegram's "/" menu: (command, description) per row, in table order."""
    return [
        (row.name, texts.menu_description(row.args, texts.MENU_HELP.get(row.name, row.description)))
        for row in command_table(state.commands)
        if _MENU_NAME.match(row.name)
    ]


#: what Telegram accepts as a menu command (BotCommand.command)
_MENU_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
_COMMAND_RE = re.compile(r"^/?(?P<cmd>[A-Za-z_]+)(?:@\w+)?(?:\s+(?P<args>.*))?$", re.DOTALL)


def parse_command(
    text: str, commands: Mapping[str, CommandSpec] | None = None
) -> tuple[str, list[str]] | None:
    """``"/connect@bot Dexcom"`` -> ``("connect", ["dexcom"])``; None if not a command.

    ``commands`` adds integration commands (by name and alias) to the built-in ones.
    """
    match = _COMMAND_RE.match(text.strip())
    if match is None:
        return None
    row = _words(command_table(commands)).get(match["cmd"].lower())
    if row is None:
        return None
    # a URL keeps its case (paths are case-sensitive); everything else is lower-cased
    args = [a if "://" in a else a.lower() for a in (match["args"] or "").split()]
    return row.name, args


def suggest(text: str, commands: Mapping[str, CommandSpec] | None = None) -> list[str]:
    """Close matches for a mistyped command, whole: ``"conect dexcom"`` -> ``["connect
    dexcom"]``; empty when nothing is close (or it is no command-like text)."""
    import difflib

    match = _COMMAND_RE.match(text.strip())
    if match is None:
        return []
    words = _words(command_table(commands))
    typed = match["cmd"].lower()
    scored = sorted(
        (
            (difflib.SequenceMatcher(None, typed, word).ratio(), word)
            for word in words
            if word not in _HIDDEN_ALIASES  # offered nowhere, suggested neither
        ),
        reverse=True,
    )
    rest = " ".join(a if "://" in a else a.lower() for a in (match["args"] or "").split())
    best = scored[0][0] if scored else 0.0
    seen: set[str] = set()
    out: list[str] = []
    for ratio, word in scored:  # the closest, and any about as close; one per command
        if ratio < max(0.75, best - 0.05) or len(out) == 2:
            break
        if words[word].name not in seen:
            seen.add(words[word].name)
            out.append(f"{word} {rest}".strip())
    return out


def _help(state: ConversationState) -> str:
    return texts.help_text([row.help for row in command_table(state.commands)])


# ===================================================== what a credential is not

#: chat words nobody's client id or secret is
_CHATTER = frozenset(
    {"yes", "no", "ok", "okay", "hi", "hello", "hey", "thanks", "thank", "stop", "quit",
     "exit", "back", "later", "what", "why", "how", "sure", "done", "next", "skip"}
)  # fmt: skip
_MIN_CLIENT_ID = 4
_MIN_SECRET = 8


def _refusal(text: str, what: str, state: ConversationState, *, minimum: int) -> str | None:
    """Why ``text`` (one word, no spaces) is not a credential, as an answer; None if it may be."""
    word = text.lstrip("/").lower()
    if word in _words(command_table(state.commands)):
        return texts.command_at_prompt(word, what)
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in text):
        return texts.not_a_credential(what, "only printable ASCII, RFC 6749")
    if word in _CHATTER:
        return texts.not_a_credential(what, "a word from a chat")
    if len(text) < minimum:
        return texts.not_a_credential(what, f"shorter than {minimum} characters")
    return None


# ========================================================================== step


def step(state: ConversationState, inbound: Inbound) -> Step:
    """One move of the conversation. Pure: same input, same output, no I/O."""
    if isinstance(inbound, Message):
        return _message(state, inbound)
    if isinstance(inbound, Tap):
        return _tap(state, inbound)
    if isinstance(inbound, CredentialsNeeded):
        chat = ChatState(
            mode=Mode.AWAITING_CLIENT_ID,
            provider=inbound.provider,
            name=inbound.name,
            needs_secret=inbound.needs_secret,
        )
        state = state.with_chat(inbound.chat_id, chat)
        return state, [Send(inbound.chat_id, texts.ASK_CLIENT_ID.format(name=inbound.name))]
    return state, _result(state, inbound)


def _refuse(state: ConversationState, sender_id: int, chat_id: int, kind: str) -> Step:
    effects: list[Effect] = [LogRefusal(sender_id=sender_id, chat_id=chat_id, kind=kind)]
    first = sender_id not in state.refused
    if first:
        state = replace(state, refused=state.refused | {sender_id})
    return state, effects + ([Send(chat_id, texts.REFUSAL)] if first else [])


def _message(state: ConversationState, msg: Message) -> Step:
    if msg.sender_id not in state.owners:
        return _refuse(state, msg.sender_id, msg.chat_id, "message")
    chat = state.chat(msg.chat_id)
    text = msg.text.strip()
    if chat.mode is Mode.IDLE:
        return _command(state, msg.chat_id, text)

    parsed = parse_command(text, state.commands)
    name = chat.name or chat.provider or ""
    if parsed is not None and parsed[0] == "cancel":
        return state.with_chat(msg.chat_id, _IDLE), [Send(msg.chat_id, texts.CREDENTIALS_CANCELLED)]
    # a slash command leaves the credential entry, then runs; so does a plain command with
    # arguments while a client id is expected (client ids have no spaces). A lone word is
    # taken as the value, and at the secret prompt only a slash command counts.
    wordy = parsed is not None and any(c.isspace() for c in text)
    if text.startswith("/") or (wordy and chat.mode is Mode.AWAITING_CLIENT_ID):
        state = state.with_chat(msg.chat_id, _IDLE)
        state, effects = _command(state, msg.chat_id, text)
        return state, [Send(msg.chat_id, texts.LEFT_CREDENTIALS.format(name=name)), *effects]

    if chat.mode is Mode.AWAITING_CLIENT_ID:
        if not text or any(c.isspace() for c in text):
            return state, [Send(msg.chat_id, texts.BAD_CLIENT_ID)]
        refusal = _refusal(text, "client id", state, minimum=_MIN_CLIENT_ID)
        if refusal is not None:
            return state, [Send(msg.chat_id, refusal)]
        assert chat.provider is not None
        if chat.needs_secret:
            state = state.with_chat(
                msg.chat_id, replace(chat, mode=Mode.AWAITING_CLIENT_SECRET, client_id=text)
            )
            return state, [Send(msg.chat_id, texts.ask_client_secret(name, chat.provider))]
        state = state.with_chat(msg.chat_id, _IDLE)
        return state, [SaveCredentials(msg.chat_id, chat.provider, name, text, None)]

    # AWAITING_CLIENT_SECRET: whatever came, it may be the secret: delete it first
    assert chat.provider is not None
    assert chat.client_id is not None
    delete = DeleteSecret(msg.chat_id, msg.message_id)
    if not text or any(c.isspace() for c in text):
        return state, [delete, Send(msg.chat_id, texts.BAD_SECRET)]
    if text == chat.client_id:
        return state, [delete, Send(msg.chat_id, texts.SECRET_IS_THE_CLIENT_ID)]
    refusal = _refusal(text, "client secret", state, minimum=_MIN_SECRET)
    if refusal is not None:
        return state, [delete, Send(msg.chat_id, refusal)]
    state = state.with_chat(msg.chat_id, _IDLE)
    return state, [delete, SaveCredentials(msg.chat_id, chat.provider, name, chat.client_id, text)]


def _command(state: ConversationState, chat_id: int, text: str) -> Step:
    parsed = parse_command(text, state.commands)
    if parsed is None:
        close = suggest(text, state.commands)
        reply = texts.did_you_mean(close) if close else texts.UNKNOWN_COMMAND
        return state, [Send(chat_id, reply)]
    command, args = parsed
    row = _words(command_table(state.commands))[command]
    return state, _HANDLERS[row.handler](state, chat_id, command, args)


#: a command's handler: (state, chat, the command's name, the words after it) -> effects
_Handler = Callable[[ConversationState, int, str, list[str]], list[Effect]]


def _help_handler(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    return [Send(chat_id, _help(state))]


def _connect(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    """``connect <provider|url> [device]``."""
    device = len(args) > 1 and args[1] == "device"
    return [BeginConnect(chat_id, args[0] if args else "", device=device)]


def _connections(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    return [ListConnections(chat_id)]


def _disconnect(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    """``disconnect <provider>``; without one, the help."""
    if not args:
        return [Send(chat_id, _help(state))]
    return [Disconnect(chat_id, args[0])]


def _flows(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    """``flows [provider]``."""
    return [ListFlows(chat_id, args[0] if args else None)]


def _cancel(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    return [CancelFlows(chat_id)]


def _audit(state: ConversationState, chat_id: int, _: str, args: list[str]) -> list[Effect]:
    """``audit``, ``audit <provider>``, ``audit <login or tag:name>``."""
    if not args:
        return [ListAudit(chat_id)]
    word = args[0]
    if word.startswith("tag:") or "@" in word:
        return [ListAudit(chat_id, who=word)]
    return [ListAudit(chat_id, provider=word)]


def _integration(
    state: ConversationState, chat_id: int, name: str, args: list[str]
) -> list[Effect]:
    """An integration's command: its ``parse`` makes the request (or ``usage`` answers)."""
    spec = state.commands[name]
    request = spec.parse(tuple(args))
    if request is None:
        return [Send(chat_id, spec.usage)]
    return [RunCommand(chat_id, spec.name, request)]


#: the handler each row's ``handler`` key names
_HANDLERS: Mapping[str, _Handler] = {
    "help": _help_handler,
    "connect": _connect,
    "connections": _connections,
    "disconnect": _disconnect,
    "flows": _flows,
    "cancel": _cancel,
    "audit": _audit,
    INTEGRATION: _integration,
}


def _tap(state: ConversationState, tap: Tap) -> Step:
    if tap.sender_id not in state.owners:
        state, effects = _refuse(state, tap.sender_id, tap.chat_id, "tap")
        # a tap must be answered or the button spins; the refusal goes there, not in chat
        answer = AnswerTap(tap.query_id, texts.REFUSAL if len(effects) > 1 else None)
        return state, [effects[0], answer]
    if tap.data.startswith(RECONNECT_PREFIX):
        provider = tap.data[len(RECONNECT_PREFIX) :]
        state = state.with_chat(tap.chat_id, _IDLE)
        return state, [AnswerTap(tap.query_id), BeginConnect(tap.chat_id, provider)]
    return state, [AnswerTap(tap.query_id)]


def _result(state: ConversationState, inbound: Inbound) -> list[Effect]:
    tz = state.tz
    match inbound:
        case ConnectStarted():
            return [
                Send(
                    inbound.chat_id,
                    texts.authorize_prompt(inbound.name, inbound.valid_seconds),
                    buttons=(UrlButton(texts.authorize_button(inbound.name), inbound.url),),
                    watch=Watch(inbound.flow_id, inbound.provider, inbound.name, inbound.state),
                )
            ]
        case DeviceStarted():
            target = inbound.verification_uri_complete or inbound.verification_uri
            prompt = Send(
                inbound.chat_id,
                texts.device_prompt(
                    inbound.name,
                    inbound.user_code,
                    inbound.verification_uri,
                    inbound.valid_seconds,
                ),
                buttons=(UrlButton(texts.device_button(inbound.name), target),),
                watch=Watch(inbound.flow_id, inbound.provider, inbound.name, "", device=True),
            )
            if inbound.qr is None:
                return [prompt]
            caption = texts.device_qr_caption(inbound.name)
            return [
                SendImage(inbound.chat_id, inbound.qr, caption=caption, filename="qr.png"),
                prompt,
            ]
        case ProviderUnknown():
            text = texts.unknown_provider(inbound.provider, inbound.suggestions, inbound.known)
            return [Send(inbound.chat_id, text)]
        case CredentialsSaved():
            return [
                Send(inbound.chat_id, texts.CREDENTIALS_SAVED.format(name=inbound.name)),
                BeginConnect(inbound.chat_id, inbound.provider),
            ]
        case SecretDeleted():
            text = texts.SECRET_DELETED if inbound.ok else texts.SECRET_NOT_DELETED
            return [Send(inbound.chat_id, text)]
        case CommandFailed():
            return [Send(inbound.chat_id, texts.error(inbound.error))]
        case FlowEnded():
            text = _ending(inbound, tz)
            if inbound.message_id is None:
                return [Send(inbound.chat_id, text)]
            return [Edit(inbound.chat_id, inbound.message_id, text)]
        case ConnectionsListed():
            rows = [(c.name, c.state, c.expires, c.last_refresh, c.scopes) for c in inbound.items]
            reconnect = {c.name: c.reconnect_by for c in inbound.items if c.reconnect_by}
            text = texts.connections(rows, inbound.now_ms, tz, reconnect_by=reconnect)
            return [Send(inbound.chat_id, text)]
        case Disconnected():
            text = texts.disconnected(
                inbound.name,
                revoked_remotely=inbound.revoked_remotely,
                has_revocation_endpoint=inbound.has_revocation_endpoint,
            )
            return [Send(inbound.chat_id, text)]
        case NotConnected():
            return [Send(inbound.chat_id, texts.not_connected(inbound.name))]
        case FlowsListed():
            lines = [(f.id, f.provider, f.state, f.updated_at, f.error_code) for f in inbound.items]
            return [Send(inbound.chat_id, texts.flows(lines, inbound.now_ms, inbound.provider))]
        case FlowsCancelled():
            return [Send(inbound.chat_id, texts.cancelled_flows(inbound.names))]
        case AuditListed():
            handed = [(h.at, h.who, h.node, h.address, h.name, h.token_sha) for h in inbound.items]
            text = texts.audit(handed, inbound.now_ms, tz, inbound.provider or inbound.who)
            return [Send(inbound.chat_id, text)]
        case CommandAnswered():
            if inbound.image is None:
                return [Send(inbound.chat_id, inbound.text)]
            return [SendImage(inbound.chat_id, inbound.image, caption=inbound.text)]
        case CommandUnavailable():
            spec = state.commands.get(inbound.command)
            failure = spec.failure if spec is not None else inbound.command
            text = texts.command_failed(failure, inbound.error, inbound.name)
            return [Send(inbound.chat_id, text)]
        case NotificationDue():
            targets = (inbound.chat_id,) if inbound.chat_id is not None else sorted(state.owners)
            text = texts.notification(
                inbound.kind,
                inbound.name,
                reason=inbound.reason,
                data=inbound.data,
                tz=tz,
                message=inbound.message,
            )
            button = CallbackButton(
                texts.reconnect_button(inbound.name), RECONNECT_PREFIX + inbound.provider
            )
            buttons = () if inbound.kind in _NEWS_KINDS else (button,)
            sends: list[Effect] = [Send(chat, text, buttons=buttons) for chat in targets]
            return [*sends, MarkDelivered(inbound.id)]
    raise TypeError(f"not an inbound: {type(inbound).__name__}")  # pragma: no cover


def _ending(ended: FlowEnded, tz: str) -> str:
    if ended.outcome is Outcome.CONNECTED:
        return texts.flow_connected(ended.name, ended.scopes, ended.expires, ended.now_ms, tz)
    if ended.outcome is Outcome.DENIED:
        return texts.flow_denied(ended.name)
    if ended.outcome is Outcome.TIMED_OUT:
        if ended.device:
            return texts.device_expired(ended.provider)
        return texts.flow_timed_out(ended.provider, device_hint=ended.device_hint)
    if ended.outcome is Outcome.CANCELLED:
        return texts.flow_cancelled(ended.name)
    return texts.flow_failed(ended.name, ended.provider, ended.detail)
