"""The refresh timer, run by ``agentd serve``: asks the Broker, never touches a file itself.

Each sweep:

1. expires authorization flows left waiting past their TTL (``Broker.expire_abandoned``;
   the pending route then answers 410);
2. takes the connections whose check is due (``Broker.due_connections``, at most
   ``policy.batch``) and looks at up to ``policy.concurrency`` of them at once (different
   providers refresh in parallel; one provider is single-flight inside the Broker):

   * ``refreshing`` (a process died mid-refresh, or one is in flight elsewhere):
     ``Broker.settle`` finishes it from the vault, then it is looked at again;
   * tokens gone: ``Broker.expire_connection("tokens_missing")`` (with a notification;
     a concurrent disconnect wins);
   * not due by the pure schedule (``schedule.is_due``): rescheduled, no request;
   * no refresh token: expired (``token_expired``) once the access token is dead;
   * due: ``Broker.renew`` with the timer's margin (a token of unknown lifetime is
     refreshed on schedule to prove the grant alive), and the :class:`RefreshOutcome`
     decides: next check by the schedule, backoff after a transient failure (at least
     the provider's Retry-After), nothing after a permanent one (the Broker expired the
     connection and queued the notification);

3. publishes auth.json once for the whole sweep (``Broker.publish``; also the cheap check
   that puts back entries another writer rolled back);
4. warns before a grant dies on its own (a catalog ``refresh_lifetime``, see forecast.py,
   through ``Broker.warn_lifetime``): one ``reconnect_soon`` notification three days
   before, one ``reconnect_today`` on the last day, each recorded once in the ledger; a
   connection's next check is never later than its next warning window.

After ``warn_after`` consecutive failures one ``refresh_failing`` notification is queued
(once per failure streak). Every transition is recorded with actor ``timer``. ``run``
survives any failing sweep (logged) and keeps going; one connection's failure never stops
the others.

Interfaces for extensions (e.g. grant-lifetime forecasts): the scheduling maths is in
``schedule`` (pure functions of :class:`schedule.TokenTimes` and :class:`TimerPolicy`);
the timer's only collaborator is the Broker; ``SweepReport`` says what a sweep did.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from . import schedule
from .clock import Clock
from .errors import BrokerError, ConcurrentUpdateError, FlowNotFound, InvalidTransition
from .schedule import TimerPolicy
from .states import FlowState

if TYPE_CHECKING:  # pragma: no cover
    from .broker import Broker, Connection, RefreshOutcome

__all__ = ["ACTOR", "RefreshTimer", "SweepReport", "TimerPolicy"]

log = logging.getLogger("flowengine.timer")

ACTOR = "timer"


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
    published: int = 0
    seconds: float = 0.0


class RefreshTimer:
    """Drives refresh and expiry. ``sweep`` is one pass; ``run`` loops until cancelled."""

    def __init__(
        self,
        broker: Broker,
        *,
        policy: TimerPolicy | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
    ) -> None:
        self.broker = broker
        self.policy = policy or TimerPolicy()
        # the broker and the ledger read the same clock: one clock for everything
        self.clock: Clock = clock or broker.clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        #: consecutive failures seen by this timer, per flow id
        self._failures: dict[str, int] = {}
        #: when each connection's next lifetime warning window opens (epoch seconds)
        self._warn_at: dict[str, float] = {}
        self._started = False

    def failures(self, flow_id: str) -> int:
        """Consecutive failures this timer saw for a flow (0 after a success)."""
        return self._failures.get(flow_id, 0)

    def _next(self, times: schedule.TokenTimes, now: float) -> float:
        return schedule.next_check(self.policy, times, now, self._rng.random())

    async def _schedule(self, flow_id: str, when: float | None) -> None:
        """The next check, never later than the connection's next warning window."""
        if when is not None:
            when = min(when, self._warn_at.get(flow_id, when))
        await self.broker.schedule(flow_id, when)

    async def _warn_lifetime(self, conn: Connection, now: float, report: SweepReport) -> None:
        self._warn_at.pop(conn.flow_id, None)
        queued, upcoming = await self.broker.warn_lifetime(conn, now)
        if queued is not None:
            report.lifetime_warned.append(conn.flow_id)
        if upcoming is not None:
            self._warn_at[conn.flow_id] = upcoming

    # ------------------------------------------------------------------ start-up

    async def start_up(self) -> SweepReport:
        """Recover what a crash left (actor ``timer``), then schedule every stored
        connection by this policy (never later than the schedule it already has)."""
        await self.broker.reconcile(actor=ACTOR)
        report = SweepReport()
        now = self.clock.now()
        for conn in await self.broker.stored_connections():
            await self._warn_lifetime(conn, now, report)
            info = await self.broker.peek(conn.provider)
            when = now if info is None else self._next(info.times, now)
            when = min(when, self._warn_at.get(conn.flow_id, when))
            current = await self.broker.next_check(conn.flow_id)
            if current is None or current > when:
                await self._schedule(conn.flow_id, when)
                report.scheduled += 1
        self._started = True
        return report

    # ------------------------------------------------------------------ sweeping

    async def sweep(self) -> SweepReport:
        """One pass: expire abandoned flows, check the due connections, publish once."""
        started = time.perf_counter()
        report = SweepReport()
        for flow in await self.broker.expire_abandoned(actor=ACTOR):
            report.expired_pending.append(flow.id)
        now = self.clock.now()
        due = await self.broker.due_connections(now, limit=self.policy.batch)
        if due:
            slots = anyio.Semaphore(max(1, self.policy.concurrency))

            async def one(conn: Connection) -> None:
                async with slots:
                    await self._guarded(conn, now, report)

            async with anyio.create_task_group() as tg:
                for conn in due:
                    tg.start_soon(one, conn)
        # one auth.json rewrite for everything this sweep refreshed
        report.published = len(await self.broker.publish())
        report.seconds = time.perf_counter() - started
        return report

    async def _guarded(self, conn: Connection, now: float, report: SweepReport) -> None:
        report.checked += 1
        try:
            await self._check(conn, now, report)
        except (InvalidTransition, ConcurrentUpdateError, FlowNotFound) as err:
            # another actor moved the connection meanwhile: look again next sweep
            log.info("connection %s changed during the sweep (%s)", conn.flow_id, err.code)
            await self.broker.schedule(conn.flow_id, now + self.policy.interval)
        except BrokerError as err:
            await self._failed(conn, now, report, retry_after=None, reason=err.code)
        except Exception:  # one connection must never stop the others
            log.exception("checking %s (flow %s) failed", conn.provider, conn.flow_id)
            await self._failed(conn, now, report, retry_after=None, reason="error")

    async def _check(self, conn: Connection, now: float, report: SweepReport) -> None:
        broker = self.broker
        if conn.state is FlowState.REFRESHING:
            # in flight elsewhere (we wait for its lock) or left so by a dead process
            state = await broker.settle(conn.provider, actor=ACTOR, flow_id=conn.flow_id)
            await broker.schedule(conn.flow_id, now if state is FlowState.STORED else None)
            return
        if conn.state is not FlowState.STORED:
            self._failures.pop(conn.flow_id, None)
            await broker.schedule(conn.flow_id, None)
            return
        await self._warn_lifetime(conn, now, report)
        info = await broker.peek(conn.provider)
        if info is None:
            await self._expire(conn, "tokens_missing", now, report)
            return
        times = info.times
        if info.settled and not schedule.is_due(self.policy, times, now):
            # fresh enough (e.g. refreshed by the CLI or the bot): no request
            self._failures.pop(conn.flow_id, None)
            await self._schedule(conn.flow_id, self._next(times, now))
            report.scheduled += 1
            return
        if not times.has_refresh:
            if times.expires is not None and times.expires / 1000 <= now:
                await self._expire(conn, "token_expired", now, report)
            else:
                await self._schedule(conn.flow_id, self._next(times, now))
                report.scheduled += 1
            return
        outcome = await broker.renew(
            conn.provider,
            actor=ACTOR,
            min_valid=schedule.timer_margin(self.policy, times),
            # unknown lifetime: a scheduled refresh proves the grant is still alive
            force=times.expires is None,
            seen=info.version,
            publish=False,
        )
        await self._settle_outcome(conn, outcome, now, report)

    async def _settle_outcome(
        self, conn: Connection, outcome: RefreshOutcome, now: float, report: SweepReport
    ) -> None:
        from .broker import Outcome

        kind = outcome.outcome
        if kind in (Outcome.REFRESHED, Outcome.STILL_VALID):
            self._failures.pop(conn.flow_id, None)
            if kind is Outcome.REFRESHED:
                report.refreshed.append(conn.flow_id)
            assert outcome.times is not None
            await self._schedule(conn.flow_id, self._next(outcome.times, self.clock.now()))
            report.scheduled += 1
        elif kind is Outcome.RETRY:
            retry_after = None if outcome.retry_at is None else outcome.retry_at - now
            await self._failed(conn, now, report, retry_after=retry_after, reason=outcome.reason)
        elif kind is Outcome.REAUTHORIZE:
            # the broker moved the connection to expired and queued the notification
            self._failures.pop(conn.flow_id, None)
            report.expired_connections.append(conn.flow_id)
            await self.broker.schedule(conn.flow_id, None)
        else:  # NOT_CONNECTED
            await self._expire(conn, "tokens_missing", now, report)

    async def _expire(self, conn: Connection, reason: str, now: float, report: SweepReport) -> None:
        if await self.broker.expire_connection(conn.flow_id, reason=reason, actor=ACTOR):
            self._failures.pop(conn.flow_id, None)
            report.expired_connections.append(conn.flow_id)
        else:  # it came back, or moved on: the next sweep decides
            await self._schedule(conn.flow_id, now + self.policy.interval)

    async def _failed(
        self,
        conn: Connection,
        now: float,
        report: SweepReport,
        *,
        retry_after: float | None,
        reason: str | None,
    ) -> None:
        """A refresh attempt failed without ending the connection: back off, maybe warn."""
        attempts = self._failures.get(conn.flow_id, 0) + 1
        self._failures[conn.flow_id] = attempts
        delay = schedule.backoff(self.policy, attempts, retry_after, self._rng.random())
        await self._schedule(conn.flow_id, now + delay)
        report.retrying.append(conn.flow_id)
        log.warning(
            "refresh of %s failed (%s, %d in a row); retrying in %.0f s",
            conn.provider,
            reason or "error",
            attempts,
            delay,
        )
        if schedule.warn_now(self.policy, attempts):
            await self.broker.warn_failing(conn, attempts=attempts, reason=reason)
            report.warned.append(conn.flow_id)

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
