"""BotRunner: carries out what the dialogue decides, and feeds the outcomes back.

The runner is the bot's only I/O driver. For every inbound it asks the pure dialogue
(bot/dialogue.py) what to do, then executes the effects in order: messages go out through
a :class:`~bot.transport.ChatTransport`; commands call the broker and the engine, and
their results come back as new inbounds.

The bot runs inside the daemon and never talks to it over the network. The daemon
exchanges a code as soon as its callback arrives; an authorize link is watched by one task
that sleeps on the engine's in-process wake-up until the flow has its outcome (stored,
failed, expired, cancelled) and reports it, which the dialogue turns into an edit of the
link message. Watched flows are noted in the resume file, so a restarted bot picks them
up again (and completes a code a restart left unexchanged: only the bot knows its state).

``connect <provider> device`` uses the device grant (RFC 8628): the owner gets a code and
a page to enter it on (with a QR code of the page), and the watcher polls the token
endpoint itself (Broker.complete_device) until the owner approved or refused or the code
expired; a restarted bot polls such a flow again. A link that expires without an answer
for a provider that has a device endpoint ends with the suggestion to use it.
``connect <url>`` discovers and registers the provider first (Broker.provider_for).

Integration commands (``glucose``, ...) come in as :class:`ChatCommandHandler` objects
(the composition root binds them, see integrations/); the runner lists them in the
dialogue's state and calls the right one for a :class:`~bot.dialogue.RunCommand`.

Nothing here lets an exception out of :meth:`BotRunner.handle` or the background loops:
errors are logged (type and code only, never message content or secrets) and, where the
owner is waiting for an answer, told to them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc

from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.engine import FlowEngine
from flowengine.errors import (
    BrokerError,
    CodeAlreadyUsedError,
    ConfigError,
    CredentialsMissingError,
    FlowExpiredError,
    FlowNotFound,
    InvalidTransition,
    NotConnectedError,
    UnknownProviderError,
)
from flowengine.models import Flow
from flowengine.states import PENDING_STATES, FlowState

from . import dialogue as d
from .resume import ResumeEntry, ResumeFile
from .transport import ChatTransport, TransportError

__all__ = ["ACTOR", "BotRunner", "ChatCommandHandler", "CommandReply"]

log = logging.getLogger("bot")

#: the ledger actor of everything the bot does
ACTOR = "bot"

_CANCELLABLE = (FlowState.INITIATED, FlowState.AWAITING_CODE, FlowState.AWAITING_DEVICE)
#: how a device authorization ended (Broker.complete_device) -> what the chat is told
_DEVICE_OUTCOMES = {
    "connected": d.Outcome.CONNECTED,
    "denied": d.Outcome.DENIED,
    "expired": d.Outcome.TIMED_OUT,
    "cancelled": d.Outcome.CANCELLED,
}
#: effects that are messages (their failure is not reported by another message)
_OUTPUT = (d.Send, d.Edit, d.SendImage, d.AnswerTap)


class CommandReply(Protocol):
    """What an integration command answers: a caption and, optionally, a PNG."""

    @property
    def text(self) -> str: ...

    @property
    def image(self) -> bytes | None: ...


class ChatCommandHandler(Protocol):
    """An integration's chat command, bound to its services (``integrations.BoundCommand``)."""

    @property
    def name(self) -> str: ...

    @property
    def aliases(self) -> tuple[str, ...]: ...

    @property
    def help(self) -> str: ...

    @property
    def usage(self) -> str: ...

    @property
    def failure(self) -> str: ...

    def parse(self, args: tuple[str, ...]) -> Hashable | None:
        """Pure: the words after the command -> a request, or None (answer ``usage``)."""
        ...

    async def __call__(self, request: Any) -> CommandReply:
        """Carry the request out; BrokerError subclasses for failures."""
        ...


@dataclass(frozen=True, slots=True)
class _Watched:
    flow_id: str
    provider: str
    name: str
    chat_id: int
    message_id: int | None
    state: str = field(repr=False)
    device: bool = False


def _qr_png(url: str) -> bytes | None:
    """A QR code of ``url`` as PNG bytes (None when it cannot be drawn)."""
    import io

    import segno

    try:
        out = io.BytesIO()
        segno.make(url, error="l").save(out, kind="png", scale=8, border=2)
    except (ValueError, segno.DataOverflowError):
        return None
    return out.getvalue()


