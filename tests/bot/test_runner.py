"""Whole conversations through the BotRunner: a fake chat, the real API over HTTP
(Hypercorn on 127.0.0.1) in the same process, which exchanges the code when its callback
arrives, a fake provider behind the real broker, a real ledger file."""

from __future__ import annotations

import json
import logging
import os
import stat
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import pytest

from bot import texts
from bot.dialogue import CallbackButton
from flowengine.credentials import ClientCredentials
from flowengine.states import FlowState, FlowTrigger

from .conftest import OWNER, STRANGER, BotRig, callback_button, url_button

pytestmark = pytest.mark.anyio


async def _states(rig: BotRig, flow_id: str) -> list[tuple[str, str]]:
    assert rig.engine is not None
    record = await rig.engine.inspect(flow_id)
    return [(e.to_state.value, e.actor) for e in record.events]


async def _only_flow(rig: BotRig) -> str:
    assert rig.engine is not None
    flows = await rig.engine.list_flows()
    assert len(flows) == 1
    return flows[0].id


# ----------------------------------------------------------------- connecting


async def test_connect_with_stored_credentials(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        assert link.chat_id == OWNER
        assert link.text == "Tap the button to authorize Fake. The link is valid for 10m."
        flow_id = await _only_flow(rig)
        # noted for a restart, privately
        assert flow_id in json.loads(rig.resume_path.read_text())
        assert stat.S_IMODE(os.stat(rig.resume_path).st_mode) == 0o600

        await rig.browser(link)
        # how soon after the callback (issue: within a second) is benchmarks/bench_api.py's
        await rig.chat.wait_for(lambda: link.edits)

        assert link.current.startswith("✅ Fake connected\nScopes: read\nToken expires in 1h")
        assert link.buttons == ()
        stored = rig.tokens.read("fake")
        assert stored is not None
        assert stored.access in rig.fake.valid_access
        assert stored.flow_id == flow_id
        assert await _states(rig, flow_id) == [
            ("initiated", "bot"),
            ("awaiting_code", "bot"),
            ("code_received", "api"),
            ("exchanged", "api"),
            ("stored", "api"),
        ]
        # the exchange used the PKCE verifier (the fake checks it) with our client
        exchange = [r for r in rig.fake.requests if r.form.get("grant_type")]
        assert [r.form["grant_type"] for r in exchange] == ["authorization_code"]
        assert exchange[0].form["code_verifier"]
        assert json.loads(rig.resume_path.read_text()) == {}


async def test_connect_asks_for_credentials_and_deletes_the_secret(rig: BotRig) -> None:
    rig.credentials.delete("fake")
    async with rig.running():
        await rig.say("/connect fake")
        assert rig.chat.texts(OWNER) == [texts.ASK_CLIENT_ID.format(name="Fake")]
        await rig.say("client-123")
        assert rig.chat.texts(OWNER)[-1] == texts.ask_client_secret("Fake", "fake")
        secret_id = await rig.say("secret-456")
        assert rig.chat.messages[secret_id].deleted
        assert rig.chat.texts(OWNER)[-3:-1] == [
            texts.SECRET_DELETED,
            texts.CREDENTIALS_SAVED.format(name="Fake"),
        ]
        creds = rig.credentials.get("fake")
        assert creds == ClientCredentials("client-123", "secret-456")
        assert stat.S_IMODE(os.stat(rig.credentials.path).st_mode) == 0o600

        link = await rig.authorize_message()
        await rig.browser(link)
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current.startswith("✅ Fake connected")
        # the secret reached no ledger row
        assert b"secret-456" not in rig.ledger.read_bytes()


async def test_command_words_at_the_prompts_are_refused_not_stored(rig: BotRig) -> None:
    """The whole conversation: "help" is no client id, "status" no secret; then the real ones."""
    rig.credentials.delete("fake")
    async with rig.running():
        await rig.say("connect fake")
        await rig.say("help")
        assert rig.chat.texts(OWNER)[-1] == texts.command_at_prompt("help", "client id")
        await rig.say("client-123")
        word_id = await rig.say("status")
        assert rig.chat.messages[word_id].deleted  # deleted like any answer to that prompt
        assert texts.command_at_prompt("status", "client secret") in rig.chat.texts(OWNER)
        assert rig.credentials.get("fake") is None
        await rig.say("secret-456")
        await rig.authorize_message()
        assert rig.credentials.get("fake") == ClientCredentials("client-123", "secret-456")


async def test_secret_that_cannot_be_deleted_is_said(rig: BotRig) -> None:
    rig.credentials.delete("fake")
    rig.chat.can_delete = False
    async with rig.running():
        await rig.say("connect fake")
        await rig.say("client-123")
        await rig.say("secret-456")
        assert texts.SECRET_NOT_DELETED in rig.chat.texts(OWNER)
        assert rig.credentials.get("fake") == ClientCredentials("client-123", "secret-456")


async def test_public_client_is_asked_only_for_its_id(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect public")
        await rig.say("public-id")
        link = await rig.authorize_message("Public")
        assert rig.credentials.get("public") == ClientCredentials("public-id", None)
        assert texts.ask_client_secret("Public", "public") not in rig.chat.texts()
        assert "client_id=public-id" in link.buttons[0].url  # type: ignore[union-attr]


async def test_unknown_provider_lists_known_ones_with_the_closest(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fak")
        assert rig.chat.texts(OWNER) == [
            "I don't know a provider called 'fak'. Did you mean fake?\n"
            "Known providers: fake, plain, public."
        ]
        assert rig.engine is not None
        assert await rig.engine.list_flows() == []


async def test_denied(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        await rig.browser(link, deny=True)
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current == "❌ Fake authorization was denied"
        flow_id = await _only_flow(rig)
        assert (await _states(rig, flow_id))[-1] == ("failed", "api")
        assert rig.tokens.read("fake") is None


async def test_timeout(rig: BotRig) -> None:
    rig.awaiting_ttl = 1.0
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        await rig.chat.wait_for(lambda: link.edits, timeout=20)
        assert link.current == "⌛ link expired — say connect fake to try again"
        flow_id = await _only_flow(rig)
        assert (await _states(rig, flow_id))[-1][0] == "expired"
        assert json.loads(rig.resume_path.read_text()) == {}


async def test_a_flow_another_process_cancels_wakes_the_bot(rig: BotRig) -> None:
    """`agentd flows cancel` runs in its own process: the engine's watcher wakes the bot."""
    from flowengine.engine import FlowEngine

    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        async with await FlowEngine.open(rig.ledger) as other:
            await other.cancel(await _only_flow(rig), actor="cli")
        await rig.chat.wait_for(lambda: link.edits, timeout=20)
        assert link.current == "🚫 Fake authorization cancelled"


async def test_a_code_a_restart_left_unexchanged_is_completed_by_the_bot(rig: BotRig) -> None:
    """The daemon stopped between recording the callback and its exchange."""
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        flow_id = await _only_flow(rig)
    # the callback is recorded by an engine that never exchanges (the crashed daemon)
    from flowengine.engine import FlowEngine
    from flowengine.protocol import parse_callback

    url = url_button(link).url
    state = parse_qs(urlsplit(url).query)["state"][0]
    async with await FlowEngine.open(rig.ledger) as crashed:
        verifier = await crashed.code_verifier(flow_id)
        code = rig.fake.issue_code(redirect_uri=rig.redirect_uri, code_verifier=verifier)
        await crashed.record_callback(parse_callback(urlencode({"code": code, "state": state})))
    async with rig.running():
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current.startswith("✅ Fake connected")
        assert (await _states(rig, flow_id))[-2:] == [("exchanged", "bot"), ("stored", "bot")]


async def test_exchange_refused_by_the_provider(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        rig.fake.client_secret = "rotated-elsewhere"  # our stored secret no longer works
        await rig.browser(link)
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current.startswith("❌ Fake connection failed: ")
        assert link.current.endswith("\nSay connect fake to try again.")
        assert "rotated-elsewhere" not in link.current
        assert (await _states(rig, await _only_flow(rig)))[-1] == ("failed", "api")


async def test_cancel_ends_the_pending_link(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        await rig.say("cancel")
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current == "🚫 Fake authorization cancelled"
        assert "Cancelled the pending authorization of Fake." in rig.chat.texts(OWNER)
        await rig.say("cancel")
        assert rig.chat.texts(OWNER)[-1] == texts.NOTHING_TO_CANCEL


async def test_a_second_connect_replaces_the_first_link(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        first = await rig.authorize_message()
        await rig.say("connect fake")
        await rig.chat.wait_for(lambda: first.edits)
        assert first.current == "🚫 Fake authorization cancelled"
        second = await rig.chat.wait_message(lambda m: bool(m.buttons) and m.id != first.id)
        await rig.browser(second)
        await rig.chat.wait_for(lambda: second.edits)
        assert second.current.startswith("✅ Fake connected")


async def test_link_that_cannot_be_sent_cancels_its_flow(rig: BotRig) -> None:
    async with rig.running():
        rig.chat.fail_sends = 1
        await rig.say("connect fake")
        assert rig.chat.sent() == []
        assert rig.engine is not None
        flows = await rig.engine.list_flows()
        assert [f.state for f in flows] == [FlowState.CANCELLED]


# ------------------------------------------------------------------ strangers


async def test_non_owner_gets_one_refusal_and_is_logged_without_content(
    rig: BotRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with rig.running():
        await rig.say("connect fake please-log-me-not", sender=STRANGER)
        await rig.say("help", sender=STRANGER)
        assert rig.chat.texts() == [texts.REFUSAL]
        assert rig.chat.sent()[0].chat_id == STRANGER
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 2
        assert all(str(STRANGER) in r.getMessage() for r in refusals)
        assert "please-log-me-not" not in caplog.text
        assert rig.engine is not None
        assert await rig.engine.list_flows() == []


# --------------------------------------------------------------- connections


async def _connected(rig: BotRig, provider: str = "fake", name: str = "Fake") -> str:
    await rig.say(f"connect {provider}")
    link = await rig.authorize_message(name)
    await rig.browser(link)
    await rig.chat.wait_for(lambda: link.edits)
    assert link.current.startswith(f"✅ {name} connected"), link.current
    assert rig.engine is not None
    connection = await rig.engine.connection(provider)
    assert connection is not None
    return connection.id


async def test_connections_and_flows(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("/status")
        assert rig.chat.texts(OWNER)[-1] == texts.NO_CONNECTIONS
        flow_id = await _connected(rig)
        await rig.say("connections")
        listing = rig.chat.texts(OWNER)[-1]
        assert listing.startswith("✅ Fake — stored\n    token expires in ")
        assert "never refreshed" in listing
        assert "scopes: read" in listing
        await rig.say("flows fake")
        flows = rig.chat.texts(OWNER)[-1]
        assert flows.startswith("Recent flows of fake:\n")
        assert f"✅ {flow_id} fake — stored, " in flows


async def test_disconnect_with_revocation(rig: BotRig) -> None:
    async with rig.running():
        flow_id = await _connected(rig)
        stored = rig.tokens.read("fake")
        assert stored is not None
        await rig.say("disconnect fake")
        assert rig.chat.texts(OWNER)[-1] == (
            "🔌 Fake disconnected: access revoked at Fake and the tokens removed."
        )
        assert rig.fake.revoked == [stored.refresh]
        assert rig.tokens.read("fake") is None
        assert rig.engine is not None
        record = await rig.engine.inspect(flow_id)
        assert record.events[-1].trigger is FlowTrigger.REVOKE
        assert record.events[-1].actor == "bot"
        await rig.say("disconnect fake")
        assert rig.chat.texts(OWNER)[-1] == "Fake is not connected."


async def test_disconnect_without_revocation_endpoint_says_so(rig: BotRig) -> None:
    async with rig.running():
        await _connected(rig, "plain", "Plain")
        await rig.say("disconnect plain")
        assert "Plain has no revocation endpoint" in rig.chat.texts(OWNER)[-1]
        assert rig.fake.revoked == []
        assert rig.tokens.read("plain") is None


# -------------------------------------------------------------- notifications


async def test_notification_with_reconnect_button(rig: BotRig) -> None:
    async with rig.running() as runner:
        assert rig.engine is not None
        await rig.engine.notify(kind="expired", provider="fake", reason="invalid_grant")
        rig.chat.fail_sends = 1
        assert await runner.deliver_notifications() == 1
        assert rig.chat.sent() == []
        assert len(await rig.engine.notifications()) == 1  # not delivered: kept

        assert await runner.deliver_notifications() == 1
        note = rig.chat.sent(OWNER)[0]
        assert note.text == "⚠️ Fake connection expired — tap to reconnect."
        assert callback_button(note) == CallbackButton("Reconnect Fake", "connect:fake")
        assert await rig.engine.notifications() == []

        await rig.tap(note, query_id=31)
        assert (31, None) in rig.chat.answers
        link = await rig.authorize_message()
        await rig.browser(link)
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current.startswith("✅ Fake connected")


async def test_notifications_written_by_another_process_are_delivered_by_the_loop(
    rig: BotRig,
) -> None:
    from flowengine.engine import FlowEngine

    async with rig.running(notify_interval=0.05), await FlowEngine.open(rig.ledger) as other:
        # another process (another engine on the same ledger) writes the row
        await other.notify(
            kind="refresh_failing", provider="fake", data={"attempts": 3}, chat_id=OWNER
        )
        note = await rig.chat.wait_message(lambda m: bool(m.buttons))
        assert note.text == "⚠️ Fake token refresh keeps failing — tap to reconnect."
        with anyio.fail_after(10):
            while await other.notifications():
                await anyio.sleep(0.02)


# ------------------------------------------------------------------- restarts


async def test_restart_mid_flow_resumes_polling(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
        flow_id = await _only_flow(rig)
    # the bot is down; the resume file remembers the link
    assert list(json.loads(rig.resume_path.read_text())) == [flow_id]
    async with rig.running() as runner:
        assert runner.watching == [flow_id]
        await rig.browser(link)
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current.startswith("✅ Fake connected")
        assert await _states(rig, flow_id) == [
            ("initiated", "bot"),
            ("awaiting_code", "bot"),
            ("code_received", "api"),
            ("exchanged", "api"),
            ("stored", "api"),
        ]
    assert json.loads(rig.resume_path.read_text()) == {}


async def test_a_link_sent_before_the_runner_started_is_watched_once(rig: BotRig) -> None:
    async def early() -> None:
        await rig.say("connect fake")

    async with rig.running(before_run=early) as runner:
        link = await rig.authorize_message()
        flow_id = await _only_flow(rig)
        assert runner.watching == [flow_id]
        await rig.browser(link)
        await rig.chat.wait_for(lambda: link.edits)
        assert link.edits == [link.current]
        assert link.current.startswith("✅ Fake connected")


async def test_a_flow_that_ended_while_the_bot_was_down_is_reported(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
    await rig.browser(link, deny=True)
    async with rig.running() as runner:
        await rig.chat.wait_for(lambda: link.edits)
        assert link.current == "❌ Fake authorization was denied"
        assert runner.watching == []
    assert json.loads(rig.resume_path.read_text()) == {}


async def test_a_bot_flow_missing_from_the_resume_file_is_cancelled(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake")
        link = await rig.authorize_message()
    rig.resume_path.write_text("{not json")
    async with rig.running() as runner:
        assert runner.watching == []
        message = await rig.chat.wait_message(lambda m: m.id != link.id)
        assert message.text == "🚫 Fake authorization cancelled"
        assert rig.engine is not None
        assert [f.state for f in await rig.engine.list_flows()] == [FlowState.CANCELLED]


# ------------------------------------------------------------------ hand-outs


async def test_audit_and_the_first_hand_out_notice(rig: BotRig) -> None:
    from flowengine.audit import Caller

    async with rig.running() as runner:
        await _connected(rig)
        broker = runner.broker
        ci = Caller("tag:ci", "ci-runner.tailnet.ts.net", "100.64.0.4")
        for _ in range(2):
            assert (await broker.hand_out("fake", ci)).handed_out
        assert await runner.deliver_notifications() == 1
        note = rig.chat.sent(OWNER)[-1]
        assert note.text.startswith(
            "🔑 First Fake token for tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)."
        )
        assert note.buttons == ()  # news, not trouble: nothing to reconnect
        await rig.say("audit")
        listing = rig.chat.texts(OWNER)[-1]
        assert listing.startswith("Token hand-outs, newest first:\n")
        assert listing.count("🔑 Fake to tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)") == 2
        sha = (await broker.handouts())[0].token_sha
        assert f"token {sha}…" in listing
        await rig.say("audit tag:ci")
        assert rig.chat.texts(OWNER)[-1].startswith("Token hand-outs for tag:ci, newest first:")
        await rig.say("audit owner@example.com")
        assert rig.chat.texts(OWNER)[-1] == "No token hand-outs for owner@example.com."
        await rig.say("audit dexcon")
        assert "dexcon" in rig.chat.texts(OWNER)[-1]  # an unknown provider, named
