"""Integrations: what the agent does with a connection, one package per integration.

An integration (``integrations/<name>/``) is an :class:`Integration` object that names the
provider ids it serves, adds its ``agentd <name> …`` subcommands, offers chat commands to
the bot, and can stand up a simulated API for the demo and the tests. The CLI, the bot and
the demo find integrations through :func:`discover` and never name one; the OAuth engine
(flowengine) knows none of them. An integration uses the engine through its public surface
only (``from flowengine import Broker, …``), never api/, bot/ or agentd/.

Writing one::

    # integrations/thermo/__init__.py  (or anywhere, then ``register(INTEGRATION)``)
    class Thermo(Integration):
        name = "thermo"
        title = "Thermo"
        providers = ("thermo",)

        def configure_cli(self, parser): ...
        async def run_cli(self, args, services): ...
        def chat_commands(self): return (ChatCommand(...),)

    (or ``cli = ".cli:run"`` instead of ``run_cli``: see :attr:`Integration.cli`)

    INTEGRATION = Thermo()

Built-in integrations are the subpackages of this package that define ``INTEGRATION``;
:func:`register` adds more at run time (a test module, a private plug-in). Importing an
integration package must stay cheap: API clients, charts (matplotlib) and simulators load
inside the methods that use them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    import httpx
    from quart import Quart

    from flowengine import Broker, Clock

__all__ = [
    "BearerCheck",
    "BoundCommand",
    "ChatCommand",
    "Integration",
    "Reply",
    "Services",
    "SimDialect",
    "Simulator",
    "bind_commands",
    "discover",
    "register",
    "unregister",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


# ----------------------------------------------------------------------- services


@dataclass(frozen=True, slots=True)
class Services:
    """What an integration may use: the broker for tokens, an HTTP client, time, output.

    ``actor`` is the ledger actor of token refreshes the integration causes (``cli``,
    ``bot``, ``demo``); ``tz`` is the owner's time zone (IANA name) for charts and tables.
    """

    broker: Broker
    http: httpx.AsyncClient
    clock: Clock
    actor: str = "cli"
    tz: str = "UTC"
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def zone(self) -> ZoneInfo:
        """:attr:`tz` as a time zone; UTC when it names none."""
        try:
            return ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo("UTC")


@dataclass(frozen=True, slots=True)
class Reply:
    """A chat command's answer: a caption and, optionally, a PNG."""

    text: str
    image: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ChatCommand:
    """A command the bot offers on behalf of an integration.

    ``parse`` must be pure: it gets the (lower-cased) words after the command and returns
    a hashable request, or None when they do not fit (the bot then answers ``usage``).
    ``run`` does the work. ``failure`` starts the line shown when it fails ("No glucose
    reading" -> "⚠️ No glucose reading: <why>").
    """

    name: str
    help: str
    usage: str
    failure: str
    parse: Callable[[tuple[str, ...]], Hashable | None]
    run: Callable[[Any, Services], Awaitable[Reply]]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BoundCommand:
    """A :class:`ChatCommand` with its services bound: what the bot is handed."""

    command: ChatCommand
    services: Services = field(repr=False)

    @property
    def name(self) -> str:
        return self.command.name

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.command.aliases

    @property
    def help(self) -> str:
        return self.command.help

    @property
    def usage(self) -> str:
        return self.command.usage

    @property
    def failure(self) -> str:
        return self.command.failure

    def parse(self, args: tuple[str, ...]) -> Hashable | None:
        return self.command.parse(args)

    async def __call__(self, request: Any) -> Reply:
        return await self.command.run(request, self.services)


# --------------------------------------------------------------------- simulators


class BearerCheck(Protocol):
    """The simulated authorization server, as a simulated API sees it."""

    def access_token_valid(self, token: str) -> bool:
        """True while ``token`` is an unexpired, unrevoked access token it issued."""
        ...


@dataclass(frozen=True, slots=True)
class SimDialect:
    """How a provider's OAuth endpoints look on the wire, for the simulated server.

    Paths are those of the real provider. ``token_params`` must be sent with every token
    request (Withings ``action=requesttoken``). With ``envelope`` every token answer is
    HTTP 200 ``{"status": <int>, "body": {...}}`` and an error is a non-zero status taken
    from ``envelope_errors`` (OAuth error code -> status) plus an ``error`` text.
    ``scope_separator`` splits the requested scope; ``scopes`` lists the scopes a client
    may ask for (empty: anything), ``required_scope`` one it must ask for. ``response_extra``
    adds fields to every token body (Withings ``userid``); ``token_scope`` adds the granted
    ``scope``. ``old_refresh_grace``: seconds a
    rotated refresh token keeps working (None: it dies at once); with
    ``old_refresh_dies_on_use`` it dies as soon as the new access token is used.
    """

    authorize_path: str = "/oauth/authorize"
    token_path: str = "/oauth/token"
    revoke_path: str | None = "/oauth/revoke"
    token_params: Mapping[str, str] = field(default_factory=dict)
    envelope: bool = False
    envelope_errors: Mapping[str, int] = field(default_factory=dict)
    scope_separator: str = " "
    scopes: tuple[str, ...] = ()
    required_scope: str | None = None
    response_extra: Mapping[str, Any] = field(default_factory=dict)
    token_scope: bool = False
    code_ttl: int = 60
    access_ttl: int = 3600
    old_refresh_grace: float | None = None
    old_refresh_dies_on_use: bool = False
    name: str = "Provider"


