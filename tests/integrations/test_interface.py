"""The integration interface: an integration written right here, in this test module, plugs
into the CLI and the bot through ``integrations.register`` with no edit anywhere else."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import integrations
from agentd.cli import main
from bot.runner import ChatCommandHandler
from flowengine.broker import Broker
from flowengine.catalog import Catalog, ProviderSpec
from flowengine.engine import FlowEngine
from flowengine.errors import ConfigError
from flowengine.tokens import TokenSet, TokenStore
from integrations import ChatCommand, Integration, Reply, Services, bind_commands, discover
from tests.bot.conftest import OWNER, BotRig

THERMO = ProviderSpec(
    id="thermo",
    name="Thermo",
    authorize_url="https://thermo.example/authorize",
    token_url="https://thermo.example/token",
)


def _days(args: tuple[str, ...]) -> int | None:
    if not args:
        return 1
    if len(args) == 1 and args[0].endswith("d") and args[0][:-1].isdigit():
        return int(args[0][:-1])
    return None


class Thermo(Integration):
    """A thermometer: reads the token through the broker and says what it would fetch."""

    name = "thermo"
    title = "Thermo"
    summary = "body temperature from a connected thermometer"
    providers = ("thermo", "thermo-eu")

    def configure_cli(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="thermo_command", required=True)
        sub.add_parser("now", help="the latest temperature")

    async def run_cli(self, args: argparse.Namespace, services: Services) -> int:
        token = await services.broker.get_token("thermo", actor=services.actor)
        digest = hashlib.sha256(token.encode()).hexdigest()[:8]
        services.out.write(f"36.8 °C (read as {services.actor} with token {digest})\n")
        return 0

    def chat_commands(self) -> tuple[ChatCommand, ...]:
        return (
            ChatCommand(
                name="temp",
                help="temp [Nd] — body temperature",
                usage="Say temp or temp 3d.",
                failure="No temperature",
                parse=_days,
                run=self._temp,
                aliases=("temperature",),
            ),
        )

    async def _temp(self, days: object, services: Services) -> Reply:
        await services.broker.get_token("thermo", actor=services.actor)
        return Reply(f"🌡️ 36.8 °C, the last {days} d")


@pytest.fixture(name="thermo")
def _thermo() -> Iterator[Thermo]:
    thermo = integrations.register(Thermo())
    assert isinstance(thermo, Thermo)
    try:
        yield thermo
    finally:
        integrations.unregister("thermo")


def test_discovery_finds_the_packages_and_the_registered_one(thermo: Thermo) -> None:
    names = [i.name for i in discover()]
    assert names == sorted(names)
    assert {"dexcom", "withings", "thermo"} <= set(names)
    integrations.unregister("thermo")
    assert "thermo" not in [i.name for i in discover()]


def test_the_cli_runs_it(
    thermo: Thermo, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = isolated_env / "config" / "agent" / "providers.toml"
    catalog.parent.mkdir(parents=True)
    catalog.write_text(
        '[providers.thermo]\nauthorize_url = "https://thermo.example/authorize"\n'
        'token_url = "https://thermo.example/token"\n',
        encoding="utf-8",
    )
    assert main(["thermo", "now"]) == 3  # not connected: the documented exit code
    assert "not connected" in capsys.readouterr().err
    auth = isolated_env / "data" / "agent" / "auth.json"
    TokenStore(auth).write("thermo", TokenSet(access="t-123", expires=None))
    assert main(["thermo", "now"]) == 0
    out = capsys.readouterr().out
    assert out == f"36.8 °C (read as cli with token {hashlib.sha256(b't-123').hexdigest()[:8]})\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "thermo" in capsys.readouterr().out


@pytest.mark.anyio
async def test_the_bot_offers_its_command(thermo: Thermo, rig: BotRig) -> None:
    rig.catalog.register(THERMO)
    rig.tokens.write("thermo", TokenSet(access="t-123", expires=None))

    def make(broker: Broker, engine: FlowEngine) -> Sequence[ChatCommandHandler]:
        services = Services(broker=broker, http=rig.http, clock=engine.clock, actor="bot")
        return bind_commands(discover(), services)

    rig.commands = make
    async with rig.running():
        await rig.say("temperature 3d")
        await rig.say("temp soon")
        await rig.say("help")
    answer, usage, help_text = rig.chat.texts(OWNER)
    assert answer == "🌡️ 36.8 °C, the last 3 d"
    assert usage == "Say temp or temp 3d."
    assert "temp [Nd] — body temperature\n" in help_text
    assert "glucose [6h|24h|7d]" in help_text  # the built-in integrations are there too


def test_bad_integrations_are_refused() -> None:
    class Nameless(Integration):
        title = "x"
        providers = ("x",)

    class Orphan(Integration):
        name = "orphan"
        title = "Orphan"

    with pytest.raises(ValueError, match="lowercase word"):
        integrations.register(Nameless())
    with pytest.raises(ValueError, match="serves no provider"):
        integrations.register(Orphan())


def test_two_commands_of_the_same_name_are_refused(thermo: Thermo) -> None:
    class Copycat(Thermo):
        name = "copycat"

    services = Services(broker=None, http=None, clock=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'temp' of copycat is taken by thermo"):
        bind_commands([thermo, Copycat()], services)


@pytest.mark.anyio
async def test_pick_provider(thermo: Thermo, rig: BotRig) -> None:
    async with rig.running():
        assert rig.broker is not None
        catalog: Catalog = rig.broker.catalog
        catalog.register(THERMO)
        services = Services(broker=rig.broker, http=rig.http, clock=rig.broker.engine.clock)
        assert await thermo.pick_provider(services) == "thermo"
        assert await thermo.pick_provider(services, "thermo") == "thermo"
        with pytest.raises(ConfigError, match="not a Thermo provider"):
            await thermo.pick_provider(services, "fake")
        # with only the second provider connected, that one is picked
        catalog.register(dataclasses.replace(THERMO, id="thermo-eu", name="Thermo EU"))
        rig.tokens.write("thermo-eu", TokenSet(access="t-eu", expires=None))
        assert await thermo.pick_provider(services) == "thermo-eu"


@pytest.mark.anyio
async def test_the_defaults_offer_nothing_and_load_names_lazily() -> None:
    from flowengine.clock import ManualClock

    bare = Integration()
    assert bare.simulator(clock=ManualClock(0.0)) is None
    with pytest.raises(NotImplementedError):  # before it needs any service
        await bare.run_cli(argparse.Namespace(), None)  # type: ignore[arg-type]
    dexcom = next(i for i in discover() if i.name == "dexcom")
    from integrations.dexcom.cli import run

    assert dexcom.load(dexcom.cli) is run


def test_the_demo_skips_a_simulated_provider_it_cannot_find(thermo: Thermo) -> None:
    """A plug-in whose provider is not in the built-in catalog does not break the demo."""
    import io

    from agentd.demo_run import run_demo
    from integrations.dexcom.sim import DexcomSim

    class Elsewhere(DexcomSim):
        provider = "thermo"

    thermo.simulator = lambda *, clock: Elsewhere(clock=clock)  # type: ignore[method-assign]
    out = io.StringIO()
    assert run_demo(out=out) == 0
    assert "Thermo: skipped, 'thermo' is not in the built-in catalog" in out.getvalue()


def test_services_zone_falls_back_to_utc() -> None:
    def services(tz: str) -> Services:
        return Services(broker=None, http=None, clock=None, tz=tz)  # type: ignore[arg-type]

    assert services("Europe/Berlin").zone.key == "Europe/Berlin"
    assert services("Not/A_Zone").zone.key == "UTC"
    assert services("../etc").zone.key == "UTC"
