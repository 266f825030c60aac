"""The pure conversation table: whole conversations, the whole state after each step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot import texts
from bot.dialogue import (
    AnswerTap,
    AuditListed,
    BeginConnect,
    BotCommand,
    CallbackButton,
    CancelFlows,
    ChatState,
    CommandAnswered,
    CommandFailed,
    CommandSpec,
    CommandUnavailable,
    ConnectionsListed,
    ConnectionView,
    ConnectStarted,
    ConversationState,
    CredentialsNeeded,
    CredentialsSaved,
    DeleteSecret,
    Disconnect,
    Disconnected,
    Edit,
    FlowEnded,
    FlowsCancelled,
    FlowsListed,
    FlowView,
    HandOutView,
    ListAudit,
    ListConnections,
    ListFlows,
    LogRefusal,
    MarkDelivered,
    Message,
    Mode,
    NotConnected,
    NotificationDue,
    Outcome,
    ProviderUnknown,
    RunCommand,
    SaveCredentials,
    SecretDeleted,
    Send,
    SendImage,
    Tap,
    UrlButton,
    Watch,
    command_table,
    menu,
    parse_command,
    step,
)
from flowengine.errors import NotConnectedError, ProviderTransientError

OWNER = 100
STRANGER = 666
CHAT = 100
NOW = 1_800_000_000_000

_next_id = iter(range(1, 10_000))


def msg(text: str, *, sender: int = OWNER, chat: int = CHAT) -> Message:
    return Message(chat_id=chat, sender_id=sender, message_id=next(_next_id), text=text)


def _days(args: tuple[str, ...]) -> int | None:
    """An integration's pure parse: ``temp [Nd]``."""
    if not args:
        return 7
    if len(args) == 1 and args[0].endswith("d") and args[0][:-1].isdigit():
        return int(args[0][:-1])
    return None


#: an integration command, as the runner hands it to the table (the table names none)
TEMP = CommandSpec(
    "temp",
    "temp [Nd] — body temperature and a chart",
    "Say temp or temp 3d.",
    "No temperature",
    _days,
    aliases=("temperature",),
)


HELP_WITH_TEMP = texts.help_text(
    [
        "connect <provider|url> [device] — authorize a provider (asks for client credentials"
        " if needed), or an MCP server by its URL; device: a code to enter on any device"
        " instead of a link",
        "connections — every connection with its state, expiry and last refresh (also /status)",
        "disconnect <provider> — revoke and remove a provider's tokens",
        "flows [provider] — recent authorization flows and their states",
        "cancel — stop what is in progress (credential entry or a pending authorization)",
        "audit [provider | login | tag:name] — tokens handed to other machines: who, when,"
        " from where",
        TEMP.help,
        "help — this text",
    ]
)


@pytest.fixture(name="state")
def _state() -> ConversationState:
    return ConversationState(owners=frozenset({OWNER, 101}), commands={"temp": TEMP})


# ------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("connect dexcom", ("connect", ["dexcom"])),
        ("/connect Dexcom", ("connect", ["dexcom"])),
        ("/connect@agentd_bot  withings ", ("connect", ["withings"])),
        ("Connect", ("connect", [])),
        ("/status", ("connections", [])),
        ("connections", ("connections", [])),
        ("/start", ("help", [])),
        ("flows fake", ("flows", ["fake"])),
        ("cancel", ("cancel", [])),
        ("hello there", None),
        ("", None),
        ("/connectx dexcom", None),
    ],
)
def test_parse_command(text: str, expected: tuple[str, list[str]] | None) -> None:
    assert parse_command(text) == expected
    assert parse_command(text, {"temp": TEMP}) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("temp 3d", ("temp", ["3d"])),
        ("/Temperature@agentd_bot", ("temp", [])),
        ("tempo", None),
    ],
)
def test_parse_integration_commands(text: str, expected: tuple[str, list[str]] | None) -> None:
    assert parse_command(text, {"temp": TEMP}) == expected
    assert parse_command(text) is None


