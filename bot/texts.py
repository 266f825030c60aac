"""Every user-facing string of the Telegram bot, and the small formatters they need. [pure]

Nothing else in bot/ spells out a sentence for the owner: the dialogue picks a text from
here, the runner never writes one. Times are shown in the owner's time zone (``tz``, an
IANA name; UTC by default) and, where it helps, relative to ``now_ms``. No text ever
includes a secret: the functions only receive provider names, states, times and scopes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flowengine import errors as e
from flowengine.timefmt import format_duration

__all__ = [
    "ASK_CLIENT_ID",
    "BAD_CLIENT_ID",
    "BAD_SECRET",
    "COMMAND_ARGS",
    "COMMAND_HELP",
    "CREDENTIALS_CANCELLED",
    "CREDENTIALS_SAVED",
    "LEFT_CREDENTIALS",
    "MENU_HELP",
    "NOTHING_TO_CANCEL",
    "NO_HANDOUTS",
    "NO_CONNECTIONS",
    "NO_FLOWS",
    "REFUSAL",
    "SECRET_DELETED",
    "SECRET_IS_THE_CLIENT_ID",
    "SECRET_NOT_DELETED",
    "UNKNOWN_COMMAND",
    "ask_client_secret",
    "audit",
    "authorize_button",
    "authorize_prompt",
    "cancelled_flows",
    "command_at_prompt",
    "command_failed",
    "command_not_connected",
    "connections",
    "did_you_mean",
    "disconnected",
    "ERRORS",
    "duration",
    "error",
    "flow_cancelled",
    "device_button",
    "device_expired",
    "device_prompt",
    "device_qr_caption",
    "flow_connected",
    "flow_denied",
    "flow_failed",
    "flow_timed_out",
    "flows",
    "help_line",
    "handout_caller",
    "help_text",
    "lifetime",
    "local_time",
    "menu_description",
    "not_a_credential",
    "not_connected",
    "notification",
    "reconnect_button",
    "reconnect_needed",
    "relative",
    "unknown_provider",
]

# ---------------------------------------------------------------- fixed replies

REFUSAL = "Sorry, this is a private bot."

#: what each built-in command does, by its name in the command table (bot/dialogue.py)
COMMAND_HELP = {
    "connect": "authorize a provider (asks for client credentials if needed), or an MCP"
    " server by its URL; device: a code to enter on any device instead of a link",
    "connections": "every connection with its state, expiry and last refresh (also /status)",
    "disconnect": "revoke and remove a provider's tokens",
    "flows": "recent authorization flows and their states",
    "cancel": "stop what is in progress (credential entry or a pending authorization)",
    "audit": "tokens handed to other machines: who, when, from where",
    "help": "this text",
}


def help_line(name: str, args: str, description: str) -> str:
    """``connect <provider> — authorize a provider ...``: one line of the help."""
    return f"{name}{' ' + args if args else ''} — {description}"


#: where Telegram's "/" menu says it differently from the help
MENU_HELP = {
    "help": "what I can do",
    "connect": "connect a provider (or an MCP server by its URL; add device for a code)",
}

#: what each built-in command takes, as its help writes it
COMMAND_ARGS = {
    "connect": "<provider|url> [device]",
    "disconnect": "<provider>",
    "flows": "[provider]",
    "audit": "[provider | login | tag:name]",
}


def help_text(lines: Sequence[str]) -> str:
    """The help: one line per command of the table (bot/dialogue.py), in its order."""
    return "I connect your agent to OAuth providers.\n\n" + "\n".join(lines)


UNKNOWN_COMMAND = "I did not understand that. Say help for what I can do."


def did_you_mean(suggestions: Sequence[str]) -> str:
    """A mistyped command: the closest commands, whole (``connect dexcom``)."""
    return (
        f"I did not understand that. Did you mean {' or '.join(suggestions)}? (Say help for all.)"
    )


def menu_description(args: str, description: str) -> str:
    """The text next to a command in Telegram's "/" menu (at most 256 characters)."""
    text = f"{args} — {description}" if args else description
    return text[:256]


ASK_CLIENT_ID = (
    "No client credentials are stored for {name} yet.\n"
    "Send me the client id of your {name} app (or say cancel)."
)


def ask_client_secret(name: str, provider: str) -> str:
    """The secret prompt, with the safer way: the terminal (bot chats are not end-to-end
    encrypted, so the secret passes Telegram's servers even though I delete it)."""
    return (
        f"Now send the client secret of your {name} app.\n"
        "I delete your message as soon as I have read it. Safer: chats with a bot are not"
        " end-to-end encrypted, so you may rather type it on the server:\n"
        f"agentd credentials {provider}\n"
        f"then say connect {provider} (or say cancel here)."
    )