class Simulator(Protocol):
    """A simulated data API that runs beside the simulated authorization server."""

    #: the catalog id the simulation stands in for
    provider: str
    #: the provider's OAuth wire format
    dialect: SimDialect
    #: where its data API lives (failure injection applies under it by default)
    path_prefix: str

    def mount(self, app: Quart, bearer: BearerCheck) -> None:
        """Add the data API's routes to ``app``; tokens are checked with ``bearer``."""
        ...


# -------------------------------------------------------------------- integration


class Integration:
    """Base class of an integration. Subclasses set the class attributes and override
    the methods they need; the defaults offer nothing."""

    #: the CLI subcommand (``agentd <name> …``); lowercase letters, digits, '-'
    name: str = ""
    #: human name ("Dexcom CGM")
    title: str = ""
    #: one line for ``agentd --help``
    summary: str = ""
    #: catalog provider ids it can use, the default first
    providers: tuple[str, ...] = ()
    #: CLI argument lists the demo runs after connecting (``agentd <name> <args…>``)
    demo_commands: tuple[tuple[str, ...], ...] = ()
    #: what carries out ``agentd <name> …`` for the default :meth:`run_cli`: a coroutine
    #: function ``run(args, services, provider) -> exit code`` named ``"module:function"``,
    #: the module relative to the integration's package (``".cli:run"``), loaded when used
    cli: str = ""
    #: the simulated API class for the default :meth:`simulator` (``".sim:ThermoSim"``),
    #: loaded when used and called with ``clock=``
    sim: str = ""

    def configure_cli(self, parser: argparse.ArgumentParser) -> None:
        """Add arguments and subcommands to ``agentd <name>``."""

    async def run_cli(self, args: argparse.Namespace, services: Services) -> int:
        """Carry out ``agentd <name> …``; 0 on success. Raise BrokerError subclasses for
        failures (the CLI maps them to its exit codes and prints one line).

        The default picks the provider (``--provider`` or the connected one) and hands
        over to :attr:`cli`."""
        if not self.cli:
            raise NotImplementedError(f"{self.name} has no CLI")
        provider = await self.pick_provider(services, getattr(args, "provider", None))
        return int(await self.load(self.cli)(args, services, provider))

    def chat_commands(self) -> tuple[ChatCommand, ...]:
        """The bot commands this integration offers."""
        return ()

    def simulator(self, *, clock: Clock) -> Simulator | None:
        """A simulated API (for the demo and the tests), or None."""
        if not self.sim:
            return None
        simulated: Simulator = self.load(self.sim)(clock=clock)
        return simulated

    def with_provider(self, ref: str) -> Callable[[Any, Services], Awaitable[Reply]]:
        """A :attr:`ChatCommand.run` that picks the provider (the connected one) and calls
        ``function(services, provider, request)``, named ``"module:function"`` as
        :attr:`cli` is and loaded when first used."""

        async def run(request: Any, services: Services) -> Reply:
            provider = await self.pick_provider(services)
            reply: Reply = await self.load(ref)(services, provider, request)
            return reply

        return run

    def load(self, ref: str) -> Any:
        """What ``"module:name"`` names, the module relative to the integration's package."""
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module, type(self).__module__), attr)

    async def pick_provider(self, services: Services, explicit: str | None = None) -> str:
        """The provider to use: ``explicit`` if given (it must be one of ours), else the
        first of :attr:`providers` with a connection, else the default."""
        from flowengine import ConfigError

        if explicit:
            spec = services.broker.catalog.get(explicit)  # UnknownProviderError if unknown
            if spec.id not in self.providers:
                raise ConfigError(
                    f"{spec.id} is not a {self.title} provider (use {', '.join(self.providers)})",
                    key="--provider",
                )
            return spec.id
        known = {status.provider for status in await services.broker.status()}
        return next((p for p in self.providers if p in known), self.providers[0])

    def __repr__(self) -> str:
        return f"<integration {self.name}: {', '.join(self.providers)}>"


# ----------------------------------------------------------------------- registry

_registered: dict[str, Integration] = {}


def _check(integration: Integration) -> None:
    if not _NAME_RE.match(integration.name or ""):
        raise ValueError(f"integration name {integration.name!r} is not a lowercase word")
    if not integration.providers:
        raise ValueError(f"integration {integration.name!r} serves no provider")
    if not integration.title:
        raise ValueError(f"integration {integration.name!r} has no title")


def register(integration: Integration) -> Integration:
    """Add an integration found outside this package; returns it (usable as a decorator
    on an instance). A built-in of the same name is replaced."""
    _check(integration)
    _registered[integration.name] = integration
    return integration


def unregister(name: str) -> None:
    """Forget an integration added with :func:`register` (tests)."""
    _registered.pop(name, None)


def _builtins() -> list[Integration]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        integration = getattr(module, "INTEGRATION", None)
        if isinstance(integration, Integration):
            _check(integration)
            found.append(integration)
    return found


def discover() -> list[Integration]:
    """Every integration: the built-in packages, then the registered ones, by name."""
    merged = {i.name: i for i in _builtins()}
    merged.update(_registered)
    return [merged[name] for name in sorted(merged)]


def bind_commands(integrations: Iterable[Integration], services: Services) -> list[BoundCommand]:
    """Every chat command of ``integrations``, bound to ``services`` (for the bot).

    A name or alias offered twice is an error (the bot could not tell them apart).
    """
    bound: list[BoundCommand] = []
    seen: dict[str, str] = {}
    for integration in integrations:
        for command in integration.chat_commands():
            for word in (command.name, *command.aliases):
                if word in seen:
                    raise ValueError(
                        f"chat command {word!r} of {integration.name} is taken by {seen[word]}"
                    )
                seen[word] = integration.name
            bound.append(BoundCommand(command, services))
    return bound