@pytest.mark.parametrize(
    ("text", "effect"),
    [
        ("connect fake", BeginConnect(CHAT, "fake")),
        ("/connect", BeginConnect(CHAT, "")),
        ("/status", ListConnections(CHAT)),
        ("connections", ListConnections(CHAT)),
        ("disconnect fake", Disconnect(CHAT, "fake")),
        ("flows", ListFlows(CHAT, None)),
        ("flows fake", ListFlows(CHAT, "fake")),
        ("cancel", CancelFlows(CHAT)),
        ("audit", ListAudit(CHAT)),
        ("/audit Fake", ListAudit(CHAT, provider="fake")),
        ("audit tag:CI", ListAudit(CHAT, who="tag:ci")),
        ("audit owner@example.com", ListAudit(CHAT, who="owner@example.com")),
        ("temp", RunCommand(CHAT, "temp", 7)),
        ("temperature 3d", RunCommand(CHAT, "temp", 3)),
        ("/temp 30d", RunCommand(CHAT, "temp", 30)),
        ("help", Send(CHAT, HELP_WITH_TEMP)),
        ("disconnect", Send(CHAT, HELP_WITH_TEMP)),
        ("temp soon", Send(CHAT, "Say temp or temp 3d.")),
        ("temp 3d 4d", Send(CHAT, "Say temp or temp 3d.")),
        ("glucose", Send(CHAT, texts.UNKNOWN_COMMAND)),
        ("what?", Send(CHAT, texts.UNKNOWN_COMMAND)),
        ("conect fake", Send(CHAT, texts.did_you_mean(["connect fake"]))),
        ("/stauts", Send(CHAT, texts.did_you_mean(["status"]))),
        ("tmep 3d", Send(CHAT, texts.did_you_mean(["temp 3d"]))),
    ],
)
def test_owner_commands(state: ConversationState, text: str, effect: object) -> None:
    new, effects = step(state, msg(text))
    assert new == state
    assert effects == [effect]


# -------------------------------------------------------------- conversations


def test_connect_with_stored_credentials_whole_conversation(state: ConversationState) -> None:
    state, effects = step(state, msg("connect fake"))
    assert effects == [BeginConnect(CHAT, "fake")]

    started = ConnectStarted(CHAT, "fake", "Fake", "f1", "https://x/auth?s", "st", 600.0)
    state, effects = step(state, started)
    assert effects == [
        Send(
            CHAT,
            "Tap the button to authorize Fake. The link is valid for 10m.",
            buttons=(UrlButton("Authorize Fake", "https://x/auth?s"),),
            watch=Watch("f1", "fake", "Fake", "st"),
        )
    ]
    ended = FlowEnded(
        CHAT, 55, "f1", "fake", "Fake", Outcome.CONNECTED, NOW, ("read",), NOW + 3_600_000
    )
    state, effects = step(state, ended)
    assert effects == [
        Edit(
            CHAT,
            55,
            "✅ Fake connected\nScopes: read\nToken expires in 1h (2027-01-15 09:00 UTC)",
        )
    ]
    assert state.chats == {}


def test_connect_asking_for_credentials_whole_conversation(state: ConversationState) -> None:
    state, effects = step(state, msg("connect fake"))
    assert effects == [BeginConnect(CHAT, "fake")]

    state, effects = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    assert state.chat(CHAT) == ChatState(Mode.AWAITING_CLIENT_ID, "fake", "Fake", True, None)
    assert effects == [Send(CHAT, texts.ASK_CLIENT_ID.format(name="Fake"))]

    state, effects = step(state, msg("client 123"))
    assert state.chat(CHAT).mode is Mode.AWAITING_CLIENT_ID
    assert effects == [Send(CHAT, texts.BAD_CLIENT_ID)]

    state, effects = step(state, msg("client-123"))
    assert state.chat(CHAT) == ChatState(
        Mode.AWAITING_CLIENT_SECRET, "fake", "Fake", True, "client-123"
    )
    assert effects == [Send(CHAT, texts.ask_client_secret("Fake", "fake"))]
    # the secret prompt offers the terminal, the safer path
    assert "agentd credentials fake" in effects[0].text  # type: ignore[union-attr, operator]

    secret = msg("  s3cr3t-value ")
    state, effects = step(state, secret)
    assert state.chats == {}
    assert effects == [
        DeleteSecret(CHAT, secret.message_id),
        SaveCredentials(CHAT, "fake", "Fake", "client-123", "s3cr3t-value"),
    ]
    # the secret never shows in a repr of the effect, the inbound or the state
    assert "s3cr3t" not in repr(effects) + repr(secret) + repr(state)

    state, effects = step(state, SecretDeleted(CHAT, ok=True))
    assert effects == [Send(CHAT, texts.SECRET_DELETED)]
    state, effects = step(state, CredentialsSaved(CHAT, "fake", "Fake"))
    assert effects == [
        Send(CHAT, texts.CREDENTIALS_SAVED.format(name="Fake")),
        BeginConnect(CHAT, "fake"),
    ]
    assert state.chats == {}