BAD_CLIENT_ID = "A client id has no spaces. Send it again, or say cancel."
BAD_SECRET = (
    "That does not look like a client secret (it has spaces). Send it again, or say cancel."
)


def command_at_prompt(word: str, what: str) -> str:
    """A command word sent where a credential was asked for: not stored."""
    return (
        f"“{word}” is a command, not a {what}: I did not store it. Send the {what},"
        f" say cancel to stop, or /{word} to leave the credential entry."
    )


def not_a_credential(what: str, why: str) -> str:
    """An answer that cannot be a credential (too short, a chat word, not ASCII)."""
    return (
        f"That does not look like a {what} ({why}): I did not store it."
        " Send it again, or say cancel."
    )


SECRET_IS_THE_CLIENT_ID = (
    "That is the client id again, not the client secret: I did not store it."
    " Send the secret, or say cancel."
)
CREDENTIALS_CANCELLED = "OK, nothing was stored."
LEFT_CREDENTIALS = "(I stopped waiting for the {name} client credentials; nothing was stored.)"
CREDENTIALS_SAVED = "🔑 Client credentials for {name} stored."
SECRET_DELETED = "🔒 I deleted your message with the client secret."
SECRET_NOT_DELETED = (
    "⚠️ I could not delete your message with the client secret: please delete it yourself."
)

NO_CONNECTIONS = "No connections yet. Say connect <provider> to add one."
NO_FLOWS = "No authorization flows yet."
NOTHING_TO_CANCEL = "Nothing to cancel."
NO_HANDOUTS = "No token was handed to another machine yet."

_STATE_ICONS = {
    "stored": "✅",
    "refreshing": "🔄",
    "expired": "⚠️",
    "revoked": "🔌",
    "superseded": "↪️",
    "failed": "❌",
    "cancelled": "🚫",
    "initiated": "⏳",
    "awaiting_code": "⏳",
    "code_received": "⏳",
    "exchanged": "⏳",
}


# ------------------------------------------------------------------- formatting


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def duration(seconds: float) -> str:
    """A duration as the CLI writes it too: ``45s``, ``12m``, ``2h 5m``, ``3d 4h``."""
    return format_duration(seconds)


def relative(at_ms: int, now_ms: int) -> str:
    """``in 2h 5m`` or ``12m ago`` (``just now`` within a second)."""
    delta = (at_ms - now_ms) / 1000
    if abs(delta) < 1:
        return "just now"
    return f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"


def local_time(at_ms: int, tz: str = "UTC") -> str:
    """``2026-11-24 13:05 CET``: a wall-clock time in the owner's zone."""
    when = datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(_zone(tz))
    return when.strftime("%Y-%m-%d %H:%M %Z")


def _expiry(expires: int | None, now_ms: int, tz: str) -> str:
    if expires is None:
        return "expiry unknown"
    if expires <= now_ms:
        return f"expired {relative(expires, now_ms)} ({local_time(expires, tz)})"
    return f"expires {relative(expires, now_ms)} ({local_time(expires, tz)})"


def _scopes(scopes: Sequence[str]) -> str:
    return ", ".join(scopes) if scopes else "none listed"


# ------------------------------------------------------------------- connecting


def unknown_provider(provider: str, suggestions: Sequence[str], known: Sequence[str]) -> str:
    listing = ", ".join(known) if known else "none"
    if not provider:
        return f"Which provider? Say connect <provider>. Known providers: {listing}."
    text = f"I don't know a provider called {provider!r}."
    if suggestions:
        text += f" Did you mean {' or '.join(suggestions)}?"
    return f"{text}\nKnown providers: {listing}."


def authorize_prompt(name: str, valid_seconds: float | None) -> str:
    text = f"Tap the button to authorize {name}."
    if valid_seconds:
        text += f" The link is valid for {duration(valid_seconds)}."
    return text


def authorize_button(name: str) -> str:
    return f"Authorize {name}"


def flow_connected(
    name: str, scopes: Sequence[str], expires: int | None, now_ms: int, tz: str = "UTC"
) -> str:
    return f"✅ {name} connected\nScopes: {_scopes(scopes)}\nToken {_expiry(expires, now_ms, tz)}"


def flow_denied(name: str) -> str:
    return f"❌ {name} authorization was denied"


def flow_timed_out(provider: str, *, device_hint: bool = False) -> str:
    text = f"⌛ link expired — say connect {provider} to try again"
    if device_hint:
        text += (
            f"\nIf the browser could not come back here, say connect {provider} device:"
            " you enter a code instead, on any device"
        )
    return text


def device_prompt(
    name: str, user_code: str, verification_uri: str, valid_seconds: float | None
) -> str:
    """The device grant (RFC 8628): where to go and which code to enter."""
    text = (
        f"To connect {name}, open {verification_uri} on any device and enter the code\n\n"
        f"{user_code}"
    )
    if valid_seconds:
        text += f"\n\nThe code is valid for {duration(valid_seconds)}. I check for your answer."
    return text


