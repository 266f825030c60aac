"""FlowEngine: the flow ledger with its state machine, used by the Broker and the API.

It owns the ledger and the clock, decides deadlines, turns callbacks into transitions
and tells pollers when a code arrives. It does no HTTP to providers itself (see
oauth_http / broker); it records what they did. The timer does not use it directly: it
asks the Broker, which schedules connections through ``due_checks``/``set_next_check``.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

import anyio

from .clock import Clock, SystemClock, to_ms
from .errors import (
    CodeAlreadyUsedError,
    ConcurrentUpdateError,
    FlowExpiredError,
    FlowNotFound,
    InvalidTransition,
    StateMismatchError,
)
from .ledger import Ledger, NoteFields, Notification
from .models import Flow, FlowRecord, PendingCode, PendingStatus, StartedFlow
from .protocol import CallbackParams, hash_state, new_code_verifier, new_state
from .states import (
    PENDING_STATES,
    Condition,
    ErrorEffect,
    FlowState,
    FlowTrigger,
    Secrets,
    Value,
    effects_of,
)

__all__ = ["ACTORS", "FlowEngine", "RecoveryReport"]

log = logging.getLogger("flowengine")

#: who may move a flow
ACTORS = frozenset({"api", "bot", "timer", "cli", "demo", "test"})
#: when a transient refresh failure names no time, the connection is looked at again after
RETRY_CHECK_MS = 60_000

_GONE_REASONS = {
    FlowState.EXPIRED: "expired",
    FlowState.FAILED: "failed",
    FlowState.CANCELLED: "cancelled",
    FlowState.REVOKED: "revoked",
    FlowState.SUPERSEDED: "superseded",
}


@dataclass(slots=True)
class RecoveryReport:
    """What ``FlowEngine.recover`` found at start-up."""

    expired: list[Flow] = field(default_factory=list)
    refreshing: list[Flow] = field(default_factory=list)
    exchanged: list[Flow] = field(default_factory=list)
    waiting: list[Flow] = field(default_factory=list)


class _Waiters:
    """Tasks waiting for one flow to move: one event, the version they saw, how many."""

    __slots__ = ("count", "event", "version")

    def __init__(self, version: int) -> None:
        self.event = anyio.Event()
        self.version = version
        self.count = 0


def _check_actor(actor: str) -> str:
    if actor not in ACTORS:
        raise ValueError(f"unknown actor {actor!r}; one of {sorted(ACTORS)}")
    return actor


class FlowEngine:
    """Start, advance, inspect and recover authorization flows."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        clock: Clock | None = None,
        awaiting_ttl: float = 600.0,
        code_ttl: float = 300.0,
        poll_interval: float = 0.25,
    ) -> None:
        self.ledger = ledger
        self.clock: Clock = clock or SystemClock()
        self.awaiting_ttl = awaiting_ttl
        self.code_ttl = code_ttl
        #: how often :meth:`watch_external` looks for commits of other processes
        self.poll_interval = poll_interval
        #: flow id -> its waiters: an event set on the flow's next transition
        self._changes: dict[str, _Waiters] = {}

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, clock: Clock | None = None, **options: Any
    ) -> FlowEngine:
        return cls(await Ledger.open(path), clock=clock, **options)

    async def close(self) -> None:
        await self.ledger.close()

    async def __aenter__(self) -> FlowEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now_ms(self) -> int:
        return to_ms(self.clock.now())

    # ------------------------------------------------------------------ starting

    async def start(
        self,
        provider: str,
        *,
        redirect_uri: str,
        scopes: Sequence[str] = (),
        use_pkce: bool = True,
        actor: str,
        chat_id: int | None = None,
        exchange: str = "daemon",
        grant: str = "code",
    ) -> StartedFlow:
        """Create a flow in ``initiated`` with a fresh state (and PKCE verifier).

        ``exchange``: "daemon" (the daemon that receives the callback exchanges the code
        at once) or "client" (the code waits in ``oauth_pending`` for the caller, who
        exchanges it itself: ``take_code`` then ``Broker.complete``).
        ``grant="device"``: a device authorization grant (RFC 8628): no redirect URI, no
        PKCE, no callback; :meth:`issue_device_code` moves it on and its starter polls.
        """
        _check_actor(actor)
        if exchange not in ("daemon", "client"):
            raise ValueError(f"exchange must be 'daemon' or 'client', not {exchange!r}")
        state = new_state()
        if grant == "device":
            redirect_uri, use_pkce = "", False
        verifier = new_code_verifier() if use_pkce else None
        now = self.now_ms()
        flow = await self.ledger.create(
            flow_id=secrets.token_hex(8),
            provider=provider,
            at=now,
            redirect_uri=redirect_uri,
            scopes=list(scopes),
            actor=actor,
            chat_id=chat_id,
            state_hash=hash_state(state),
            code_verifier=verifier,
            deadline=now + to_ms(self.awaiting_ttl),
            detail={
                "pkce": use_pkce,
                "scopes": list(scopes),
                **({"exchange": "client"} if exchange == "client" else {}),
                **({"grant": grant} if grant != "code" else {}),
            },
            grant=grant,
        )
        log.info("flow %s started for %s by %s", flow.id, provider, actor)
        return StartedFlow(flow=flow, state=state, code_verifier=verifier)

    async def issue_url(self, flow_id: str, *, actor: str) -> Flow:
        """The authorize link went out: ``initiated`` -> ``awaiting_code`` (TTL restarts)."""
        return await self.move(flow_id, FlowTrigger.ISSUE_URL, actor=actor)

    # ------------------------------------------------------------------- device

    async def issue_device_code(
        self,
        flow_id: str,
        *,
        actor: str,
        device_code: str,
        user_code: str,
        verification_uri: str,
        interval: int,
        expires_in: int,
    ) -> Flow:
        """The device endpoint answered (RFC 8628 §3.2): ``initiated`` -> ``awaiting_device``.

        The device code and user code go to ``flow_secrets`` in the same transaction; the
        flow's deadline becomes the device code's expiry; the event notes the interval.
        """
        return await self.move(
            flow_id,
            FlowTrigger.ISSUE_DEVICE_CODE,
            actor=actor,
            valid_for=int(expires_in) * 1000,
            detail={
                "interval": int(interval),
                "expires_in": int(expires_in),
                "verification_uri": verification_uri,
            },
            device_secrets=(device_code, user_code),
        )

    async def record_slow_down(self, flow_id: str, *, actor: str, interval: int) -> Flow:
        """The token endpoint said ``slow_down`` (§3.5): poll every ``interval`` s from now."""
        return await self.move(
            flow_id, FlowTrigger.SLOW_DOWN, actor=actor, detail={"interval": int(interval)}
        )

    async def device_secrets(self, flow_id: str) -> tuple[str, str] | None:
        """(device code, user code) of a device flow that still polls."""
        return await self.ledger.device_secrets(flow_id)

    async def device_interval(self, flow_id: str, *, default: int = 5) -> int:
        """The poll interval in seconds: the latest one the ledger recorded for the flow."""
        for event in reversed(await self.ledger.events(flow_id)):
            interval = event.detail.get("interval")
            if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
                return interval
        return default

    async def record_denied(
        self, flow_id: str, *, actor: str, error: str, description: str | None = None
    ) -> Flow:
        """The owner refused (``access_denied`` while polling): -> failed; secrets wiped."""
        return await self.move(
            flow_id, FlowTrigger.DENY, actor=actor, error=error, description=description
        )

    # ------------------------------------------------------------------ callback

    async def record_callback(self, params: CallbackParams, *, actor: str = "api") -> Flow:
        """Record the provider's redirect: a code (-> code_received) or an error (-> failed).

        Raises StateMismatchError for an unknown state, FlowExpiredError when the flow is
        past its TTL or already ended, CodeAlreadyUsedError when a code was recorded
        before. In every error case nothing is stored.
        """
        _check_actor(actor)
        flow = await self.ledger.by_state_hash(hash_state(params.state))
        if flow is None:
            raise StateMismatchError("this link does not belong to any authorization")
        now = self.now_ms()
        flow = await self._expire_if_overdue(flow, now, actor=actor)
        if flow.state is FlowState.INITIATED:
            # the link was opened before issue_url was recorded: keep the ledger in order
            try:
                flow = await self.move(
                    flow.id, FlowTrigger.ISSUE_URL, actor=actor, at=now, deadline=flow.deadline
                )
            except InvalidTransition:
                flow = await self.get_flow(flow.id)
        self._raise_unless_waiting(flow)
        try:
            if params.error is not None:
                flow = await self.move(
                    flow.id,
                    FlowTrigger.DENY,
                    actor=actor,
                    at=now,
                    expected_version=flow.version,
                    error=params.error,
                    description=params.error_description,
                )
            else:
                assert params.code is not None
                flow = await self.move(
                    flow.id,
                    FlowTrigger.RECEIVE_CODE,
                    actor=actor,
                    at=now,
                    expected_version=flow.version,
                    pending_code=(params.state, params.code),
                )
        except (InvalidTransition, ConcurrentUpdateError) as err:
            # somebody else recorded a callback for this flow a moment ago
            self._raise_unless_waiting(await self.get_flow(flow.id))
            raise CodeAlreadyUsedError(
                "this authorization was already completed", flow_id=flow.id
            ) from err
        return flow

    def _raise_unless_waiting(self, flow: Flow) -> None:
        if flow.state is FlowState.AWAITING_CODE:
            return
        if flow.state in _GONE_REASONS:
            raise FlowExpiredError(
                f"this authorization has {_GONE_REASONS[flow.state]}",
                flow_id=flow.id,
                state=flow.state.value,
            )
        raise CodeAlreadyUsedError("this authorization was already completed", flow_id=flow.id)

    async def exchanged_by_client(self, flow_id: str) -> bool:
        """Whether the flow's starter exchanges the code itself (``start(exchange=...)``)."""
        events = await self.ledger.events(flow_id)
        return bool(events) and events[0].detail.get("exchange") == "client"

    # ----------------------------------------------------------------- waiting

    def _changed(self, flow_id: str) -> None:
        """A transition of ``flow_id`` was committed: wake its waiters."""
        waiters = self._changes.pop(flow_id, None)
        if waiters is not None:
            waiters.event.set()

    def wake_all(self) -> None:
        """Wake every waiter (they look at their flow again), e.g. when the daemon stops."""
        for flow_id in list(self._changes):
            self._changed(flow_id)

    async def wait_flow(
        self, flow_id: str, *, until: Callable[[Flow], bool], timeout: float
    ) -> Flow:
        """The flow once ``until(flow)`` holds, or as it stands after ``timeout`` seconds.

        Waiters sleep on an event set by this engine's own transitions; commits of other
        processes wake them through :meth:`watch_external`. No waiter polls the ledger.
        """
        flow = await self.get_flow(flow_id)
        if until(flow) or timeout <= 0:
            return flow
        with anyio.move_on_after(timeout):
            while not until(flow):
                waiters = self._changes.get(flow_id)
                if waiters is None:
                    waiters = self._changes[flow_id] = _Waiters(flow.version)
                waiters.count += 1
                try:
                    await waiters.event.wait()
                finally:
                    waiters.count -= 1
                    # the last waiter that gives up leaves nothing behind
                    if waiters.count == 0 and self._changes.get(flow_id) is waiters:
                        del self._changes[flow_id]
                flow = await self.get_flow(flow_id)
        return flow

    async def watch_external(self) -> None:
        """Wake waiters of flows another process moved; runs until cancelled.

        One cheap ``PRAGMA data_version`` every ``poll_interval`` seconds; when another
        connection committed, one query reads the versions of the flows being waited on.
        """
        seen = await self.ledger.data_version()
        while True:
            await anyio.sleep(self.poll_interval)
            now = await self.ledger.data_version()
            if now == seen or not self._changes:
                seen = now
                continue
            seen = now
            waited = {flow_id: w.version for flow_id, w in self._changes.items()}
            current = await self.ledger.versions(list(waited))
            for flow_id, version in waited.items():
                if current.get(flow_id, -1) != version:
                    self._changed(flow_id)

    # ------------------------------------------------------------------- pending

    async def pending_status(self, state: str, *, actor: str = "api") -> PendingStatus:
        """Where the flow of this OAuth state stands, for pollers. Expires overdue flows."""
        flow = await self.ledger.by_state_hash(hash_state(state))
        if flow is None:
            raise FlowNotFound("no authorization with this state")
        flow = await self._expire_if_overdue(flow, self.now_ms(), actor=actor)
        return await self._status_of(flow, state)

    async def _status_of(self, flow: Flow, state: str) -> PendingStatus:
        base: dict[str, Any] = {
            "flow_id": flow.id,
            "provider": flow.provider,
            "flow_state": flow.state,
        }
        if flow.state in (FlowState.INITIATED, FlowState.AWAITING_CODE, FlowState.AWAITING_DEVICE):
            return PendingStatus(status="waiting", **base)
        if flow.state in _GONE_REASONS:
            return PendingStatus(
                status="gone",
                reason=_GONE_REASONS[flow.state],
                error_code=flow.error_code,
                error_description=flow.error_description,
                **base,
            )
        row = await self.ledger.pending(state)
        received = row[2] if row else None
        if flow.state is FlowState.CODE_RECEIVED and row is not None and row[1]:
            return PendingStatus(status="ready", received_at=received, **base)
        return PendingStatus(status="consumed", received_at=received, **base)

    async def wait_pending(self, state: str, *, timeout: float) -> PendingStatus:
        """Like pending_status, but wait up to ``timeout`` seconds for the code to arrive.

        A callback recorded by this engine wakes the waiter at once; one recorded by
        another process, on the next look of :meth:`watch_external` (when it runs).
        """
        status = await self.pending_status(state)
        if status.status != "waiting" or timeout <= 0:
            return status
        await self.wait_flow(
            status.flow_id,
            until=lambda flow: flow.state not in (FlowState.INITIATED, FlowState.AWAITING_CODE),
            timeout=timeout,
        )
        return await self.pending_status(state)

    async def take_code(self, state: str, *, actor: str = "api") -> PendingCode:
        """Hand out the code for ``state`` exactly once."""
        status = await self.pending_status(state, actor=actor)
        if status.status == "ready":
            taken = await self.ledger.consume(state, self.now_ms())
            if taken is not None:
                flow_id, code, received_at = taken
                return PendingCode(flow_id=flow_id, code=code, received_at=received_at)
            status = await self.pending_status(state, actor=actor)
        if status.status == "waiting":
            raise CodeAlreadyUsedError("no code has arrived yet", flow_id=status.flow_id)
        if status.status == "gone":
            raise FlowExpiredError(
                f"this authorization has {status.reason}",
                flow_id=status.flow_id,
                state=status.flow_state.value,
            )
        raise CodeAlreadyUsedError("the code was already handed out", flow_id=status.flow_id)

    async def code_verifier(self, flow_id: str) -> str | None:
        """The PKCE verifier of a flow that has not been exchanged yet."""
        return await self.ledger.verifier(flow_id)

    # ------------------------------------------------------------------ exchange

    async def record_exchange(
        self, flow_id: str, *, actor: str, detail: Mapping[str, Any] | None = None
    ) -> Flow:
        """The token endpoint gave tokens: -> exchanged; the verifier is deleted."""
        return await self.move(flow_id, FlowTrigger.EXCHANGE, actor=actor, detail=detail)

    async def record_exchange_failed(
        self,
        flow_id: str,
        *,
        actor: str,
        error_code: str,
        description: str | None = None,
    ) -> Flow:
        return await self.move(
            flow_id,
            FlowTrigger.EXCHANGE_FAILED,
            actor=actor,
            error=error_code,
            description=description,
        )

    async def record_stored(
        self,
        flow_id: str,
        *,
        actor: str,
        token_expires_at: int | None,
        next_check_at: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Flow:
        """Tokens are in auth.json: -> stored. Older connections of the provider are superseded.

        ``next_check_at`` defaults to now: the refresh timer looks at the new connection on
        its next sweep and schedules it from its tokens.
        """
        flow = await self.move(
            flow_id,
            FlowTrigger.STORE,
            actor=actor,
            token_expires_at=token_expires_at,
            next_check_at=next_check_at,
            detail=detail,
        )
        older = await self.ledger.flows(
            provider=flow.provider, states=(FlowState.STORED, FlowState.EXPIRED), limit=1000
        )
        for other in older:
            if other.id != flow.id:
                try:
                    await self.supersede(other.id, by=flow.id, actor=actor)
                except InvalidTransition:
                    # it moved on meanwhile (e.g. another process began refreshing it);
                    # the new connection is stored all the same
                    continue
        return flow

    async def record_store_failed(self, flow_id: str, *, actor: str, description: str) -> Flow:
        return await self.move(
            flow_id,
            FlowTrigger.STORE_FAILED,
            actor=actor,
            error="store_failed",
            description=description,
        )

    # ------------------------------------------------------------------- refresh

    async def begin_refresh(
        self,
        flow_id: str,
        *,
        actor: str,
        expected_version: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Flow:
        """Write-ahead: the ledger says ``refreshing`` before the token request goes out.

        ``detail`` may name the refresh token used by its hash prefix (``refresh_sha``).
        """
        return await self.move(
            flow_id,
            FlowTrigger.BEGIN_REFRESH,
            actor=actor,
            expected_version=expected_version,
            detail=detail,
        )

    async def record_refreshed(
        self,
        flow_id: str,
        *,
        actor: str,
        token_expires_at: int | None,
        next_check_at: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Flow:
        return await self.move(
            flow_id,
            FlowTrigger.REFRESHED,
            actor=actor,
            token_expires_at=token_expires_at,
            next_check_at=next_check_at,
            detail=detail,
        )

    async def record_refresh_failed(
        self,
        flow_id: str,
        *,
        actor: str,
        permanent: bool,
        error_code: str,
        description: str | None = None,
        next_check_at: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Flow:
        """Transient: back to stored (token kept). Permanent: -> expired, reconnect needed.

        A transient failure keeps the connection scheduled: ``next_check_at`` defaults to
        one minute from now (the timer sets its own backoff).
        """
        return await self.move(
            flow_id,
            FlowTrigger.REFRESH_FAILED,
            actor=actor,
            condition=Condition.PERMANENT if permanent else Condition.TRANSIENT,
            error=error_code,
            description=description,
            next_check_at=None if permanent else next_check_at,
            detail=detail,
        )

    # ------------------------------------------------------------------- endings

    async def expire(
        self, flow_id: str, *, actor: str, reason: str, description: str | None = None
    ) -> Flow:
        """Its TTL passed (``reason`` "ttl") or its tokens are gone or dead: -> expired."""
        return await self.move(
            flow_id, FlowTrigger.EXPIRE, actor=actor, error=reason, description=description
        )

    async def cancel(self, flow_id: str, *, actor: str, reason: str | None = None) -> Flow:
        """The flow does not go on: the owner cancelled, or (``reason``) it could not start."""
        return await self.move(
            flow_id,
            FlowTrigger.CANCEL,
            actor=actor,
            error=reason[:64] if reason is not None else None,
        )

    async def revoke(
        self, flow_id: str, *, actor: str, detail: Mapping[str, Any] | None = None
    ) -> Flow:
        return await self.move(flow_id, FlowTrigger.REVOKE, actor=actor, detail=detail)

    async def supersede(self, flow_id: str, *, by: str, actor: str) -> Flow:
        """A newer connection of the same provider (``by``) replaced this one."""
        return await self.move(flow_id, FlowTrigger.SUPERSEDE, actor=actor, detail={"by": by})

    async def sweep_expired(self, *, actor: str = "timer", limit: int = 500) -> list[Flow]:
        """Expire every pending flow past its deadline. The timer calls this periodically."""
        now = self.now_ms()
        expired: list[Flow] = []
        for flow in await self.ledger.due(now, limit=limit):
            try:
                expired.append(await self.expire(flow.id, actor=actor, reason="ttl"))
            except InvalidTransition:
                # moved on meanwhile (e.g. exchanged): it no longer needs expiring
                continue
        return expired

    async def recover(self, *, actor: str = "timer") -> RecoveryReport:
        """At start-up: expire overdue flows and report the ones a crash interrupted."""
        report = RecoveryReport()
        report.expired = await self.sweep_expired(actor=actor)
        for flow in await self.ledger.flows(
            states=(*PENDING_STATES, FlowState.REFRESHING),
            limit=100_000,
        ):
            if flow.state is FlowState.REFRESHING:
                report.refreshing.append(flow)
            elif flow.state is FlowState.EXCHANGED:
                report.exchanged.append(flow)
            else:
                report.waiting.append(flow)
        return report

    async def _expire_if_overdue(self, flow: Flow, now: int, *, actor: str) -> Flow:
        if (
            flow.deadline is not None
            and flow.deadline <= now
            and flow.state
            in (
                FlowState.INITIATED,
                FlowState.AWAITING_CODE,
                FlowState.AWAITING_DEVICE,
                FlowState.CODE_RECEIVED,
            )
        ):
            try:
                return await self.expire(flow.id, actor=actor, reason="ttl")
            except InvalidTransition:
                fresh = await self.ledger.get(flow.id)
                assert fresh is not None
                return fresh
        return flow

    async def move(
        self,
        flow_id: str,
        trigger: FlowTrigger,
        *,
        actor: str,
        condition: Condition | None = None,
        at: int | None = None,
        expected_version: int | None = None,
        detail: Mapping[str, Any] | None = None,
        error: str | None = None,
        description: str | None = None,
        token_expires_at: int | None = None,
        next_check_at: int | None = None,
        deadline: int | None = None,
        valid_for: int | None = None,
        device_secrets: tuple[str, str] | None = None,
        pending_code: tuple[str, str] | None = None,
    ) -> Flow:
        """Apply ``trigger`` and the effects its row declares (states.TRANSITIONS), in one
        ledger transaction; the one place a flow moves.

        The caller gives only what the effects ask for: ``error``/``description`` (an
        error the move records), ``token_expires_at``, ``next_check_at``, ``deadline``
        (epoch ms), ``valid_for`` (ms a device code stays valid), the secrets to keep. A
        value the row does not use is a ValueError: nothing is silently dropped.
        """
        _check_actor(actor)
        effects = effects_of(trigger, condition)
        now = self.now_ms() if at is None else at
        given = {
            "error": error,
            "description": description,
            "token_expires_at": token_expires_at,
            "next_check_at": next_check_at,
            "deadline": deadline,
            "valid_for": valid_for,
            "device_secrets": device_secrets,
            "pending_code": pending_code,
        }
        uses = {
            "error": effects.error in (ErrorEffect.SET, ErrorEffect.NOTE),
            "description": effects.error in (ErrorEffect.SET, ErrorEffect.NOTE),
            "token_expires_at": effects.token_expires_at is not Value.KEEP,
            "next_check_at": effects.next_check_at
            in (Value.GIVEN, Value.GIVEN_OR_NOW, Value.GIVEN_OR_RETRY),
            "deadline": effects.deadline is Value.GIVEN_OR_LINK_TTL,
            "valid_for": effects.deadline is Value.VALID_FOR,
            "device_secrets": effects.secrets is Secrets.STORE_DEVICE,
            "pending_code": effects.secrets is Secrets.STORE_CODE,
        }
        unused = sorted(k for k, v in given.items() if v is not None and not uses[k])
        if unused:
            raise ValueError(f"{trigger.value} does not take {', '.join(unused)}")
        updates: dict[str, Any] = {}
        for column, rule, value in (
            ("deadline", effects.deadline, valid_for if valid_for is not None else deadline),
            ("next_check_at", effects.next_check_at, next_check_at),
            ("token_expires_at", effects.token_expires_at, token_expires_at),
        ):
            if rule is Value.KEEP:
                continue
            if rule is Value.CLEAR:
                updates[column] = None
            elif rule is Value.GIVEN:
                updates[column] = value
            elif rule is Value.GIVEN_OR_NOW:
                updates[column] = now if value is None else value
            elif rule is Value.GIVEN_OR_RETRY:
                updates[column] = now + RETRY_CHECK_MS if value is None else value
            elif rule is Value.GIVEN_OR_LINK_TTL:
                updates[column] = now + to_ms(self.awaiting_ttl) if value is None else value
            elif rule is Value.VALID_FOR:
                if value is None:
                    raise ValueError(f"{trigger.value} needs valid_for")
                updates[column] = now + value
            else:  # CODE_TTL
                updates[column] = now + to_ms(self.code_ttl)
        if effects.error is ErrorEffect.CLEAR:
            updates.update(error_code=None, error_description=None)
        elif effects.error is ErrorEffect.SET:
            updates.update(error_code=error, error_description=description)
        elif effects.error is ErrorEffect.NOTE:
            updates.update(
                {
                    column: value
                    for column, value in (("error_code", error), ("error_description", description))
                    if value is not None
                }
            )
        if effects.error_key is not None and error is not None:
            detail = {effects.error_key: error, **(detail or {})}
        flow = await self.ledger.transition(
            flow_id,
            trigger,
            actor=actor,
            at=now,
            condition=condition,
            expected_version=expected_version,
            updates=updates,
            detail=detail,
            pending_code=pending_code,
            device_secrets=device_secrets,
            drop_verifier=effects.secrets is Secrets.DROP,
        )
        log.info("flow %s %s -> %s (%s)", flow.id, trigger.value, flow.state.value, actor)
        if effects.wakes:
            self._changed(flow.id)
        return flow

    # -------------------------------------------------------------------- reading

    async def get_flow(self, flow_id: str) -> Flow:
        flow = await self.ledger.get(flow_id)
        if flow is None:
            raise FlowNotFound(f"no flow {flow_id}", flow_id=flow_id)
        return flow

    async def inspect(self, flow_id: str) -> FlowRecord:
        flow = await self.get_flow(flow_id)
        return FlowRecord(flow=flow, events=tuple(await self.ledger.events(flow_id)))

    async def list_flows(
        self,
        *,
        provider: str | None = None,
        states: Iterable[FlowState | str] | None = None,
        limit: int = 50,
    ) -> list[Flow]:
        wanted = [FlowState(s) for s in states] if states else None
        return await self.ledger.flows(provider=provider, states=wanted, limit=limit)

    async def connection(self, provider: str) -> Flow | None:
        """The provider's current connection: its newest stored/refreshing/expired flow."""
        flows = await self.ledger.flows(
            provider=provider,
            states=(FlowState.STORED, FlowState.REFRESHING, FlowState.EXPIRED),
            limit=1,
        )
        return flows[0] if flows else None

    async def connections(self) -> list[Flow]:
        """Current connection of every provider that has one, by provider id."""
        flows = await self.ledger.flows(
            states=(FlowState.STORED, FlowState.REFRESHING, FlowState.EXPIRED), limit=10_000
        )
        newest: dict[str, Flow] = {}
        for flow in flows:
            newest.setdefault(flow.provider, flow)
        return [newest[p] for p in sorted(newest)]

    # ---------------------------------------------------------------- scheduling

    async def due_checks(self, now_ms: int, *, limit: int = 500) -> list[Flow]:
        """Connections whose next timer check is due, oldest first."""
        return await self.ledger.due_checks(now_ms, limit=limit)

    async def set_next_check(self, flow_id: str, at_ms: int | None) -> None:
        """When the timer looks at a connection next (None: never)."""
        await self.ledger.set_next_check(flow_id, at_ms)

    async def next_check_at(self, flow_id: str) -> int | None:
        return await self.ledger.next_check_at(flow_id)

    async def flow_diagram(self, flow_id: str, *, fmt: str = "mermaid") -> str:
        """The machine with this flow's path highlighted, as Mermaid or SVG text."""
        from . import diagrams

        record = await self.inspect(flow_id)
        return diagrams.flow_diagram(record, fmt=fmt)

    # -------------------------------------------------------------- notifications

    async def notify(self, **note: Unpack[NoteFields]) -> int:
        """Queue a notification for the owner: a kind, a reason code and data, no text."""
        return await self.ledger.notify(at=self.now_ms(), **note)

    async def notified(self, flow_id: str, kind: str, *, since: int) -> bool:
        """Was a ``kind`` notification about ``flow_id`` queued at ``since`` (ms) or later?"""
        return await self.ledger.notified(flow_id, kind, since=since)

    async def notifications(self, *, limit: int = 100) -> list[Notification]:
        return await self.ledger.undelivered(limit=limit)

    async def mark_delivered(self, notification_id: int) -> bool:
        return await self.ledger.mark_delivered(notification_id, self.now_ms())