def test_public_client_needs_only_the_client_id(state: ConversationState) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "pub", "Pub", needs_secret=False))
    state, effects = step(state, msg("pub-id"))
    assert state.chats == {}
    assert effects == [SaveCredentials(CHAT, "pub", "Pub", "pub-id", None)]


def test_a_secret_with_spaces_is_deleted_and_asked_again(state: ConversationState) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    state, _ = step(state, msg("cid-1234"))
    bad = msg("two words")
    new, effects = step(state, bad)
    assert new == state
    assert effects == [DeleteSecret(CHAT, bad.message_id), Send(CHAT, texts.BAD_SECRET)]


def test_secret_not_deletable_is_said(state: ConversationState) -> None:
    _, effects = step(state, SecretDeleted(CHAT, ok=False))
    assert effects == [Send(CHAT, texts.SECRET_NOT_DELETED)]


@pytest.mark.parametrize("word", ["cancel", "/cancel", "CANCEL"])
def test_cancel_during_credential_entry(state: ConversationState, word: str) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    state, _ = step(state, msg("cid-1234"))
    state, effects = step(state, msg(word))
    assert state.chats == {}
    assert effects == [Send(CHAT, texts.CREDENTIALS_CANCELLED)]


def test_a_slash_command_leaves_credential_entry_and_runs(state: ConversationState) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    state, effects = step(state, msg("/status"))
    assert state.chats == {}
    assert effects == [
        Send(CHAT, texts.LEFT_CREDENTIALS.format(name="Fake")),
        ListConnections(CHAT),
    ]


def test_a_command_with_arguments_leaves_client_id_entry(state: ConversationState) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    state, effects = step(state, msg("connect plain"))
    assert state.chats == {}
    assert effects == [
        Send(CHAT, texts.LEFT_CREDENTIALS.format(name="Fake")),
        BeginConnect(CHAT, "plain"),
    ]


def test_at_the_secret_prompt_only_slash_commands_count(state: ConversationState) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    state, _ = step(state, msg("cid-1234"))
    words = msg("connect plain")
    new, effects = step(state, words)
    assert new == state
    assert effects == [DeleteSecret(CHAT, words.message_id), Send(CHAT, texts.BAD_SECRET)]
    # a single command word is refused (deleted all the same), not stored as the secret
    word = msg("connections")
    new, effects = step(state, word)
    assert new == state
    assert effects == [
        DeleteSecret(CHAT, word.message_id),
        Send(CHAT, texts.command_at_prompt("connections", "client secret")),
    ]


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("help", texts.command_at_prompt("help", "client id")),
        ("status", texts.command_at_prompt("status", "client id")),
        ("Temperature", texts.command_at_prompt("temperature", "client id")),
        ("/start", None),  # a slash command leaves the entry (see below)
        ("yes", texts.not_a_credential("client id", "a word from a chat")),
        ("OK", texts.not_a_credential("client id", "a word from a chat")),
        ("ab1", texts.not_a_credential("client id", "shorter than 4 characters")),
        ("clïent-id", texts.not_a_credential("client id", "only printable ASCII, RFC 6749")),
        ("12345", "ask-secret"),  # Strava's client ids are numbers
    ],
)
def test_the_client_id_prompt_refuses_what_is_no_client_id(
    state: ConversationState, text: str, reply: str | None
) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    new, effects = step(state, msg(text))
    if reply is None:
        assert new.chats == {}
        assert effects[0] == Send(CHAT, texts.LEFT_CREDENTIALS.format(name="Fake"))
    elif reply == "ask-secret":
        assert new.chat(CHAT).mode is Mode.AWAITING_CLIENT_SECRET
        assert effects == [Send(CHAT, texts.ask_client_secret("Fake", "fake"))]
    else:
        assert new == state  # still waiting for the client id, nothing stored
        assert effects == [Send(CHAT, reply)]


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("status", texts.command_at_prompt("status", "client secret")),
        ("thanks", texts.not_a_credential("client secret", "a word from a chat")),
        ("short7x", texts.not_a_credential("client secret", "shorter than 8 characters")),
        ("cid-1234", texts.SECRET_IS_THE_CLIENT_ID),
        ("sécret-value", texts.not_a_credential("client secret", "only printable ASCII, RFC 6749")),
    ],
)
def test_the_secret_prompt_refuses_what_is_no_secret_and_deletes_it(
    state: ConversationState, text: str, reply: str
) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    state, _ = step(state, msg("cid-1234"))
    answer = msg(text)
    new, effects = step(state, answer)
    assert new == state
    assert effects == [DeleteSecret(CHAT, answer.message_id), Send(CHAT, reply)]


