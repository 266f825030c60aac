"""The bot and issue 13: ``connect <provider> device``, ``connect <url>``, and the device
flow suggested when a link expires unanswered.

The daemon rig of conftest.py with a second provider behind the broker's client: a device
provider (tests/flowengine/helpers_device.py, poll interval 1 s, real time) and a small
MCP server with its authorization server (discovery and registration).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest

from bot import dialogue as d
from bot import texts
from flowengine.catalog import Catalog
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.states import FlowState, FlowTrigger
from tests.fakes import FakeProvider
from tests.flowengine.helpers_device import USER_CODE, DeviceProvider, spec

from .conftest import OWNER, BotRig, open_rig, url_button

pytestmark = pytest.mark.anyio

MCP = "https://mcp.example.com/Tools/MCP"
ISSUER = "https://auth.mcp.example.com"


def _mcp(request: httpx.Request) -> httpx.Response:
    """An MCP server (401 + resource_metadata) and its authorization server."""
    url = str(request.url).split("?")[0]
    if url == MCP:
        prm = "https://mcp.example.com/.well-known/oauth-protected-resource/Tools/MCP"
        return httpx.Response(
            401, headers={"WWW-Authenticate": f'Bearer resource_metadata="{prm}"'}
        )
    if url.endswith("/.well-known/oauth-protected-resource/Tools/MCP"):
        return httpx.Response(
            200,
            json={
                "resource": MCP,
                "authorization_servers": [ISSUER],
                "resource_name": "Tools",
            },
        )
    if url == f"{ISSUER}/.well-known/oauth-authorization-server":
        return httpx.Response(
            200,
            json={
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/authorize",
                "token_endpoint": f"{ISSUER}/token",
                "registration_endpoint": f"{ISSUER}/register",
                "code_challenge_methods_supported": ["S256"],
            },
        )
    if url == f"{ISSUER}/register":
        body = json.loads(request.content)
        return httpx.Response(201, json={"client_id": "mcp-client", **body})
    return httpx.Response(404)


@pytest.fixture(name="device")
def _device() -> DeviceProvider:
    return DeviceProvider(interval=1, expires_in=600)


@pytest.fixture(name="rig")
async def _rig(
    tmp_path: Path, fake: FakeProvider, catalog: Catalog, device: DeviceProvider
) -> AsyncIterator[BotRig]:
    catalog.register(spec())
    # the fake provider has a device endpoint too (for the suggestion after a dead link)
    catalog.register(
        fake.spec(
            "fakedev", name="Fake Dev", device_authorization_url="https://tv.example.com/device"
        )
    )
    credentials = CredentialStore(tmp_path / "state" / "credentials.json")
    credentials.put("fake", fake.credentials())
    credentials.put("fakedev", fake.credentials())
    credentials.put("tv", ClientCredentials("tv-client"))

    async def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "tv.example.com":
            return device.handler(request)
        if request.url.host.endswith("mcp.example.com"):
            return _mcp(request)
        return await fake.handle(request)

    transport = httpx.MockTransport(route)
    async with open_rig(tmp_path, fake, catalog, credentials, provider_transport=transport) as rig:
        yield rig


async def test_connect_with_a_code(rig: BotRig, device: DeviceProvider) -> None:
    async with rig.running():
        await rig.say("connect tv device")
        prompt = await rig.chat.wait_message(lambda m: USER_CODE in m.text)
        assert prompt.text.startswith(
            f"To connect TV Provider, open https://tv.example.com/activate on any device"
            f" and enter the code\n\n{USER_CODE}\n\nThe code is valid for 10m."
        )
        button = url_button(prompt)
        assert button.url == f"https://tv.example.com/activate?user_code={USER_CODE}"
        (qr,) = [m for m in rig.chat.sent() if m.image is not None]
        assert qr.image is not None
        assert qr.image[:8] == b"\x89PNG\r\n\x1a\n"
        assert qr.text == texts.device_qr_caption("TV Provider")
        assert qr.id < prompt.id  # the QR code first, the message that gets edited last
        device.then = "tokens"  # the owner approved on the other device
        await rig.chat.wait_for(lambda: prompt.edits, timeout=20)
        assert prompt.current.startswith("✅ TV Provider connected\nScopes: read, offline_access")
        assert rig.engine is not None
        (flow,) = await rig.engine.list_flows()
        assert (flow.state, flow.grant, flow.actor, flow.chat_id) == (
            FlowState.STORED,
            "device",
            "bot",
            OWNER,
        )
        events = [e.trigger for e in (await rig.engine.inspect(flow.id)).events[1:]]
        assert events == [FlowTrigger.ISSUE_DEVICE_CODE, FlowTrigger.EXCHANGE, FlowTrigger.STORE]
        stored = rig.tokens.read("tv")
        assert stored is not None
        assert stored.access == "at-device"
        assert json.loads(rig.resume_path.read_text()) == {}
        polls = device.polls()
        assert polls
        assert all(p["client_id"] == "tv-client" for p in polls)


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        ("access_denied", "❌ TV Provider authorization was denied"),
        ("expired_token", "⌛ the code expired — say connect tv device to get a new one"),
    ],
)
async def test_a_code_refused_or_expired(
    rig: BotRig, device: DeviceProvider, answer: str, text: str
) -> None:
    device.then = answer
    async with rig.running():
        await rig.say("/connect tv device")
        prompt = await rig.chat.wait_message(lambda m: USER_CODE in m.text)
        await rig.chat.wait_for(lambda: prompt.edits, timeout=20)
        assert prompt.current == text
        assert rig.tokens.read("tv") is None


async def test_cancel_stops_the_polling(rig: BotRig, device: DeviceProvider) -> None:
    async with rig.running():
        await rig.say("connect tv device")
        prompt = await rig.chat.wait_message(lambda m: USER_CODE in m.text)
        await rig.say("cancel")
        await rig.chat.wait_for(lambda: prompt.edits, timeout=20)
        assert prompt.current == "🚫 TV Provider authorization cancelled"
        polled = len(device.polls())
    assert len(device.polls()) == polled


async def test_a_restart_polls_again(rig: BotRig, device: DeviceProvider) -> None:
    async with rig.running():
        await rig.say("connect tv device")
        prompt = await rig.chat.wait_message(lambda m: USER_CODE in m.text)
    assert rig.engine is not None
    assert list(json.loads(rig.resume_path.read_text()))
    device.then = "tokens"
    async with rig.running():
        await rig.chat.wait_for(lambda: prompt.edits, timeout=20)
        assert prompt.current.startswith("✅ TV Provider connected")


async def test_no_device_endpoint_says_so(rig: BotRig) -> None:
    async with rig.running():
        await rig.say("connect fake device")
        reply = await rig.chat.wait_message(lambda m: "device" in m.text)
        assert "Fake has no device authorization endpoint" in reply.text
        assert rig.engine is not None
        assert await rig.engine.list_flows() == []


async def test_an_unanswered_link_suggests_the_device_flow(rig: BotRig) -> None:
    rig.awaiting_ttl = 1.0
    async with rig.running():
        await rig.say("connect fakedev")
        link = await rig.authorize_message("Fake Dev")
        await rig.chat.wait_for(lambda: link.edits, timeout=20)
        assert link.current == (
            "⌛ link expired — say connect fakedev to try again\n"
            "If the browser could not come back here, say connect fakedev device:"
            " you enter a code instead, on any device"
        )
        # a provider without a device endpoint gets no such suggestion
        await rig.say("connect fake")
        plain = await rig.authorize_message()
        await rig.chat.wait_for(lambda: plain.edits, timeout=20)
        assert plain.current == "⌛ link expired — say connect fake to try again"


async def test_connect_an_mcp_server_by_its_url(rig: BotRig) -> None:
    async with rig.running():
        await rig.say(f"connect {MCP}")
        link = await rig.authorize_message("Tools")
        query = dict(parse_qsl(url_button(link).url.split("?", 1)[1]))
        assert query["client_id"] == "mcp-client"
        assert query["resource"] == MCP  # the path kept its case
        assert query["redirect_uri"] == rig.redirect_uri
        assert rig.broker is not None
        (pid,) = [p for p in rig.broker.discovered.ids()]
        assert pid == "mcp-example-com"
        registration = rig.credentials.registration(pid)
        assert registration is not None
        assert registration["redirect_uris"] == [rig.redirect_uri]


# --------------------------------------------------------------------- dialogue


def _state() -> d.ConversationState:
    return d.ConversationState(owners=frozenset({OWNER}))


def test_connect_words() -> None:
    assert d.parse_command("connect Dexcom DEVICE") == ("connect", ["dexcom", "device"])
    assert d.parse_command(f"/connect {MCP}") == ("connect", [MCP])
    _, effects = d.step(_state(), d.Message(OWNER, OWNER, 1, "connect dexcom device"))
    assert effects == [d.BeginConnect(OWNER, "dexcom", device=True)]
    _, effects = d.step(_state(), d.Message(OWNER, OWNER, 1, "connect dexcom"))
    assert effects == [d.BeginConnect(OWNER, "dexcom")]
    _, effects = d.step(_state(), d.Message(OWNER, OWNER, 1, f"connect {MCP} device"))
    assert effects == [d.BeginConnect(OWNER, MCP, device=True)]


def test_a_device_start_is_a_qr_code_then_the_watched_prompt() -> None:
    started = d.DeviceStarted(
        OWNER,
        "tv",
        "TV",
        "f1",
        "ABCD-EFGH",
        "https://tv.example.com/activate",
        "https://tv.example.com/activate?user_code=ABCD-EFGH",
        valid_seconds=900,
        qr=b"png",
    )
    _, effects = d.step(_state(), started)
    image, prompt = effects
    assert image == d.SendImage(
        OWNER, b"png", caption=texts.device_qr_caption("TV"), filename="qr.png"
    )
    assert isinstance(prompt, d.Send)
    assert "ABCD-EFGH" in prompt.text
    assert "valid for 15m" in prompt.text
    assert prompt.buttons == (
        d.UrlButton("Open the TV page", "https://tv.example.com/activate?user_code=ABCD-EFGH"),
    )
    assert prompt.watch == d.Watch("f1", "tv", "TV", "", device=True)
    assert "ABCD-EFGH" not in repr(started)
    no_qr = d.DeviceStarted(OWNER, "tv", "TV", "f1", "ABCD-EFGH", "https://tv.example.com/a")
    _, effects = d.step(_state(), no_qr)
    assert len(effects) == 1
    assert effects[0].buttons[0].url == "https://tv.example.com/a"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("device", "hint", "text"),
    [
        (False, False, "⌛ link expired — say connect tv to try again"),
        (True, False, "⌛ the code expired — say connect tv device to get a new one"),
        (
            False,
            True,
            "⌛ link expired — say connect tv to try again\nIf the browser could not come back"
            " here, say connect tv device: you enter a code instead, on any device",
        ),
    ],
)
def test_expiry_texts(device: bool, hint: bool, text: str) -> None:
    ended = d.FlowEnded(
        OWNER, 5, "f1", "tv", "TV", d.Outcome.TIMED_OUT, device=device, device_hint=hint
    )
    _, effects = d.step(_state(), ended)
    assert effects == [d.Edit(OWNER, 5, text)]
