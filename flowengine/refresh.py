"""The lifecycle timer: proactive refresh and expiry, run by ``agentd serve``.

Each sweep:

1. expires flows left waiting past their TTL (``FlowEngine.sweep_expired``: awaiting_code
   after ``awaiting_ttl``, code_received after ``code_ttl``); the pending route answers 410;
2. takes the connections whose ``next_check_at`` is due (one indexed query, at most
   ``policy.batch`` per sweep), reads auth.json ONCE for all of them, and for each:

   * token fresh enough (another actor refreshed it): reschedule, no request;
   * due: refresh through the SAME single-flight path as ``get_token``
     (``Broker.get_token(min_valid=threshold)``), so the timer, the CLI and the bot never
     double-refresh; a connection of unknown expiry is refreshed (checked) every
     ``unknown_expiry_check`` seconds since its tokens were obtained;
   * no refresh token: expired (and a notification) once the access token is dead;
   * tokens gone from auth.json: expired (and a notification), re-checked under the lock
     so a concurrent disconnect wins;

3. schedules the next check: when ``refresh_fraction`` of the token's lifetime is left or
   ``refresh_floor`` before expiry, whichever is earlier, minus jitter (never later);
   after a transient failure, exponential backoff with jitter, at least the provider's
   Retry-After; after a permanent failure never (the broker moved the flow to ``expired``
   and queued an ``expired`` notification). After ``warn_after`` consecutive failures one
   ``refresh_failing`` notification is queued (once per failure streak).

4. warns before a grant dies on its own (a catalog ``refresh_lifetime``, see forecast.py):
   one ``reconnect_soon`` notification three days before, one ``reconnect_today`` on the
   last day, each recorded once in the ledger; a connection's next check is never later
   than its next warning window.

The broker swallows a transient failure while the current token is still valid (it
returns the old token); the timer sees it in the ledger (the flow's ``error_code``) and
backs off all the same.

Every transition it causes is recorded with actor ``timer``. ``run`` survives any failing
sweep (logged) and keeps going; a failure of one connection never stops the others.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from . import forecast
from .clock import Clock, to_ms
from .errors import (
    BrokerError,
    ConcurrentUpdateError,
    FlowNotFound,
    InvalidTransition,
    NotConnectedError,
    ProviderTransientError,
    ReauthorizationRequired,
)
from .models import Flow
from .states import FlowState
from .tokens import TokenSet

if TYPE_CHECKING:  # pragma: no cover
    from .broker import Broker
    from .engine import FlowEngine

__all__ = ["RefreshTimer", "SweepReport", "TimerPolicy"]

log = logging.getLogger("flowengine.refresh")

ACTOR = "timer"


@dataclass(frozen=True, slots=True)
class TimerPolicy:
    """How often the timer sweeps and when it refreshes. Seconds unless said otherwise."""

    #: seconds between sweeps
    interval: float = 30.0
    #: refresh when this fraction of the access token's lifetime is left ...
    refresh_fraction: float = 0.25
    #: ... or when it is this close to expiry, whichever comes first (at most half the
    #: lifetime, so short-lived tokens are not refreshed on every sweep)
    refresh_floor: float = 300.0
    #: relative jitter: checks move up to this fraction earlier, backoff +- this fraction
    jitter: float = 0.1
    #: tokens of unknown lifetime are refreshed (checked) this long after they were obtained
    unknown_expiry_check: float = 3600.0
    #: first retry delay after a failure; doubles on every consecutive failure
    backoff_base: float = 60.0
    backoff_max: float = 3600.0
    #: a provider's Retry-After is honoured up to this long
    retry_after_max: float = 86_400.0
    #: queue one ``refresh_failing`` notification after this many consecutive failures
    warn_after: int = 3
    #: a flow in ``refreshing`` this long is reconciled (a crashed process left it)
    stale_refreshing: float = 120.0
    #: most connections looked at in one sweep (the rest wait for the next one)
    batch: int = 500


@dataclass(slots=True)
class SweepReport:
    """What one sweep did (flow ids)."""

    expired_pending: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    expired_connections: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)
    lifetime_warned: list[str] = field(default_factory=list)
    checked: int = 0
    scheduled: int = 0
    seconds: float = 0.0


class RefreshTimer:
    """Drives refresh and expiry. ``sweep`` is one pass; ``run`` loops until cancelled."""

    def __init__(
        self,
        engine: FlowEngine,
        broker: Broker,
        *,
        policy: TimerPolicy | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
    ) -> None:
        self.engine = engine
        self.broker = broker
        self.policy = policy or TimerPolicy()
        # the broker and the ledger read engine.clock: one clock for everything
        self.clock: Clock = clock or engine.clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        #: consecutive failures seen by this timer, per flow id
        self._failures: dict[str, int] = {}
        #: when each connection's next lifetime warning window opens (epoch seconds)
        self._warn_at: dict[str, float] = {}
        self._started = False

    # --------------------------------------------------------------- scheduling

    def refresh_threshold(self, expires_ms: int | None, obtained_ms: int | None) -> float:
        """Seconds before expiry at which a token should be refreshed."""
        p = self.policy
        if expires_ms is None or obtained_ms is None or expires_ms <= obtained_ms:
            return p.refresh_floor
        lifetime = (expires_ms - obtained_ms) / 1000
        return max(p.refresh_fraction * lifetime, min(p.refresh_floor, lifetime / 2))

    def refresh_leeway(self, expires_ms: int | None, obtained_ms: int | None) -> float:
        """``refresh_threshold`` widened by the jitter window: a check scheduled early by
        jitter finds the token due (and asks the broker for at least this much validity)."""
        threshold = self.refresh_threshold(expires_ms, obtained_ms)
        if expires_ms is None or obtained_ms is None:
            return threshold
        lifetime = (expires_ms - obtained_ms) / 1000
        return threshold + self.policy.jitter * max(0.0, lifetime - threshold)

    def is_due(self, tokens: TokenSet, now: float) -> bool:
        """Should the timer refresh (or, without a refresh token, expire) these tokens now?"""
        if tokens.expires is None:
            if tokens.obtained_at is None:
                return True
            age = now - tokens.obtained_at / 1000
            return age >= self.policy.unknown_expiry_check * (1 - self.policy.jitter)
        if not tokens.refresh:
            return tokens.expires <= to_ms(now)
        leeway = self.refresh_leeway(tokens.expires, tokens.obtained_at)
        return not tokens.is_valid(to_ms(now), leeway_ms=to_ms(leeway))

    def next_check(
        self,
        expires_ms: int | None,
        obtained_ms: int | None,
        now: float,
        *,
        has_refresh: bool = True,
    ) -> float:
        """When (epoch seconds) to look at a connection next; never before ``now``."""
        p = self.policy
        if expires_ms is None:
            start = now if obtained_ms is None else obtained_ms / 1000
            due = start + p.unknown_expiry_check
            spread = p.jitter * p.unknown_expiry_check
        elif not has_refresh:
            # nothing to refresh with: look again when it dies, to mark it expired
            return max(now, expires_ms / 1000)
        else:
            due = expires_ms / 1000 - self.refresh_threshold(expires_ms, obtained_ms)
            spread = p.jitter * max(0.0, due - now)
        # jitter only moves the check earlier, never past the threshold
        return max(now, due - self._rng.uniform(0, spread) if spread > 0 else due)

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Delay (s) before retry number ``attempts`` (1 = after the first failure)."""
        p = self.policy
        delay = min(p.backoff_max, p.backoff_base * 2 ** max(0, attempts - 1))
        if p.jitter:
            delay *= 1.0 + self._rng.uniform(-p.jitter, p.jitter)
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, p.retry_after_max))
        return delay

    def failures(self, flow_id: str) -> int:
        """Consecutive failures this timer saw for a flow (0 after a success)."""
        return self._failures.get(flow_id, 0)

    async def _set_next(self, flow_id: str, when: float) -> None:
        when = min(when, self._warn_at.get(flow_id, when))
        await self.engine.ledger.set_next_check(flow_id, to_ms(when))

    async def _warn_lifetime(self, flow: Flow, now: float, report: SweepReport) -> None:
        """Queue the lifetime warning that is due (once), note when the next one opens."""
        catalog = self.broker.catalog
        lifetime = catalog.get(flow.provider).refresh_lifetime if flow.provider in catalog else None
        self._warn_at.pop(flow.id, None)
        if lifetime is None or lifetime.rule == "none" or lifetime.condition is not None:
            return
        authorized, refreshed = forecast.grant_times((await self.engine.inspect(flow.id)).events)
        deadline = forecast.grant_deadline(
            lifetime,
            authorized_at=(authorized or flow.created_at) / 1000,
            last_refresh=refreshed / 1000 if refreshed else None,
        )
        due = forecast.warning_due(deadline, now)
        if due is not None and not await self.engine.ledger.notified(
            flow.id, due.kind, since=to_ms(due.opens)
        ):
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(due.deadline))
            await self.engine.notify(
                kind=due.kind,
                provider=flow.provider,
                flow_id=flow.id,
                chat_id=flow.chat_id,
                message=f"{self._name(flow.provider)} needs reconnecting by {when}: its grant"
                f" ends {lifetime.describe()}",
            )
            report.lifetime_warned.append(flow.id)
        upcoming = forecast.next_warning_at(deadline, now)
        if upcoming is not None:
            self._warn_at[flow.id] = upcoming

    # ------------------------------------------------------------------ start-up

    async def start_up(self) -> SweepReport:
        """Reconcile what a crash left (actor ``timer``), then schedule every stored
        connection by this policy (never later than the schedule it already has)."""
        await self.broker.reconcile(actor=ACTOR)
        report = SweepReport()
        now = self.clock.now()
        raw = await anyio.to_thread.run_sync(self.broker.tokens.read_all)
        for flow in await self.engine.list_flows(states=[FlowState.STORED], limit=1_000_000):
            await self._warn_lifetime(flow, now, report)
            tokens = _parse(raw, flow.provider)
            if tokens is None:
                when = now  # the next sweep decides what to do with it
            else:
                when = self.next_check(
                    tokens.expires, tokens.obtained_at, now, has_refresh=bool(tokens.refresh)
                )
            when = min(when, self._warn_at.get(flow.id, when))
            current = await self.engine.ledger.next_check_at(flow.id)
            if current is None or current > to_ms(when):
                await self._set_next(flow.id, when)
                report.scheduled += 1
        self._started = True
        return report

    # ------------------------------------------------------------------ sweeping

    async def sweep(self) -> SweepReport:
        """One pass: expire overdue pending flows, then check the due connections."""
        started = time.perf_counter()
        report = SweepReport()
        for flow in await self.engine.sweep_expired(actor=ACTOR):
            report.expired_pending.append(flow.id)
        now = self.clock.now()
        due = await self.engine.ledger.due_checks(to_ms(now), limit=self.policy.batch)
        if due:
            # auth.json once per sweep, not once per connection
            try:
                raw = await anyio.to_thread.run_sync(self.broker.tokens.read_all)
            except BrokerError as err:
                # unreadable (corrupt) auth.json: touch nothing, look again later
                log.error("cannot read the token file (%s); checks postponed", err.code)
                for flow in due:
                    await self._set_next(flow.id, now + self.policy.interval * 10)
                report.seconds = time.perf_counter() - started
                return report
            for flow in due:
                report.checked += 1
                try:
                    await self._check(flow, _parse(raw, flow.provider), now, report)
                except Exception:  # one connection must never stop the others
                    log.exception("checking %s (flow %s) failed", flow.provider, flow.id)
                    await self._failed(flow, now, report, retry_after=None)
        report.seconds = time.perf_counter() - started
        return report

    async def _check(
        self, flow: Flow, tokens: TokenSet | None, now: float, report: SweepReport
    ) -> None:
        if flow.state is FlowState.REFRESHING:
            await self._check_refreshing(flow, now)
            return
        if flow.state is not FlowState.STORED:
            self._failures.pop(flow.id, None)
            await self.engine.ledger.set_next_check(flow.id, None)
            return
        await self._warn_lifetime(flow, now, report)
        if tokens is None:
            await self._tokens_missing(flow, now, report)
            return
        if not self.is_due(tokens, now):
            # fresh enough (e.g. refreshed by the CLI or the bot): no request
            self._failures.pop(flow.id, None)
            await self._reschedule(flow.id, tokens.expires, tokens.obtained_at, now, tokens)
            report.scheduled += 1
            return
        if not tokens.refresh:
            if tokens.expires is None:
                # nothing to check it with; look again later
                await self._reschedule(flow.id, None, to_ms(now), now, tokens)
                report.scheduled += 1
                return
            await self._expire_connection(flow, "token_expired", report)
            return
        await self._refresh(flow, tokens, now, report)

    async def _refresh(self, flow: Flow, tokens: TokenSet, now: float, report: SweepReport) -> None:
        provider = flow.provider
        try:
            if tokens.expires is None:
                # unknown lifetime: a scheduled refresh proves the grant is still alive
                access = (await self.broker.refresh(provider, actor=ACTOR, force=True)).access
            else:
                leeway = self.refresh_leeway(tokens.expires, tokens.obtained_at)
                access = await self.broker.get_token(provider, actor=ACTOR, min_valid=leeway)
        except ProviderTransientError as err:
            await self._failed(flow, now, report, retry_after=err.retry_after, code=err.code)
            return
        except ReauthorizationRequired:
            # the broker moved the connection to expired and queued the notification
            self._failures.pop(flow.id, None)
            report.expired_connections.append(flow.id)
            await self._settle(flow, now)
            return
        except NotConnectedError:
            await self._tokens_missing(flow, now, report)
            return
        except (InvalidTransition, ConcurrentUpdateError, FlowNotFound) as err:
            # another actor moved the connection meanwhile: look again next sweep
            log.info("connection %s changed during the sweep (%s)", flow.id, err.code)
            await self._settle(flow, now, soon=True)
            return
        except BrokerError as err:
            await self._failed(flow, now, report, retry_after=None, code=err.code)
            return
        current = await self.engine.ledger.get(flow.id)
        if current is None or current.state is not FlowState.STORED:
            self._failures.pop(flow.id, None)
            return
        if access == tokens.access and current.error_code is not None:
            # the broker kept the still-valid token after a failed refresh: back off anyway
            hint = await self.engine.ledger.next_check_at(flow.id)
            retry_after = None if hint is None else hint / 1000 - self.clock.now()
            await self._failed(
                current, now, report, retry_after=retry_after, code=current.error_code
            )
            return
        self._failures.pop(flow.id, None)
        report.refreshed.append(flow.id)
        # the ledger has the new expiry; updated_at is when the new pair was recorded
        await self._reschedule(
            flow.id, current.token_expires_at, current.updated_at, self.clock.now(), None
        )
        report.scheduled += 1

    async def _reschedule(
        self,
        flow_id: str,
        expires_ms: int | None,
        obtained_ms: int | None,
        now: float,
        tokens: TokenSet | None,
    ) -> None:
        has_refresh = True if tokens is None else bool(tokens.refresh)
        when = self.next_check(expires_ms, obtained_ms, now, has_refresh=has_refresh)
        await self._set_next(flow_id, when)

    async def _failed(
        self,
        flow: Flow,
        now: float,
        report: SweepReport,
        *,
        retry_after: float | None,
        code: str | None = None,
    ) -> None:
        """A refresh attempt failed without ending the connection: back off, maybe warn."""
        attempts = self._failures.get(flow.id, 0) + 1
        self._failures[flow.id] = attempts
        delay = self.backoff(attempts, retry_after)
        current = await self.engine.ledger.get(flow.id)
        if current is None or current.state is not FlowState.STORED:
            self._failures.pop(flow.id, None)
            return
        await self._set_next(flow.id, now + delay)
        report.retrying.append(flow.id)
        log.warning(
            "refresh of %s failed (%s, %d in a row); retrying in %.0f s",
            flow.provider,
            code or "error",
            attempts,
            delay,
        )
        if attempts == self.policy.warn_after:
            name = self._name(flow.provider)
            await self.engine.notify(
                kind="refresh_failing",
                provider=flow.provider,
                flow_id=flow.id,
                chat_id=flow.chat_id,
                message=(
                    f"{name} token refresh failed {attempts} times in a row ({code or 'error'});"
                    " the agent keeps the current token and keeps trying"
                ),
            )
            report.warned.append(flow.id)

    async def _settle(self, flow: Flow, now: float, *, soon: bool = False) -> None:
        """After an unexpected outcome: a still-stored connection must stay scheduled."""
        current = await self.engine.ledger.get(flow.id)
        if current is None or current.state is not FlowState.STORED:
            return
        delay = self.policy.interval if soon else self.policy.backoff_max
        await self._set_next(flow.id, now + delay)

    async def _check_refreshing(self, flow: Flow, now: float) -> None:
        """A due flow in ``refreshing``: in flight elsewhere, or left so by a crash."""
        if to_ms(now) - flow.updated_at >= to_ms(self.policy.stale_refreshing):
            # reconcile takes the auth.json lock: whoever was refreshing has finished,
            # so a flow still in refreshing is stale and is settled (actor timer)
            await self.broker.reconcile(actor=ACTOR)
        else:
            await self._set_next(flow.id, now + self.policy.interval)

    async def _tokens_missing(self, flow: Flow, now: float, report: SweepReport) -> None:
        # under the auth.json lock: a disconnect in progress finishes first and wins
        async with self.broker.tokens.locked():
            current = await self.engine.ledger.get(flow.id)
            if current is None or current.state is not FlowState.STORED:
                return
            tokens = await anyio.to_thread.run_sync(self.broker.tokens.read, flow.provider)
            if tokens is not None:
                await self._set_next(flow.id, now)  # it came back: next sweep
                return
            await self._expire_connection(current, "tokens_missing", report)

    async def _expire_connection(self, flow: Flow, reason: str, report: SweepReport) -> None:
        try:
            flow = await self.engine.expire(flow.id, actor=ACTOR, reason=reason)
        except (InvalidTransition, ConcurrentUpdateError):
            return  # moved on meanwhile (reconnected, disconnected)
        self._failures.pop(flow.id, None)
        await self.engine.notify(
            kind="expired",
            provider=flow.provider,
            flow_id=flow.id,
            chat_id=flow.chat_id,
            message=f"{self._name(flow.provider)} connection expired — tap to reconnect",
        )
        report.expired_connections.append(flow.id)

    def _name(self, provider: str) -> str:
        catalog = self.broker.catalog
        return catalog.get(provider).name if provider in catalog else provider

    # ---------------------------------------------------------------------- loop

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Start up, then sweep every ``policy.interval`` seconds until cancelled.

        Neither a failing start-up nor a failing sweep stops the loop (both are logged;
        the start-up is tried again before the next sweep).
        """
        await self._try_start_up()
        task_status.started()
        while True:
            if not self._started:
                await self._try_start_up()
            try:
                report = await self.sweep()
            except Exception:  # never let one bad sweep stop the timer
                log.exception("sweep failed; trying again in %g s", self.policy.interval)
            else:
                if report.refreshed or report.expired_pending or report.expired_connections:
                    log.info(
                        "sweep: %d refreshed, %d links expired, %d connections expired,"
                        " %d retrying (%.1f ms)",
                        len(report.refreshed),
                        len(report.expired_pending),
                        len(report.expired_connections),
                        len(report.retrying),
                        report.seconds * 1000,
                    )
            await self._sleep(self.policy.interval)

    async def _try_start_up(self) -> None:
        try:
            await self.start_up()
        except Exception:
            log.exception("timer start-up failed; trying again before the next sweep")


def _parse(raw: Mapping[str, Any], provider: str) -> TokenSet | None:
    entry = raw.get(provider)
    return TokenSet.from_entry(entry) if isinstance(entry, dict) else None