def test_credential_entry_is_per_chat(state: ConversationState) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "fake", "Fake", needs_secret=True))
    _, effects = step(state, msg("connections", sender=101, chat=101))
    assert effects == [ListConnections(101)]


@pytest.mark.parametrize(
    ("outcome", "detail", "text"),
    [
        (Outcome.DENIED, None, "❌ Fake authorization was denied"),
        (Outcome.TIMED_OUT, None, "⌛ link expired — say connect fake to try again"),
        (Outcome.CANCELLED, None, "🚫 Fake authorization cancelled"),
        (
            Outcome.FAILED,
            "invalid_grant",
            "❌ Fake connection failed: invalid_grant\nSay connect fake to try again.",
        ),
    ],
)
def test_flow_endings_edit_the_link_message(
    state: ConversationState, outcome: Outcome, detail: str | None, text: str
) -> None:
    ended = FlowEnded(CHAT, 55, "f1", "fake", "Fake", outcome, NOW, detail=detail)
    assert step(state, ended) == (state, [Edit(CHAT, 55, text)])
    # without a known link message the ending is sent as a new message
    assert step(state, replace(ended, message_id=None)) == (state, [Send(CHAT, text)])


# ------------------------------------------------------------------ strangers


def test_stranger_gets_one_refusal_then_nothing(state: ConversationState) -> None:
    state, effects = step(state, msg("connect fake", sender=STRANGER, chat=STRANGER))
    assert effects == [LogRefusal(STRANGER, STRANGER, "message"), Send(STRANGER, texts.REFUSAL)]
    assert state.refused == {STRANGER}
    state, effects = step(state, msg("help", sender=STRANGER, chat=STRANGER))
    assert effects == [LogRefusal(STRANGER, STRANGER, "message")]
    tap = Tap(STRANGER, STRANGER, 5, 77, "connect:fake")
    state, effects = step(state, tap)
    assert effects == [LogRefusal(STRANGER, STRANGER, "tap"), AnswerTap(77, None)]
    assert state.chats == {}


def test_stranger_tap_first_gets_the_refusal_as_a_toast(state: ConversationState) -> None:
    state, effects = step(state, Tap(STRANGER, STRANGER, 5, 77, "connect:fake"))
    assert effects == [LogRefusal(STRANGER, STRANGER, "tap"), AnswerTap(77, texts.REFUSAL)]


def test_a_stranger_in_an_owner_chat_is_refused(state: ConversationState) -> None:
    _, effects = step(state, msg("connect fake", sender=STRANGER, chat=CHAT))
    assert effects == [LogRefusal(STRANGER, CHAT, "message"), Send(CHAT, texts.REFUSAL)]


# -------------------------------------------------------------- notifications


def test_notification_goes_to_its_chat_with_a_reconnect_button(state: ConversationState) -> None:
    note = NotificationDue(9, "expired", "fake", "Fake", chat_id=CHAT)
    _, effects = step(state, note)
    assert effects == [
        Send(
            CHAT,
            "⚠️ Fake connection expired — tap to reconnect.",
            buttons=(CallbackButton("Reconnect Fake", "connect:fake"),),
        ),
        MarkDelivered(9),
    ]