def device_button(name: str) -> str:
    return f"Open the {name} page"


def device_qr_caption(name: str) -> str:
    return f"Scan to open the {name} page with the code filled in"


def device_expired(provider: str) -> str:
    return f"⌛ the code expired — say connect {provider} device to get a new one"


def flow_cancelled(name: str) -> str:
    return f"🚫 {name} authorization cancelled"


def flow_failed(name: str, provider: str, detail: str | None) -> str:
    why = f": {detail}" if detail else ""
    return f"❌ {name} connection failed{why}\nSay connect {provider} to try again."


def cancelled_flows(names: Sequence[str]) -> str:
    if not names:
        return NOTHING_TO_CANCEL
    return f"Cancelled the pending authorization of {', '.join(names)}."


# ------------------------------------------------------------------ connections


def connections(
    items: Sequence[tuple[str, str, int | None, int | None, Sequence[str]]],
    now_ms: int,
    tz: str = "UTC",
    *,
    reconnect_by: Mapping[str, int] | None = None,
) -> str:
    """``items``: (name, state, expires ms, last refresh ms, scopes) per connection;
    ``reconnect_by``: name -> when the provider ends the grant (epoch ms), where known."""
    if not items:
        return NO_CONNECTIONS
    lines: list[str] = []
    for name, state, expires, last_refresh, scopes in items:
        icon = _STATE_ICONS.get(state, "•")
        lines.append(f"{icon} {name} — {state}")
        refreshed = (
            f"last refresh {relative(last_refresh, now_ms)}"
            if last_refresh is not None
            else "never refreshed"
        )
        lines.append(f"    token {_expiry(expires, now_ms, tz)}; {refreshed}")
        if scopes:
            lines.append(f"    scopes: {_scopes(scopes)}")
        deadline = (reconnect_by or {}).get(name)
        if deadline is not None and state in ("stored", "refreshing"):
            lines.append(f"    {reconnect_needed(deadline, now_ms, tz)}")
    return "\n".join(lines)


def reconnect_needed(deadline: int, now_ms: int, tz: str = "UTC") -> str:
    """``reconnect needed by 2027-05-20 14:00 CEST (in 3d 4h)``."""
    return f"reconnect needed by {local_time(deadline, tz)} ({relative(deadline, now_ms)})"


def disconnected(name: str, *, revoked_remotely: bool, has_revocation_endpoint: bool) -> str:
    if revoked_remotely:
        return f"🔌 {name} disconnected: access revoked at {name} and the tokens removed."
    if has_revocation_endpoint:
        return (
            f"🔌 {name} disconnected: the tokens are removed here, but revoking them at {name}"
            f" failed — remove the app's access in your {name} account settings."
        )
    return (
        f"🔌 {name} disconnected: the tokens are removed here. {name} has no revocation"
        f" endpoint — remove the app's access in your {name} account settings."
    )


def not_connected(name: str) -> str:
    return f"{name} is not connected."


def flows(
    items: Sequence[tuple[str, str, str, int, str | None]],
    now_ms: int,
    provider: str | None = None,
) -> str:
    """``items``: (flow id, provider, state, updated ms, error code) per flow, newest first."""
    if not items:
        return f"No authorization flows for {provider} yet." if provider else NO_FLOWS
    lines = [f"Recent flows{f' of {provider}' if provider else ''}:"]
    for flow_id, prov, state, updated, error_code in items:
        icon = _STATE_ICONS.get(state, "•")
        why = f" ({error_code})" if error_code else ""
        lines.append(f"{icon} {flow_id} {prov} — {state}{why}, {relative(updated, now_ms)}")
    return "\n".join(lines)