class BotRunner:
    """The bot's state and I/O; Telethon (or a test) calls :meth:`handle`."""

    def __init__(
        self,
        transport: ChatTransport,
        *,
        broker: Broker,
        engine: FlowEngine,
        owners: frozenset[int] | set[int],
        redirect_uri: str,
        resume_path: Any,
        catalog: Catalog | None = None,
        credentials: CredentialStore | None = None,
        commands: Sequence[ChatCommandHandler] = (),
        tz: str = "UTC",
        notify_interval: float = 5.0,
        watch_grace: float = 15.0,
    ) -> None:
        """``watch_grace``: how long past a link's deadline (and a received code's exchange)
        the bot still waits for the outcome before it ends the flow itself."""
        self.transport = transport
        self.broker = broker
        self.engine = engine
        self.catalog = catalog or broker.catalog
        self.credentials = credentials or broker.credentials
        self.redirect_uri = redirect_uri
        self.resume_file = ResumeFile(resume_path)
        self.commands = {command.name: command for command in commands}
        self.notify_interval = notify_interval
        self.watch_grace = watch_grace
        specs = {
            c.name: d.CommandSpec(c.name, c.help, c.usage, c.failure, c.parse, c.aliases)
            for c in self.commands.values()
        }
        self.state = d.ConversationState(owners=frozenset(owners), tz=tz, commands=specs)
        self._tg: anyio.abc.TaskGroup | None = None
        self._watching: dict[str, _Watched] = {}
        self._early: list[tuple[Callable[..., Coroutine[Any, Any, Any]], tuple[Any, ...]]] = []

    def __repr__(self) -> str:
        return f"BotRunner(owners={len(self.state.owners)}, watching={len(self._watching)})"

    @property
    def watching(self) -> list[str]:
        """Flow ids whose authorize message is being watched right now."""
        return list(self._watching)

    # =============================================================== lifecycle

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Resume watched flows, deliver notifications every few seconds, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            early, self._early = self._early, []
            for fn, args in early:
                tg.start_soon(fn, *args)
            try:
                try:
                    await self.resume()
                except Exception:  # noqa: BLE001 - serve new requests even if resuming failed
                    log.exception("resuming watched flows failed")
                task_status.started()
                while True:
                    await self.deliver_notifications()
                    await anyio.sleep(self.notify_interval)
            finally:
                self._tg = None

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._tg is None:
            # an update handled before run() started: start it as soon as run() does
            self._early.append((fn, args))
            return
        self._tg.start_soon(fn, *args)

    # =================================================================== input

    async def handle(self, inbound: d.Inbound) -> None:
        """One inbound through the dialogue; its effects are carried out in order.

        When an outgoing message cannot be delivered, the rest of that reply is dropped
        (e.g. a notification is not marked delivered). Never raises.
        """
        try:
            self.state, effects = d.step(self.state, inbound)
        except Exception:  # noqa: BLE001 - a dialogue bug must not kill the bot
            log.exception("dialogue failed on %s", type(inbound).__name__)
            return
        for effect in effects:
            try:
                follow = await self._execute(effect)
            except TransportError as err:
                log.warning("%s not delivered: %s", type(effect).__name__, err.message)
                return
            except Exception:  # noqa: BLE001 - nothing may escape into the client loop
                log.exception("%s failed", type(effect).__name__)
                if isinstance(effect, _OUTPUT):
                    return  # telling the owner would go the same way
                chat_id = getattr(effect, "chat_id", None)
                if chat_id is None:
                    return
                follow = d.CommandFailed(chat_id, BrokerError("internal error"))
            if follow is not None:
                await self.handle(follow)

    # ================================================================= effects

    async def _execute(self, effect: d.Effect) -> d.Inbound | None:
        t = self.transport
        match effect:
            case d.Send():
                message_id = await self._send(effect)
                if effect.watch is not None:
                    self._start_watch(effect.watch, effect.chat_id, message_id)
                return None
            case d.Edit():
                try:
                    await t.edit_message(effect.chat_id, effect.message_id, effect.text)
                except TransportError as err:
                    if err.retry_after is not None:
                        raise
                    # the link message is gone (deleted, too old): say it in a new one
                    log.info("edit failed (%s); sending instead", err.message)
                    await t.send_message(effect.chat_id, effect.text)
                return None
            case d.SendImage():
                await t.send_image(
                    effect.chat_id, effect.data, caption=effect.caption, filename=effect.filename
                )
                return None
            case d.AnswerTap():
                await t.answer_tap(effect.query_id, effect.text)
                return None
            case d.LogRefusal():
                log.warning(
                    "refused a %s from Telegram user %s (chat %s): not an owner",
                    effect.kind,
                    effect.sender_id,
                    effect.chat_id,
                )
                return None
            case d.BeginConnect():
                return await self._begin(effect)
            case d.SaveCredentials():
                return await self._save_credentials(effect)
            case d.DeleteSecret():
                try:
                    ok = await t.delete_message(effect.chat_id, effect.message_id)
                except TransportError as err:
                    log.warning("could not delete the secret message: %s", err.message)
                    ok = False
                return d.SecretDeleted(effect.chat_id, ok)
            case d.ListConnections():
                return await self._guard(effect.chat_id, self._connections(effect))
            case d.Disconnect():
                return await self._guard(effect.chat_id, self._disconnect(effect))
            case d.ListFlows():
                return await self._guard(effect.chat_id, self._flows(effect))
            case d.CancelFlows():
                return await self._guard(effect.chat_id, self._cancel(effect))
            case d.ListAudit():
                return await self._guard(effect.chat_id, self._audit(effect))
            case d.RunCommand():
                return await self._run_command(effect)
            case d.MarkDelivered():
                await self.engine.mark_delivered(effect.notification_id)
                return None
        raise TypeError(f"not an effect: {type(effect).__name__}")  # pragma: no cover

    async def _send(self, effect: d.Send) -> int:
        try:
            return await self.transport.send_message(
                effect.chat_id, effect.text, buttons=effect.buttons
            )
        except TransportError:
            if effect.watch is not None:
                # nobody can see the link: do not leave the flow waiting for its TTL
                await self._cancel_quietly(effect.watch.flow_id)
            raise

    async def _guard(self, chat_id: int, work: Awaitable[d.Inbound]) -> d.Inbound:
        try:
            return await work
        except BrokerError as err:
            log.warning("command failed: %s", err.code)
            return d.CommandFailed(chat_id, err)

    # ------------------------------------------------------------- connecting

    def _name(self, provider: str) -> str:
        return self.catalog.get(provider).name if provider in self.catalog else provider

    def _unknown(self, chat_id: int, err: UnknownProviderError) -> d.ProviderUnknown:
        return d.ProviderUnknown(
            chat_id, err.provider, tuple(err.suggestions), tuple(self.catalog.ids())
        )

    async def _begin(self, effect: d.BeginConnect) -> d.Inbound:
        chat_id = effect.chat_id
        try:
            provider = await self.broker.provider_for(
                effect.provider, redirect_uri=self.redirect_uri, actor=ACTOR, device=effect.device
            )
            spec = self.catalog.get(provider)
            await self._supersede(chat_id, spec.id)
            if effect.device:
                return await self._begin_device(chat_id, spec.id)
            start = await self.broker.begin(
                spec.id, redirect_uri=self.redirect_uri, actor=ACTOR, chat_id=chat_id
            )
        except UnknownProviderError as err:
            return self._unknown(chat_id, err)
        except CredentialsMissingError as err:
            return d.CredentialsNeeded(
                chat_id, err.provider, self._name(err.provider), err.needs_secret
            )
        except BrokerError as err:
            log.warning("connect %s failed: %s", effect.provider, err.code)
            return d.CommandFailed(chat_id, err)
        deadline = start.flow.deadline
        valid = (deadline - self.engine.now_ms()) / 1000 if deadline is not None else None
        return d.ConnectStarted(
            chat_id,
            spec.id,
            spec.name,
            start.flow.id,
            start.authorize_url,
            start.state,
            valid_seconds=valid,
        )

    async def _begin_device(self, chat_id: int, provider: str) -> d.Inbound:
        start = await self.broker.begin_device(provider, actor=ACTOR, chat_id=chat_id)
        target = start.verification_uri_complete or start.verification_uri
        qr = await anyio.to_thread.run_sync(_qr_png, target)
        return d.DeviceStarted(
            chat_id,
            start.spec.id,
            start.spec.name,
            start.flow.id,
            start.user_code,
            start.verification_uri,
            start.verification_uri_complete,
            valid_seconds=(start.expires_at - self.engine.now_ms()) / 1000,
            qr=qr,
        )

    async def _supersede(self, chat_id: int, provider: str) -> None:
        """A new link for the same provider in the same chat cancels the older one."""
        for watched in list(self._watching.values()):
            if watched.chat_id == chat_id and watched.provider == provider:
                await self._cancel_quietly(watched.flow_id)

    async def _cancel_quietly(self, flow_id: str) -> bool:
        try:
            await self.engine.cancel(flow_id, actor=ACTOR)
        except (InvalidTransition, FlowNotFound):
            return False
        return True

    async def _save_credentials(self, effect: d.SaveCredentials) -> d.Inbound:
        try:
            creds = ClientCredentials(effect.client_id, effect.client_secret)
            await anyio.to_thread.run_sync(self.credentials.put, effect.provider, creds)
        except ValueError as err:
            return d.CommandFailed(effect.chat_id, ConfigError(str(err)))
        except BrokerError as err:
            return d.CommandFailed(effect.chat_id, err)
        log.info("client credentials for %s stored", effect.provider)
        return d.CredentialsSaved(effect.chat_id, effect.provider, effect.name)

    # ----------------------------------------------------------------- reading

    async def _connections(self, effect: d.ListConnections) -> d.Inbound:
        items = tuple(
            d.ConnectionView(
                provider=s.provider,
                name=s.name,
                state=s.state,
                expires=s.expires,
                last_refresh=s.last_refresh,
                scopes=tuple(s.scopes),
                reconnect_by=s.reconnect_by,
            )
            for s in await self.broker.status()
        )
        return d.ConnectionsListed(effect.chat_id, items, self.engine.now_ms())

    async def _disconnect(self, effect: d.Disconnect) -> d.Inbound:
        try:
            spec = self.catalog.get(effect.provider)
        except UnknownProviderError as err:
            return self._unknown(effect.chat_id, err)
        try:
            result = await self.broker.disconnect(spec.id, actor=ACTOR)
        except NotConnectedError:
            return d.NotConnected(effect.chat_id, spec.id, spec.name)
        return d.Disconnected(
            effect.chat_id,
            spec.id,
            spec.name,
            revoked_remotely=result.revoked_remotely,
            has_revocation_endpoint=result.has_revocation_endpoint,
        )

    async def _flows(self, effect: d.ListFlows) -> d.Inbound:
        flows = await self.engine.list_flows(provider=effect.provider, limit=10)
        if not flows and effect.provider and effect.provider not in self.catalog:
            try:
                self.catalog.get(effect.provider)
            except UnknownProviderError as err:
                return self._unknown(effect.chat_id, err)
        items = tuple(
            d.FlowView(f.id, f.provider, f.state.value, f.updated_at, f.error_code) for f in flows
        )
        return d.FlowsListed(effect.chat_id, effect.provider, items, self.engine.now_ms())

    async def _audit(self, effect: d.ListAudit) -> d.Inbound:
        if effect.provider is not None and effect.provider not in self.catalog:
            try:
                self.catalog.get(effect.provider)
            except UnknownProviderError as err:
                return self._unknown(effect.chat_id, err)
        rows = await self.broker.handouts(provider=effect.provider, who=effect.who, limit=10)
        items = tuple(
            d.HandOutView(
                r.at, r.who, r.node, r.address, r.provider, self._name(r.provider), r.token_sha
            )
            for r in rows
        )
        return d.AuditListed(
            effect.chat_id, effect.provider, effect.who, items, self.engine.now_ms()
        )

    async def _cancel(self, effect: d.CancelFlows) -> d.Inbound:
        names: list[str] = []
        for flow in await self.engine.list_flows(states=_CANCELLABLE, limit=1000):
            if flow.actor != ACTOR or flow.chat_id != effect.chat_id:
                continue
            if await self._cancel_quietly(flow.id):
                names.append(self._name(flow.provider))
        return d.FlowsCancelled(effect.chat_id, tuple(names))

    async def _run_command(self, effect: d.RunCommand) -> d.Inbound:
        command = self.commands[effect.command]
        try:
            reply = await command(effect.request)
        except BrokerError as err:
            if not isinstance(err, NotConnectedError):
                log.warning("%s failed: %s", command.name, err.code)
            provider = getattr(err, "provider", None)
            name = self._name(provider) if isinstance(provider, str) and provider else None
            return d.CommandUnavailable(effect.chat_id, command.name, err, name)
        return d.CommandAnswered(effect.chat_id, reply.text, reply.image)

    # ================================================================ watching

    def _start_watch(self, watch: d.Watch, chat_id: int, message_id: int | None) -> None:
        watched = _Watched(
            watch.flow_id,
            watch.provider,
            watch.name,
            chat_id,
            message_id,
            watch.state,
            device=watch.device,
        )
        try:
            self.resume_file.put(
                ResumeEntry(watch.flow_id, watch.provider, chat_id, message_id, watch.state)
            )
        except BrokerError as err:
            # still watched now; only a restart would lose it
            log.warning("resume file: %s", err.message)
        self._watching[watch.flow_id] = watched
        self._spawn(self._watch, watched)

    async def _watch(self, watched: _Watched) -> None:
        try:
            ended = await self._outcome(watched)
        except Exception:  # noqa: BLE001 - a watcher's bug must not kill the bot
            log.exception("watching flow %s failed", watched.flow_id)
            ended = self._ended(watched, d.Outcome.FAILED, detail="internal error")
        self._watching.pop(watched.flow_id, None)
        try:
            self.resume_file.drop(watched.flow_id)
        except BrokerError as err:
            log.warning("resume file: %s", err.message)
        await self.handle(ended)

    def _ended(self, w: _Watched, outcome: d.Outcome, **extra: Any) -> d.FlowEnded:
        extra.setdefault("device", w.device)
        return d.FlowEnded(
            w.chat_id,
            w.message_id,
            w.flow_id,
            w.provider,
            w.name,
            outcome,
            now_ms=self.engine.now_ms(),
            **extra,
        )

    async def _outcome(self, w: _Watched) -> d.FlowEnded:
        if w.device:
            return await self._device_outcome(w)
        try:
            flow = await self.engine.get_flow(w.flow_id)
        except FlowNotFound:
            return self._ended(w, d.Outcome.FAILED, detail="the flow is gone from the ledger")
        if flow.state is FlowState.CODE_RECEIVED:
            # a code nobody exchanged: the daemon restarted between the callback and its
            # exchange. The bot kept the state, so it can finish the job.
            await self._complete_stranded(w)
        while True:
            flow = await self.engine.get_flow(w.flow_id)
            if flow.state not in PENDING_STATES:
                return self._from_ledger(w, flow)
            deadline = flow.deadline
            remaining = (
                (deadline - self.engine.now_ms()) / 1000
                if deadline is not None
                else self.engine.awaiting_ttl
            )
            flow = await self.engine.wait_flow(
                w.flow_id,
                until=lambda f: f.state not in PENDING_STATES,
                timeout=max(remaining, 0.0) + self.watch_grace,
            )
            if flow.state not in PENDING_STATES:
                return self._from_ledger(w, flow)
            if flow.deadline is not None and flow.deadline > self.engine.now_ms():
                continue  # the deadline moved (e.g. the code arrived): wait for the new one
            # nobody ended it in time (the timer may not be running): end it here
            try:
                await self.engine.expire(w.flow_id, actor=ACTOR, reason="ttl")
            except InvalidTransition:
                continue
            return self._ended(w, d.Outcome.TIMED_OUT, device_hint=self._has_device(w.provider))

    def _has_device(self, provider: str) -> bool:
        """Could the owner connect ``provider`` with a code instead of a link?"""
        return provider in self.catalog and bool(
            self.catalog.get(provider).device_authorization_url
        )

    async def _device_outcome(self, w: _Watched) -> d.FlowEnded:
        """Poll the token endpoint until the device authorization ends (RFC 8628 §3.4)."""
        try:
            outcome = await self.broker.complete_device(w.flow_id, actor=ACTOR)
        except FlowNotFound:
            return self._ended(w, d.Outcome.FAILED, detail="the flow is gone from the ledger")
        except BrokerError as err:
            log.warning("device authorization %s failed: %s", w.flow_id, err.code)
            return self._ended(w, d.Outcome.FAILED, detail=err.message)
        kind = _DEVICE_OUTCOMES.get(outcome.status, d.Outcome.FAILED)
        if kind is d.Outcome.CONNECTED:
            flow = outcome.flow
            scopes = tuple(
                outcome.tokens.scope.split()
                if outcome.tokens is not None and outcome.tokens.scope
                else flow.scopes
            )
            return self._ended(w, kind, scopes=scopes, expires=flow.token_expires_at)
        detail = outcome.description or outcome.error if kind is d.Outcome.FAILED else None
        return self._ended(w, kind, detail=detail)

    async def _complete_stranded(self, w: _Watched) -> None:
        try:
            await self.broker.complete_state(w.state, actor=ACTOR)
        except (CodeAlreadyUsedError, FlowExpiredError, FlowNotFound):
            pass  # somebody else took it, or it ended: the ledger says how
        except BrokerError as err:
            log.warning("exchange for %s failed: %s", w.flow_id, err.code)

    def _gone(
        self, w: _Watched, reason: str | None, error: str | None, description: str | None
    ) -> d.FlowEnded:
        if reason == "expired":
            return self._ended(w, d.Outcome.TIMED_OUT)
        if reason == "cancelled":
            return self._ended(w, d.Outcome.CANCELLED)
        if reason == "failed" and error == "access_denied":
            return self._ended(w, d.Outcome.DENIED)
        return self._ended(w, d.Outcome.FAILED, detail=description or error or reason)

    def _from_ledger(self, w: _Watched, flow: Flow) -> d.FlowEnded:
        """How a flow that already ended (e.g. while the bot was down) is reported."""
        state = flow.state
        if state in (FlowState.STORED, FlowState.REFRESHING):
            return self._ended(
                w, d.Outcome.CONNECTED, scopes=flow.scopes, expires=flow.token_expires_at
            )
        if state is FlowState.EXPIRED:
            hint = not w.device and self._has_device(w.provider)
            return self._ended(w, d.Outcome.TIMED_OUT, device_hint=hint)
        if state is FlowState.CANCELLED:
            return self._ended(w, d.Outcome.CANCELLED)
        return self._gone(
            w,
            "failed" if state is FlowState.FAILED else state.value,
            flow.error_code,
            flow.error_description,
        )

    async def resume(self) -> list[str]:
        """Watch again every flow the resume file still lists; report those that ended.

        Flows the bot started in a chat that are still waiting but missing from the file
        (a crash between starting and noting them) cannot be polled: they are cancelled
        and the chat is told. Returns the flow ids being watched again.
        """
        entries = self.resume_file.load()
        resumed: list[str] = []
        for entry in entries.values():
            try:
                flow = await self.engine.get_flow(entry.flow_id)
            except FlowNotFound:
                self.resume_file.drop(entry.flow_id)
                continue
            watched = _Watched(
                entry.flow_id,
                entry.provider,
                self._name(entry.provider),
                entry.chat_id,
                entry.message_id,
                entry.state,
                device=flow.grant == "device",
            )
            if entry.flow_id in self._watching:
                continue  # started before run() (see _spawn)
            if flow.state in PENDING_STATES:
                self._watching[entry.flow_id] = watched
                self._spawn(self._watch, watched)
                resumed.append(entry.flow_id)
                log.info("resumed watching flow %s", entry.flow_id)
            else:
                self.resume_file.drop(entry.flow_id)
                await self.handle(self._from_ledger(watched, flow))
        for flow in await self.engine.list_flows(states=_CANCELLABLE, limit=1000):
            if flow.actor == ACTOR and flow.chat_id is not None and flow.id not in entries:
                if await self._cancel_quietly(flow.id):
                    log.warning("flow %s cannot be resumed (no state noted); cancelled", flow.id)
                    lost = _Watched(
                        flow.id, flow.provider, self._name(flow.provider), flow.chat_id, None, ""
                    )
                    await self.handle(self._ended(lost, d.Outcome.CANCELLED))
        return resumed

    # =========================================================== notifications

    async def deliver_notifications(self) -> int:
        """Send every undelivered ledger notification; returns how many were handled."""
        try:
            pending = await self.engine.notifications()
        except BrokerError as err:
            log.warning("reading notifications failed: %s", err.code)
            return 0
        except Exception:  # noqa: BLE001 - e.g. the ledger went away for a moment
            log.exception("reading notifications failed")
            return 0
        for note in pending:
            await self.handle(
                d.NotificationDue(
                    id=note.id,
                    kind=note.kind,
                    provider=note.provider,
                    name=self._name(note.provider),
                    chat_id=note.chat_id,
                    reason=note.reason,
                    data=note.data,
                    message=note.message,
                )
            )
        return len(pending)