def test_an_expiry_after_a_lost_answer_says_so(state: ConversationState) -> None:
    note = NotificationDue(4, "expired", "fake", "Fake", chat_id=CHAT, reason="answer_lost")
    _, effects = step(state, note)
    assert isinstance(effects[0], Send)
    assert "lost in transit" in effects[0].text
    assert effects[0].buttons == (CallbackButton("Reconnect Fake", "connect:fake"),)


def test_notification_without_chat_goes_to_every_owner(state: ConversationState) -> None:
    note = NotificationDue(3, "refresh_failing", "fake", "Fake", chat_id=None, data={"attempts": 3})
    _, effects = step(state, note)
    text = "⚠️ Fake token refresh keeps failing — tap to reconnect."
    button = (CallbackButton("Reconnect Fake", "connect:fake"),)
    assert effects == [
        Send(100, text, buttons=button),
        Send(101, text, buttons=button),
        MarkDelivered(3),
    ]


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (
            "reconnect_soon",
            "⏳ Spotify needs reconnecting by 2027-07-15 08:00 UTC: its grant ends 6 months"
            " after authorization. Three days left — tap to reconnect now.",
        ),
        (
            "reconnect_today",
            "⏳ Last day: Spotify needs reconnecting by 2027-07-15 08:00 UTC: its grant ends"
            " 6 months after authorization. Tap to reconnect.",
        ),
    ],
)
def test_lifetime_warnings_carry_a_one_tap_reconnect(
    state: ConversationState, kind: str, text: str
) -> None:
    # what Broker.warn_lifetime queues: the deadline and the catalog's rule, no sentence
    data = {
        "deadline": 1_815_638_400_000,  # 2027-07-15 08:00 UTC
        "lifetime": {"rule": "absolute", "months": 6, "days": 0, "condition": None},
    }
    due = NotificationDue(5, kind, "spotify", "Spotify", CHAT, "grant_lifetime", data)
    _, effects = step(state, due)
    assert effects == [
        Send(CHAT, text, buttons=(CallbackButton("Reconnect Spotify", "connect:spotify"),)),
        MarkDelivered(5),
    ]


def test_connections_say_when_to_reconnect() -> None:
    state = ConversationState(owners=frozenset({OWNER}), tz="Europe/Berlin")
    deadline = NOW + 3 * 86_400_000 + 3_600_000
    items = (
        ConnectionView("spotify", "Spotify", "stored", NOW + 60_000, None, (), deadline),
        ConnectionView("fake", "Fake", "expired", NOW - 60_000, None, (), deadline),
    )
    _, effects = step(state, ConnectionsListed(CHAT, items, NOW))
    assert isinstance(effects[0], Send)
    lines = effects[0].text.splitlines()
    assert lines[2] == "    reconnect needed by 2027-01-18 10:00 CET (in 3d 1h)"
    assert "reconnect" not in "\n".join(lines[3:])  # an expired one needs it now, not by


def test_reconnect_tap_starts_connect_and_leaves_credential_entry(
    state: ConversationState,
) -> None:
    state, _ = step(state, CredentialsNeeded(CHAT, "other", "Other", needs_secret=True))
    state, effects = step(state, Tap(CHAT, OWNER, 5, 78, "connect:fake"))
    assert state.chats == {}
    assert effects == [AnswerTap(78), BeginConnect(CHAT, "fake")]


def test_unknown_tap_is_just_answered(state: ConversationState) -> None:
    assert step(state, Tap(CHAT, OWNER, 5, 79, "zzz")) == (state, [AnswerTap(79)])


# -------------------------------------------------------------------- results