def audit(
    items: Sequence[tuple[int, str, str, str, str, str]],
    now_ms: int,
    tz: str = "UTC",
    about: str | None = None,
) -> str:
    """``items``: (at ms, who, node, address, provider name, token hash prefix), newest
    first; ``about``: the provider or identity the list is limited to."""
    if not items:
        return f"No token hand-outs for {about}." if about else NO_HANDOUTS
    lines = [f"Token hand-outs{f' for {about}' if about else ''}, newest first:"]
    for at, who, node, address, name, sha in items:
        where = f"{node} ({address})" if node else address
        lines.append(
            f"🔑 {name} to {who} on {where}, {local_time(at, tz)} ({relative(at, now_ms)});"
            f" token {sha}…"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- notifications


def lifetime(data: Mapping[str, object]) -> str:
    """``6 months after authorization``: a catalog ``refresh_lifetime`` (its ``public()``)."""
    parts = []
    for unit in ("months", "days"):
        count = data.get(unit)
        if isinstance(count, int) and count:
            parts.append(f"{count} {unit if count != 1 else unit[:-1]}")
    span = " ".join(parts)
    return (
        f"{span} after authorization"
        if data.get("rule") == "absolute"
        else f"{span} after the last refresh"
    )


def handout_caller(data: Mapping[str, object]) -> str:
    """``tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)``."""
    node, address = data.get("node"), data.get("address")
    where = f"{node} ({address})" if node else f"{address}"
    return f"{data.get('who')} on {where}"


def _reconnect_by(name: str, data: Mapping[str, object], tz: str) -> str | None:
    """``Spotify needs reconnecting by 2027-07-15 08:00 UTC: its grant ends 6 months
    after authorization``; None when the data lacks the deadline."""
    deadline, rule = data.get("deadline"), data.get("lifetime")
    if not isinstance(deadline, int) or not isinstance(rule, Mapping):
        return None
    return (
        f"{name} needs reconnecting by {local_time(deadline, tz)}: its grant ends {lifetime(rule)}"
    )


def notification(
    kind: str,
    name: str,
    *,
    reason: str | None = None,
    data: Mapping[str, object] | None = None,
    tz: str = "UTC",
    message: str = "",
) -> str:
    """A ledger notification for the owner, from its kind, reason code and data
    (``message``: the text an older version queued instead of data)."""
    data = data or {}
    if kind == "expired" and reason == "answer_lost":
        return (
            f"⚠️ {name} connection expired: the provider's answer to a token refresh was"
            " lost in transit, and it no longer accepts the previous refresh token"
            " — tap to reconnect."
        )
    if kind == "expired":
        return f"⚠️ {name} connection expired — tap to reconnect."
    if kind in ("refresh_failing", "refresh_failed"):
        return f"⚠️ {name} token refresh keeps failing — tap to reconnect."
    if kind in ("reconnect_soon", "reconnect_today"):
        when = _reconnect_by(name, data, tz) or message
        if when and kind == "reconnect_soon":
            return f"⏳ {when}. Three days left — tap to reconnect now."
        if when:
            return f"⏳ Last day: {when}. Tap to reconnect."
    if kind == "first_handout" and ("who" in data or message):
        who = handout_caller(data) if "who" in data else message
        return (
            f"🔑 First {name} token for {who}. Every hand-out is in the audit: say"
            " audit to see them; the [[access]] policy in agentd.toml decides who may."
        )
    return f"ℹ️ {message}" if message else f"ℹ️ {name}: {kind}"


def reconnect_button(name: str) -> str:
    return f"Reconnect {name}"


# ----------------------------------------------------------------------- errors


def _again(err: Any) -> str:
    return f'To connect it again, say "connect {err.provider}".'


#: how the bot words an error, by class: the first class on the error's MRO that is
#: listed wins (a new subclass is worded like its parent until it has a row)
ERRORS: dict[type[BaseException], Callable[[Any], str]] = {
    e.ProviderTransientError: lambda err: (
        f"⚠️ The provider could not be reached; try again in a moment. ({err.message})"
    ),
    e.ReauthorizationRequired: lambda err: (
        f"⚠️ The provider refused the grant: {err.message}. {_again(err)}"
    ),
    e.NoDeviceEndpointError: lambda err: (
        f"⚠️ {err.name} has no device authorization endpoint: say connect {err.provider}"
        " for a link instead."
    ),
    e.DiscoveryError: lambda err: f"⚠️ Something went wrong: {err.message}",
    e.ConfigError: lambda err: f"⚠️ {err.message}",
    e.StorageError: lambda err: f"⚠️ {err.message}",
    e.BrokerError: lambda err: f"⚠️ Something went wrong: {err.message}",
}


def _words(err: BaseException) -> Callable[[Any], str]:
    return e.by_class(ERRORS, err, ERRORS[e.BrokerError])


def error(err: e.BrokerError) -> str:
    """The one place a BrokerError becomes text for the owner (the :data:`ERRORS` table)."""
    return _words(err)(err)


def command_failed(failure: str, err: e.BrokerError | None, name: str | None = None) -> str:
    """An integration command failed: ``failure`` is its own opening ("No glucose reading");
    ``name`` is the provider's name when the error names one."""
    if isinstance(err, e.NotConnectedError):
        return command_not_connected(name or err.provider, err.provider)
    if err is None:
        return f"⚠️ {failure}"
    if isinstance(err, e.ReauthorizationRequired):
        return f"⚠️ {failure}: {err.message}. {_again(err)}"
    return f"⚠️ {failure}: {err.message}"


def command_not_connected(name: str, provider: str) -> str:
    return f"{name} is not connected. Say connect {provider} first."