@pytest.mark.parametrize(
    ("inbound", "text"),
    [
        (
            ProviderUnknown(CHAT, "fak", ("fake",), ("dexcom", "fake")),
            "I don't know a provider called 'fak'. Did you mean fake?\n"
            "Known providers: dexcom, fake.",
        ),
        (
            ProviderUnknown(CHAT, "", (), ("dexcom", "fake")),
            "Which provider? Say connect <provider>. Known providers: dexcom, fake.",
        ),
        (
            Disconnected(CHAT, "fake", "Fake", revoked_remotely=True, has_revocation_endpoint=True),
            "🔌 Fake disconnected: access revoked at Fake and the tokens removed.",
        ),
        (NotConnected(CHAT, "fake", "Fake"), "Fake is not connected."),
        (FlowsCancelled(CHAT, ()), texts.NOTHING_TO_CANCEL),
        (FlowsCancelled(CHAT, ("Fake",)), "Cancelled the pending authorization of Fake."),
        (ConnectionsListed(CHAT, (), NOW), texts.NO_CONNECTIONS),
        (FlowsListed(CHAT, None, (), NOW), texts.NO_FLOWS),
        (
            CommandUnavailable(
                CHAT,
                "temp",
                ProviderTransientError("Thermo is unavailable (HTTP 503)", provider="thermo"),
            ),
            "⚠️ No temperature: Thermo is unavailable (HTTP 503)",
        ),
        (CommandUnavailable(CHAT, "temp"), "⚠️ No temperature"),
        (CommandAnswered(CHAT, "36.8 °C", None), "36.8 °C"),
        (
            CommandUnavailable(CHAT, "temp", NotConnectedError(provider="thermo"), "Thermo"),
            "Thermo is not connected. Say connect thermo first.",
        ),
        (
            CommandFailed(CHAT, ProviderTransientError("HTTP 503", provider="thermo")),
            "⚠️ The provider could not be reached; try again in a moment. (HTTP 503)",
        ),
    ],
)
def test_results_become_replies(state: ConversationState, inbound: object, text: str) -> None:
    assert step(state, inbound) == (state, [Send(CHAT, text)])  # type: ignore[arg-type]


def test_no_revocation_endpoint_is_said(state: ConversationState) -> None:
    _, effects = step(
        state,
        Disconnected(CHAT, "w", "Withings", revoked_remotely=False, has_revocation_endpoint=False),
    )
    assert len(effects) == 1
    assert isinstance(effects[0], Send)
    assert "Withings has no revocation endpoint" in effects[0].text


def test_connections_list_shows_state_expiry_and_last_refresh(state: ConversationState) -> None:
    items = (
        ConnectionView("dexcom", "Dexcom", "stored", NOW + 7_200_000, NOW - 300_000, ("offline",)),
        ConnectionView("fake", "Fake", "expired", NOW - 60_000, None),
    )
    _, effects = step(state, ConnectionsListed(CHAT, items, NOW))
    assert effects == [
        Send(
            CHAT,
            "✅ Dexcom — stored\n"
            "    token expires in 2h (2027-01-15 10:00 UTC); last refresh 5m ago\n"
            "    scopes: offline\n"
            "⚠️ Fake — expired\n"
            "    token expired 1m ago (2027-01-15 07:59 UTC); never refreshed",
        )
    ]


def test_connections_use_the_owners_time_zone() -> None:
    state = ConversationState(owners=frozenset({OWNER}), tz="Europe/Berlin")
    items = (ConnectionView("fake", "Fake", "stored", NOW + 60_000, None),)
    _, effects = step(state, ConnectionsListed(CHAT, items, NOW))
    assert isinstance(effects[0], Send)
    assert "(2027-01-15 09:01 CET)" in effects[0].text


def test_flows_list(state: ConversationState) -> None:
    items = (
        FlowView("ab12", "fake", "failed", NOW - 120_000, "access_denied"),
        FlowView("cd34", "fake", "stored", NOW - 7_200_000),
    )
    _, effects = step(state, FlowsListed(CHAT, "fake", items, NOW))
    assert effects == [
        Send(
            CHAT,
            "Recent flows of fake:\n"
            "❌ ab12 fake — failed (access_denied), 2m ago\n"
            "✅ cd34 fake — stored, 2h ago",
        )
    ]


def test_a_command_answer_with_a_chart_is_an_image(state: ConversationState) -> None:
    _, effects = step(state, CommandAnswered(CHAT, "36.8 °C ↗", b"\x89PNG..."))
    assert effects == [SendImage(CHAT, b"\x89PNG...", caption="36.8 °C ↗")]


def test_help_lists_integration_commands_before_help() -> None:
    table = command_table({"temp": TEMP})
    assert [row.name for row in table] == [
        "connect", "connections", "disconnect", "flows", "cancel", "audit", "temp", "help"
    ]  # fmt: skip
    assert table[-2] == BotCommand(
        "temp", ("temperature",), "[Nd]", TEMP.help.split(" — ")[1], "integration"
    )
    assert table[-2].help == TEMP.help
    assert texts.help_text([row.help for row in table]) == HELP_WITH_TEMP


def test_the_menu_the_help_and_the_parser_read_one_table(state: ConversationState) -> None:
    table = command_table(state.commands)
    entries = menu(state)
    assert [name for name, _ in entries] == [row.name for row in table]
    assert dict(entries)["connect"] == (
        "<provider|url> [device] — connect a provider (or an MCP server by its URL; add"
        " device for a code)"
    )
    assert dict(entries)["temp"] == "[Nd] — body temperature and a chart"
    assert dict(entries)["help"] == "what I can do"
    for row in table:  # every name and alias parses to its row
        for word in (row.name, *row.aliases):
            assert parse_command(word, state.commands) == (row.name, [])
    help_lines = _help_lines(state)
    assert help_lines == [row.help for row in table]


def _help_lines(state: ConversationState) -> list[str]:
    _, (effect,) = step(state, msg("help"))
    assert isinstance(effect, Send)
    return effect.text.split("\n\n", 1)[1].splitlines()
    assert texts.help_text([TEMP.help]).endswith(f"\n{TEMP.help}\nhelp — this text")
    assert TEMP.help not in texts.HELP


# ---------------------------------------------------------------- token hand-outs


def test_a_first_hand_out_is_news_without_a_reconnect_button(state: ConversationState) -> None:
    where = "tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)"
    data = {"who": "tag:ci", "node": "ci-runner.tailnet.ts.net", "address": "100.64.0.4"}
    _, effects = step(state, NotificationDue(7, "first_handout", "fake", "Fake", data=data))
    text = (
        f"🔑 First Fake token for {where}. Every hand-out is in the audit: say audit to see"
        " them; the [[access]] policy in agentd.toml decides who may."
    )
    assert effects == [Send(100, text), Send(101, text), MarkDelivered(7)]


def test_audit_list() -> None:
    state = ConversationState(owners=frozenset({OWNER}), tz="Europe/Berlin")
    ci = ("tag:ci", "ci.tailnet.ts.net", "100.64.0.4")
    owner = ("owner@example.com", "", "100.64.0.2")
    items = (
        HandOutView(NOW - 60_000, *ci, "fake", "Fake", "0a1b2c3d"),
        HandOutView(NOW - 7_200_000, *owner, "fake", "Fake", "99aa88bb"),
    )
    _, effects = step(state, AuditListed(CHAT, "fake", None, items, NOW))
    assert effects == [
        Send(
            CHAT,
            "Token hand-outs for fake, newest first:\n"
            "🔑 Fake to tag:ci on ci.tailnet.ts.net (100.64.0.4), 2027-01-15 08:59 CET"
            " (1m ago); token 0a1b2c3d…\n"
            "🔑 Fake to owner@example.com on 100.64.0.2, 2027-01-15 07:00 CET (2h ago);"
            " token 99aa88bb…",
        )
    ]
    _, effects = step(state, AuditListed(CHAT, None, "tag:gpu", (), NOW))
    assert effects == [Send(CHAT, "No token hand-outs for tag:gpu.")]
    _, effects = step(state, AuditListed(CHAT, None, None, (), NOW))
    assert effects == [Send(CHAT, texts.NO_HANDOUTS)]


def test_help_and_menu_offer_the_audit(state: ConversationState) -> None:
    _, effects = step(state, msg("help"))
    assert isinstance(effects[0], Send)
    assert (
        "audit [provider | login | tag:name] — tokens handed to other machines: who, when,"
        " from where" in effects[0].text
    )
    assert ("audit", "[provider | login | tag:name] — tokens handed to other machines: who,"
            " when, from where") in menu(state)  # fmt: skip
