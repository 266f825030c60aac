"""Broker: THE facade the bot, the CLI, the API and the refresh timer call.

It ties the flow engine (ledger), the catalog, the client credentials, the token vault,
auth.json and the token endpoint together:

* ``begin`` / ``complete`` / ``complete_state``: an authorization from the link to stored
  tokens, every step recorded in the ledger;
* ``begin_device`` / ``complete_device``: the device authorization grant (RFC 8628): a user
  code instead of a link, the token endpoint polled (``slow_down`` honoured), the answer
  captured in the vault like an exchange's;
* ``provider_for`` / ``adopt``: ``connect <url>``: discovery (RFC 9728, RFC 8414, OpenID
  Connect), dynamic client registration (RFC 7591) and a catalog entry persisted for the
  owner; such a provider's metadata is validated again on every connect and after a
  refresh failure that is no network trouble (see ``revalidate``);
* ``renew``: refresh a connection if it needs it and say what happened as a
  :class:`RefreshOutcome` value (refreshed / still valid / retry at / re-authorize / not
  connected); ``get_token`` and ``refresh`` are built on it for callers that want a
  token or an exception;
* ``hand_out``: an access token for another machine (``GET /v1/tokens/<provider>``):
  ``renew``, then the audit row (audit.py) before the token leaves; ``handouts`` reads
  the audit;
* ``disconnect`` (RFC 7009 revocation where the provider has it), ``status``;
* ``reconcile`` at start-up, and the timer's questions (``due_connections``, ``peek``,
  ``schedule``, ``settle``, ``expire_connection``, ``warn_failing``, ``warn_lifetime``,
  ``publish``), so the timer never touches the ledger or a token file itself.

**Where tokens live.** The vault (vault.py) is the source of truth; auth.json is published
from it. One refresh, in order:

1. per-provider single flight: an ``anyio.Lock`` in this process, then the provider's
   ``flock`` in the vault across processes (the kernel drops it if the holder dies, so it
   cannot expire under a slow provider; different providers refresh in parallel);
2. space for the answer is reserved in the vault (nothing is sent if the disk is full);
3. the ledger says ``refreshing`` (event detail: hash prefix of the refresh token used);
4. the vault records the *intent* (durable) — the request goes out only after this;
5. the answer is streamed into the vault as it is read off the socket (from then on no
   kill of this process can lose it), then parsed and written as the new pair, fsynced —
   before anything else;
6. the ledger says ``refreshed`` (hash prefix of the refresh token received);
7. auth.json is published (at once for a caller, once per sweep for the timer).

A process killed at any step leaves the vault saying what happened; whoever takes the
provider's lock next finishes it: a captured answer is parsed and stored, an intent
without an answer retries the old refresh token once (providers with a reuse grace
accept it) and, if the provider answers ``invalid_grant``, the connection moves to
``expired`` with a notification whose reason is ``answer_lost``. auth.json entries that
another writer rolled back are re-published on the next read or sweep.

httpx and Authlib are imported only when a request is made, so importing this module
stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from . import schedule
from .audit import Caller, HandOutRecord, Retention, token_sha
from .catalog import Catalog, ProviderSpec
from .clock import Clock, to_ms
from .credentials import ClientCredentials, CredentialStore
from .discovery import STRICT, DiscoveredStore, Discovery, UrlPolicy
from .engine import FlowEngine
from .errors import (
    BrokerError,
    ConcurrentUpdateError,
    ConfigError,
    CredentialsMissingError,
    FlowError,
    InvalidTransition,
    NoDeviceEndpointError,
    NotConnectedError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
    StorageError,
    UnknownProviderError,
)
from .forecast import grant_deadline, grant_times, next_warning_at, warning_due
from .models import Flow, public_fields
from .protocol import build_authorize_url
from .registration import Registration
from .schedule import TokenTimes
from .states import FlowState, FlowTrigger
from .tokens import TokenSet, TokenStore, entry_matches, releasing
from .vault import Intent, ProviderVault, Record, Vault, checkpoint, token_hash

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "Adopted",
    "Broker",
    "ConnectStart",
    "Connection",
    "ConnectionStatus",
    "DeviceOutcome",
    "DeviceStart",
    "DisconnectResult",
    "HandOut",
    "Outcome",
    "ReconcileReport",
    "RefreshOutcome",
    "TokenInfo",
]

log = logging.getLogger("flowengine.broker")

#: when a transient refresh failure gives no Retry-After, look again after this long
DEFAULT_RETRY_DELAY = 60.0
#: how long past a device code's expiry polling goes on when the provider does not say
#: expired_token (then the flow expires here with reason "ttl")
DEVICE_GRACE_MS = 10_000
#: vault write attempts after an answer arrived (seconds to wait before each)
_STORE_RETRIES = (0.0, 0.05, 0.2, 0.5)

_CONNECTION_STATES = (FlowState.STORED, FlowState.REFRESHING, FlowState.EXPIRED)


# ------------------------------------------------------------------------ values


class Outcome(StrEnum):
    """What ``Broker.renew`` did."""

    REFRESHED = "refreshed"  # a new pair is in the vault
    STILL_VALID = "still_valid"  # no request needed (or another caller just refreshed)
    RETRY = "retry"  # transient failure: try again at ``retry_at``; tokens kept
    REAUTHORIZE = "reauthorize"  # the grant is gone: the owner must connect again
    NOT_CONNECTED = "not_connected"  # no tokens for this provider


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """The result of ``Broker.renew``: data, no sentences. ``repr`` hides the tokens."""

    outcome: Outcome
    provider: str
    flow_id: str | None = None
    #: the current pair's times (scheduling); None when not connected
    times: TokenTimes | None = None
    #: RETRY: when to try again (epoch seconds)
    retry_at: float | None = None
    #: why, as a code: "invalid_grant", "answer_lost", "no_refresh_token",
    #: "provider_unavailable", "storage_error", ...
    reason: str | None = None
    #: the current access token is usable right now (even after a failed refresh)
    usable: bool = False
    tokens: TokenSet | None = field(default=None, repr=False)
    error: BrokerError | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.REFRESHED, Outcome.STILL_VALID)


@dataclass(frozen=True, slots=True)
class HandOut:
    """What ``Broker.hand_out`` did: the renew outcome, and the record when a token went out."""

    outcome: RefreshOutcome
    record: HandOutRecord | None = None
    #: the identity's first hand-out of this provider (the owner was notified)
    first: bool = False

    @property
    def handed_out(self) -> bool:
        return self.record is not None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A connection's tokens as the timer may see them: times and a version, no secret."""

    provider: str
    flow_id: str | None
    times: TokenTimes
    #: changes whenever the access token changes (a hash prefix, not the token)
    version: str
    #: False while a refresh is in flight or an interrupted one waits to be finished
    settled: bool = True


@dataclass(frozen=True, slots=True)
class Connection:
    """A connection flow the timer looks at."""

    provider: str
    flow_id: str
    state: FlowState
    chat_id: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectStart:
    """What ``begin`` returns: the flow and the link the owner opens. Secrets hidden."""

    flow: Flow
    spec: ProviderSpec
    state: str = field(repr=False)
    authorize_url: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class DeviceStart:
    """What ``begin_device`` returns: what the owner needs to approve (RFC 8628 §3.3).

    The user code and the complete verification URI are for the owner's eyes only.
    """

    flow: Flow
    spec: ProviderSpec
    user_code: str = field(repr=False)
    verification_uri: str
    verification_uri_complete: str | None = field(repr=False)
    #: epoch ms after which the user code is no longer accepted
    expires_at: int
    #: seconds between two polls
    interval: int


@dataclass(frozen=True, slots=True)
class DeviceOutcome:
    """How a device authorization ended. ``status``: connected, denied, expired, cancelled
    or failed (``error``/``description`` say why). ``repr`` hides the tokens."""

    status: str
    flow: Flow
    tokens: TokenSet | None = field(default=None, repr=False)
    error: str | None = None
    description: str | None = None
    #: token requests this call made, and how many of them answered slow_down
    polls: int = 0
    slow_downs: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "connected"


@dataclass(frozen=True, slots=True)
class Adopted:
    """A provider ``adopt`` made (or refreshed) from a URL: its entry, where it came from and
    whether a client was registered just now or a stored registration reused."""

    spec: ProviderSpec
    discovery: Discovery
    registration: Registration | None
    registered: bool = False
    #: the catalog entry is new or its metadata changed
    changed: bool = False


@dataclass(frozen=True, slots=True)
class DisconnectResult:
    revoked_remotely: bool
    has_revocation_endpoint: bool


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """One provider's connection, as ``agentd status`` and the bot show it. No secrets."""

    provider: str
    name: str
    state: str  # a FlowState value, or "external" (tokens in auth.json, no flow)
    expires: int | None  # epoch ms of the access token, None = unknown
    last_refresh: int | None  # epoch ms of the last successful refresh
    scopes: tuple[str, ...]
    flow_id: str | None
    has_refresh_token: bool = False
    error_code: str | None = None
    #: epoch ms by which the owner must connect again (the catalog's lifetime rule), if known
    reconnect_by: int | None = None
    #: "granted" (the provider's token response said so) or "requested" (it did not)
    scope_source: str = "granted"

    def public(self) -> dict[str, Any]:
        return public_fields(self)


@dataclass(slots=True)
class ReconcileReport:
    """What ``reconcile`` repaired at start-up (flow ids, provider ids, counts)."""

    refreshed: list[str] = field(default_factory=list)
    refresh_failed: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    store_failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    #: providers whose interrupted refresh was finished from the vault
    recovered: list[str] = field(default_factory=list)
    #: providers whose auth.json entry was re-published
    republished: list[str] = field(default_factory=list)
    orphans_removed: int = 0


@dataclass(frozen=True, slots=True)
class _Stranded:
    """A new pair the vault could not take (disk failing): kept in memory until it can."""

    tokens: TokenSet = field(repr=False)
    flow_id: str | None
    lineage: tuple[str, ...]
    at: int


def _stored_discovery(spec: ProviderSpec) -> Discovery:
    """A Discovery standing for a stored entry (no fetch happened)."""
    return Discovery(
        source=spec.resource or spec.issuer or spec.authorize_url,
        issuer=spec.issuer or "",
        metadata_url=spec.docs_url or "",
        metadata={},
        resource=spec.resource,
        via="stored",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentd-oauth")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return ""


def _authorize_params(spec: ProviderSpec) -> dict[str, str]:
    """The catalog's extra authorize parameters, and ``resource`` (RFC 8707) if it has one."""
    params = dict(spec.authorize_params)
    if spec.resource and "resource" not in params:
        params["resource"] = spec.resource
    return params


def _times(tokens: TokenSet) -> TokenTimes:
    return TokenTimes(tokens.expires, tokens.obtained_at, bool(tokens.refresh))


def _lineage(record: Record | None, *tokens: TokenSet | None) -> tuple[str, ...]:
    """The record's lineage with these (now earlier) tokens in front."""
    new = [token_hash(t, 16) for ts in tokens if ts for t in (ts.refresh, ts.access) if t]
    old = list(record.lineage) if record else []
    seen: list[str] = []
    for item in [*new, *old]:
        if item not in seen:
            seen.append(item)
    return tuple(seen[:16])


def _request_may_have_arrived(err: ProviderError) -> bool:
    """A transport failure after the request may have been delivered (answer lost)?"""
    if err.provider_status is not None:
        return False  # the provider answered: the request is settled
    import httpx

    cause = err.__cause__
    return not isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout) and cause is not None


class Broker:
    """Connect providers, hand out fresh access tokens, disconnect."""

    def __init__(
        self,
        engine: FlowEngine,
        *,
        catalog: Catalog,
        credentials: CredentialStore,
        tokens: TokenStore,
        vault: Vault | None = None,
        http: httpx.AsyncClient | None = None,
        leeway: float = schedule.USE_MARGIN_CAP,
        policy: schedule.TimerPolicy | None = None,
        discovered: DiscoveredStore | None = None,
        url_policy: UrlPolicy = STRICT,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.credentials = credentials
        self.tokens = tokens
        #: the source of truth; default: ``vault/`` next to the ledger (the state dir)
        self.vault = vault or Vault(engine.ledger.path.parent / "vault")
        #: the on-use refresh margin is min(leeway, a quarter of the token's lifetime)
        self.leeway = leeway
        #: the timer's policy: a connection stored or refreshed here is scheduled by it
        self.policy = policy or schedule.TimerPolicy()
        self._http = http
        self._own_http = False
        self._locks: dict[str, anyio.Lock] = {}
        self._dirty: set[str] = set()
        self._publish_lock = anyio.Lock()
        self._stranded: dict[str, _Stranded] = {}
        #: how long the audit keeps hand-out records (set by the composition root)
        self.retention = Retention()
        #: providers found by discovery; default: ``discovered.json`` in the state dir
        self.discovered = discovered or DiscoveredStore(
            engine.ledger.path.parent / "discovered.json"
        )
        #: HTTPS only (discovery.STRICT); only the test suite passes a looser policy
        self.url_policy = url_policy
        #: provider -> monotonic time its discovered metadata was last validated here
        self._validated: dict[str, float] = {}
        #: ... and last looked at again after a failed refresh
        self._looked_after_failure: dict[str, float] = {}
        self._discovered_signature: list[int] | None = None
        self._sync_discovered()

    # ------------------------------------------------------------------ plumbing

    async def aclose(self) -> None:
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None
            self._own_http = False

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            from .oauth_http import DEFAULT_TIMEOUT

            self._http = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
            self._own_http = True
        return self._http

    def _lock(self, provider: str) -> anyio.Lock:
        lock = self._locks.get(provider)
        if lock is None:
            lock = self._locks[provider] = anyio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _held(self, provider: str) -> AsyncIterator[ProviderVault]:
        """The provider's single-flight: this process's lock, then the vault's flock."""
        async with self._lock(provider):
            pv = self.vault.provider(provider)
            with releasing(pv.lock_fd()) as fd:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    # another process is refreshing this provider: wait for it
                    await anyio.to_thread.run_sync(
                        fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=False
                    )
                yield pv

    def _creds(self, spec: ProviderSpec) -> ClientCredentials:
        creds = self.credentials.get(spec.id)
        if creds is None or (spec.needs_secret and not creds.client_secret):
            raise CredentialsMissingError(provider=spec.id, needs_secret=spec.needs_secret)
        return creds

    def spec(self, provider: str) -> ProviderSpec:
        """The provider's catalog entry, a provider another process discovered included."""
        return self._spec(provider)

    def _spec(self, provider: str) -> ProviderSpec:
        """The catalog's entry; a provider another process discovered is loaded first."""
        try:
            return self.catalog.get(provider)
        except UnknownProviderError:
            if not self._sync_discovered():
                raise
            return self.catalog.get(provider)

    def _sync_discovered(self) -> bool:
        """Load discovered providers into the catalog when the file changed; True if so."""
        from .tokens import signature_of

        signature = signature_of(self.discovered.path)
        if signature is None or signature == self._discovered_signature:
            return False
        try:
            specs = self.discovered.specs()
        except ConfigError as err:
            log.warning("discovered providers not loaded: %s", err.message)
            return False
        for spec in specs.values():
            self.catalog.register(spec)
        self._discovered_signature = signature
        return True

    def is_discovered(self, provider: str) -> bool:
        """Was ``provider`` made by discovery (``connect <url>``)?"""
        return self.discovered.entry(provider) is not None

    @property
    def clock(self) -> Clock:
        """The one clock of the engine, the ledger and the timer."""
        return self.engine.clock

    def _now(self) -> float:
        return self.engine.clock.now()

    def _fresh(self, tokens: TokenSet, min_valid: float | None) -> bool:
        times = _times(tokens)
        margin = (
            schedule.use_margin(times, self.leeway) if min_valid is None else max(min_valid, 0.0)
        )
        return schedule.valid_for(times, self._now(), margin)

    def _next_check_ms(self, tokens: TokenSet) -> int:
        """When the timer should look at a connection with these tokens (no jitter)."""
        return to_ms(schedule.next_check(self.policy, _times(tokens), self._now(), 0.0))

    def _usable(self, tokens: TokenSet | None) -> bool:
        return tokens is not None and schedule.valid_for(_times(tokens), self._now(), 0.0)

    async def _write(self, pv: ProviderVault, tokens: TokenSet | None, **kw: Any) -> Record:
        kw.setdefault("now_ms", self.engine.now_ms())
        record = await anyio.to_thread.run_sync(partial(pv.write, tokens, **kw))
        self._dirty.add(pv.provider)  # auth.json catches up on the next publish
        return record

    # ------------------------------------------------------------------- connect

    async def begin(
        self,
        provider: str,
        *,
        redirect_uri: str,
        actor: str,
        chat_id: int | None = None,
        scopes: list[str] | tuple[str, ...] | None = None,
        exchange: str = "daemon",
    ) -> ConnectStart:
        """Start a flow and build the authorize link (RFC 6749 §4.1.1, PKCE S256).

        ``exchange="client"``: the caller takes the code from /oauth/pending and calls
        :meth:`complete` itself; by default the daemon that receives the callback does.
        A discovered provider's metadata is validated again first (``revalidate``).
        """
        spec = self._spec(provider)
        if self.is_discovered(provider):
            spec = (await self.revalidate(provider, redirect_uri=redirect_uri, actor=actor)).spec
        creds = self._creds(spec)
        wanted = tuple(scopes) if scopes is not None else spec.scopes
        started = await self.engine.start(
            provider,
            redirect_uri=redirect_uri,
            scopes=wanted,
            use_pkce=spec.use_pkce,
            actor=actor,
            chat_id=chat_id,
            exchange=exchange,
        )
        try:
            url = build_authorize_url(
                spec.authorize_url,
                client_id=creds.client_id,
                redirect_uri=redirect_uri,
                state=started.state,
                scopes=wanted,
                scope_separator=spec.scope_separator,
                code_verifier=started.code_verifier,
                extra_params=_authorize_params(spec),
            )
        except ValueError as err:
            await self.engine.cancel(started.flow.id, actor=actor)
            raise ConfigError(str(err), key=f"providers.{provider}") from err
        flow = await self.engine.issue_url(started.flow.id, actor=actor)
        return ConnectStart(flow=flow, spec=spec, state=started.state, authorize_url=url)

    async def complete(self, flow_id: str, code: str, *, actor: str) -> TokenSet:
        """Exchange the code; the tokens go to the vault first, then the ledger, auth.json."""
        from .oauth_http import exchange_code

        flow = await self.engine.get_flow(flow_id)
        spec = self._spec(flow.provider)
        verifier = await self.engine.code_verifier(flow_id) if flow.uses_pkce else None
        try:
            creds = self._creds(spec)
        except CredentialsMissingError as err:
            await self._exchange_failed(flow_id, actor, err)
            raise
        async with self._held(spec.id) as pv:
            current = pv.read()
            try:
                await anyio.to_thread.run_sync(pv.reserve, current)
            except StorageError as err:
                await self._exchange_failed(flow_id, actor, err)
                raise
            now = self.engine.now_ms()
            intent = Intent("exchange", now, None, flow_id)
            basis = current or Record(spec.id, 0, None)
            capture = pv.capture(basis, op="exchange", intent=intent, now_ms=now)
            try:
                tokens = await exchange_code(
                    spec,
                    creds,
                    code=code,
                    redirect_uri=flow.redirect_uri,
                    code_verifier=verifier,
                    client=self._client(),
                    now_ms=now,
                    requested_scopes=flow.scopes,
                    capture=capture,
                )
            except (ProviderError, CredentialsMissingError) as err:
                capture.close()
                await self._exchange_failed(flow_id, actor, err)
                raise
            except BaseException:
                capture.close()
                raise
            checkpoint("exchange.answer")
            tokens = replace(tokens, extra={**tokens.extra, "flow_id": flow_id})
            try:
                await self._finish_exchange(
                    spec, pv, current, tokens, flow_id, actor=actor, capture=capture
                )
            finally:
                capture.close()
        await self.publish()
        log.info("%s connected (flow %s)", spec.id, flow_id)
        return tokens

    async def _exchange_failed(self, flow_id: str, actor: str, err: BrokerError) -> None:
        await self.engine.record_exchange_failed(
            flow_id,
            actor=actor,
            error_code=getattr(err, "oauth_error", None) or err.code,
            description=err.message,
        )

    async def _finish_exchange(
        self,
        spec: ProviderSpec,
        pv: ProviderVault,
        current: Record | None,
        tokens: TokenSet,
        flow_id: str,
        *,
        actor: str,
        capture: Any = None,
    ) -> None:
        """The exchange answered: vault (durable), then the ledger: exchanged, stored."""
        stored = await self._store_pair(
            pv,
            tokens,
            flow_id=flow_id,
            lineage=_lineage(current, current.tokens if current else None),
        )
        if stored is None and capture is not None:
            await self._sync_capture(capture)  # the captured answer is the durable copy
        if stored is None and not await self._emergency_publish(spec.id):
            err = StorageError(f"cannot store the tokens of {spec.name}: the disk refused them")
            await self.engine.record_exchange(flow_id, actor=actor)
            await self.engine.record_store_failed(flow_id, actor=actor, description=err.message)
            raise err
        detail: dict[str, Any] = {"has_refresh": tokens.refresh is not None}
        detail["expires_at"] = tokens.expires
        if tokens.refresh:
            detail["refresh_sha"] = token_hash(tokens.refresh)
        await self.engine.record_exchange(flow_id, actor=actor, detail=detail)
        self._dirty.add(spec.id)
        # an older connection a dead process left in "refreshing" (we hold the lock)
        # is settled first, so that this one supersedes it
        for older in await self.engine.list_flows(
            provider=spec.id, states=[FlowState.REFRESHING], limit=100
        ):
            await self._settle_refreshing(older, current, actor=actor)
        await self.engine.record_stored(
            flow_id,
            actor=actor,
            token_expires_at=tokens.expires,
            next_check_at=self._next_check_ms(tokens),
        )

    async def complete_state(self, state: str, *, actor: str) -> TokenSet:
        """Take the code that arrived for ``state`` (once) and complete its flow."""
        pending = await self.engine.take_code(state, actor=actor)
        return await self.complete(pending.flow_id, pending.code, actor=actor)

    # ------------------------------------------------------------ connect anything

    async def provider_for(
        self,
        target: str,
        *,
        redirect_uri: str | None,
        actor: str,
        device: bool = False,
    ) -> str:
        """The provider id for what the owner typed: a catalog id as it is, a URL adopted
        (discovered, registered and persisted, see :meth:`adopt`)."""
        if "://" not in target:
            return self._spec(target).id
        return (
            await self.adopt(target, redirect_uri=redirect_uri, actor=actor, device=device)
        ).spec.id

    async def adopt(
        self,
        url: str,
        *,
        redirect_uri: str | None,
        actor: str,
        device: bool = False,
    ) -> Adopted:
        """Make ``url`` (a protected resource or an issuer) a provider of the catalog.

        Discovery (discovery.py), then a client: a stored registration that fits is reused,
        else one is registered (RFC 7591) when the server has a registration endpoint, else
        credentials stored by hand are used (CredentialsMissingError names the id to store
        them under). The entry is persisted in ``discovered.json`` and shows in
        ``providers`` and ``status`` like a built-in one. ``redirect_uri``: the callback to
        register (None: a client for the device grant only).
        """
        from .discovery import discover, provider_id_for

        found = await discover(url, client=self._client(), policy=self.url_policy)
        pid = self.discovered.find(found.source)
        if pid is None and found.resource is not None:
            pid = self.discovered.find(found.resource)
        if pid is None:

            def taken(candidate: str) -> str | None:
                if self.discovered.entry(candidate) is not None:
                    return self.discovered.source_of(candidate)
                return "" if candidate in self.catalog else None

            pid = provider_id_for(found, taken)
        return await self._settle_discovery(
            pid, found, redirect_uri=redirect_uri, actor=actor, device=device
        )

    async def revalidate(
        self,
        provider: str,
        *,
        redirect_uri: str | None,
        actor: str,
        device: bool = False,
        max_age: float = 60.0,
    ) -> Adopted:
        """Fetch a discovered provider's metadata again and update its entry if it changed.

        Called by every connect of a discovered provider (at most once per ``max_age``
        seconds in one process). A metadata document that no longer validates stops the
        connect (DiscoveryError); a server that cannot be reached does not: the stored
        entry is used and a warning logged. A registration that no longer fits (another
        issuer, a new redirect URI, an expired secret) is replaced.
        """
        from .discovery import discover

        entry = self.discovered.entry(provider)
        spec = self._spec(provider)
        info = entry.get("discovery") if entry else None
        source = info.get("source") if isinstance(info, dict) else None
        if not isinstance(source, str):
            return Adopted(spec=spec, discovery=_stored_discovery(spec), registration=None)
        recent = self._validated.get(provider)
        registration = self._registration(provider)
        if (
            recent is not None
            and time.monotonic() - recent < max_age
            and registration is not None
            and registration.fits(
                issuer=spec.issuer or "", redirect_uri=redirect_uri, device=device, now=self._now()
            )
        ):
            return Adopted(spec=spec, discovery=_stored_discovery(spec), registration=registration)
        try:
            found = await discover(source, client=self._client(), policy=self.url_policy)
        except ProviderTransientError as err:
            log.warning(
                "%s: its metadata could not be fetched again (%s); using the stored entry",
                provider,
                err.code,
            )
            return Adopted(spec=spec, discovery=_stored_discovery(spec), registration=registration)
        return await self._settle_discovery(
            provider, found, redirect_uri=redirect_uri, actor=actor, device=device
        )

    async def _revalidate_after_failure(self, provider: str, *, actor: str) -> bool:
        """After a refresh failed for another reason than the network: did the server's
        metadata change (same issuer)? Then the entry is updated and True returned. At
        most once per 10 minutes per provider."""
        from .discovery import discover

        last = self._looked_after_failure.get(provider)
        if last is not None and time.monotonic() - last < 600:
            return False
        self._looked_after_failure[provider] = time.monotonic()
        entry = self.discovered.entry(provider)
        info = entry.get("discovery") if entry else None
        source = info.get("source") if isinstance(info, dict) else None
        old = info.get("fingerprint") if isinstance(info, dict) else None
        if not isinstance(source, str):
            return False
        try:
            found = await discover(source, client=self._client(), policy=self.url_policy)
        except BrokerError as err:
            log.warning(
                "%s: metadata not validated again after a failed refresh (%s)", provider, err.code
            )
            return False
        if found.fingerprint() == old:
            return False
        spec = self._spec(provider)
        if (spec.issuer or "").rstrip("/") != found.issuer.rstrip("/"):
            log.warning("%s: its metadata now names another issuer; connect it again", provider)
            return False
        log.info("%s: its metadata changed; entry updated after a failed refresh", provider)
        await self._settle_discovery(provider, found, redirect_uri=None, actor=actor)
        return True

    def _registration(self, provider: str) -> Registration | None:
        data = self.credentials.registration(provider)
        if data is None:
            return None
        creds = self.credentials.get(provider)
        return Registration.from_json(data, client_secret=creds.client_secret if creds else None)

    async def _settle_discovery(
        self,
        pid: str,
        found: Discovery,
        *,
        redirect_uri: str | None,
        actor: str,
        device: bool = False,
    ) -> Adopted:
        """A client for ``found`` (reused or registered), then the entry persisted."""
        from .discovery import spec_for
        from .registration import auth_method_for, client_name, register, registration_request

        now = self._now()
        registration = self._registration(pid)
        registered = False
        if registration is not None and not registration.fits(
            issuer=found.issuer, redirect_uri=redirect_uri, device=device, now=now
        ):
            log.info("%s: the stored client registration does not fit; registering again", pid)
            registration = None
        if registration is None and found.registration_url:
            request = registration_request(
                metadata=found.metadata,
                redirect_uri=redirect_uri,
                name=client_name(),
                software_version=_version(),
            )
            registration = await register(
                found.registration_url,
                request,
                issuer=found.issuer,
                provider=pid,
                client=self._client(),
                now_ms=self.engine.now_ms(),
            )
            self.credentials.put(
                pid,
                ClientCredentials(registration.client_id, registration.client_secret),
                registration=registration.to_json(),
            )
            registered = True
        manual = None if registration is not None else self.credentials.get(pid)
        if registration is not None:
            method = registration.token_endpoint_auth_method
        elif manual is not None:
            method = "client_secret_basic" if manual.client_secret else "none"
            if pid in self.catalog:
                method = self.catalog.get(pid).token_auth_method
        else:
            # no registration endpoint: the entry is kept, the owner stores a client by hand
            method = auth_method_for(found.metadata)
        previous = self.discovered.entry(pid)
        old = previous.get("discovery", {}).get("fingerprint") if previous else None
        spec = spec_for(found, pid, token_auth_method=method)
        changed = (
            previous is None
            or old != found.fingerprint()
            or (previous.get("spec", {}).get("token_auth_method") != method)
        )
        if changed:
            await anyio.to_thread.run_sync(
                partial(self.discovered.put, spec, found, now_ms=self.engine.now_ms())
            )
            if previous is not None:
                log.info("%s: its discovered metadata changed; the entry was updated", pid)
        else:
            await anyio.to_thread.run_sync(
                partial(self.discovered.touch, pid, now_ms=self.engine.now_ms())
            )
        self.catalog.register(spec)
        self._validated[pid] = time.monotonic()
        if registration is None and manual is None:
            raise CredentialsMissingError(provider=pid, needs_secret=spec.needs_secret)
        return Adopted(
            spec=spec,
            discovery=found,
            registration=registration,
            registered=registered,
            changed=changed,
        )

    # -------------------------------------------------------------- device grant

    async def begin_device(
        self,
        provider: str,
        *,
        actor: str,
        chat_id: int | None = None,
        scopes: list[str] | tuple[str, ...] | None = None,
    ) -> DeviceStart:
        """Start a device authorization (RFC 8628 §3.1): a user code for the owner.

        ConfigError when the provider has no device endpoint (catalog field
        ``device_authorization_url`` or discovered ``device_authorization_endpoint``).
        """
        from .device import request_device_code

        spec = self._spec(provider)
        if self.is_discovered(provider):
            spec = (
                await self.revalidate(provider, redirect_uri=None, actor=actor, device=True)
            ).spec
        if not spec.device_authorization_url:
            raise NoDeviceEndpointError(provider=spec.id, name=spec.name)
        creds = self._creds(spec)
        wanted = tuple(scopes) if scopes is not None else spec.scopes
        started = await self.engine.start(
            provider, redirect_uri="", scopes=wanted, actor=actor, chat_id=chat_id, grant="device"
        )
        try:
            code = await request_device_code(spec, creds, scopes=wanted, client=self._client())
        except BaseException as err:
            with anyio.CancelScope(shield=True):
                await self.engine.cancel(
                    started.flow.id,
                    actor=actor,
                    reason=getattr(err, "oauth_error", None) or getattr(err, "code", "interrupted"),
                )
            raise
        flow = await self.engine.issue_device_code(
            started.flow.id,
            actor=actor,
            device_code=code.device_code,
            user_code=code.user_code,
            verification_uri=code.verification_uri,
            interval=code.interval,
            expires_in=code.expires_in,
        )
        log.info("%s: device authorization started (flow %s)", spec.id, flow.id)
        return DeviceStart(
            flow=flow,
            spec=spec,
            user_code=code.user_code,
            verification_uri=code.verification_uri,
            verification_uri_complete=code.verification_uri_complete,
            expires_at=flow.deadline or self.engine.now_ms(),
            interval=code.interval,
        )

    async def complete_device(
        self,
        flow_id: str,
        *,
        actor: str,
        on_poll: Callable[[str], Any] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
    ) -> DeviceOutcome:
        """Poll the token endpoint until the owner approved or refused or the code expired.

        Waits the flow's interval before every request (§3.4); ``slow_down`` adds 5 s for
        this and every later request and is recorded in the ledger (a restarted poller
        resumes at the longer interval); network trouble backs off exponentially (§3.5).
        The flow may be cancelled meanwhile from anywhere: the next look at the ledger
        ends the polling. ``on_poll(answer)`` is told each answer ("authorization_pending",
        "slow_down", "transient", ...); ``sleep`` waits between polls (tests record it).
        """
        flow = await self.engine.get_flow(flow_id)
        spec = self._spec(flow.provider)
        polls = slow_downs = failures = 0
        while True:
            flow = await self.engine.get_flow(flow_id)
            if flow.state is not FlowState.AWAITING_DEVICE:
                return await self._device_ended(flow, polls=polls, slow_downs=slow_downs)
            now = self.engine.now_ms()
            if flow.deadline is not None and now >= flow.deadline + DEVICE_GRACE_MS:
                # the provider never said expired_token (unreachable?): our own deadline
                with contextlib.suppress(InvalidTransition, ConcurrentUpdateError):
                    await self.engine.expire(flow_id, actor=actor, reason="ttl")
                continue
            interval = await self.engine.device_interval(flow_id)
            wait = float(interval if not failures else min(interval * 2**failures, 60))
            if flow.deadline is not None and flow.deadline > now:
                # one poll just after the code's end: the provider says how it ended
                wait = min(wait, (flow.deadline - now) / 1000 + 0.5)
            await sleep(wait)
            secrets_ = await self.engine.device_secrets(flow_id)
            if secrets_ is None:
                continue  # it ended meanwhile: the next look says how
            polls += 1
            answer = await self._poll_device(spec, flow, secrets_[0], actor=actor)
            if on_poll is not None:
                on_poll(answer if isinstance(answer, str) else "tokens")
            if answer == "transient":
                failures += 1
                continue
            failures = 0
            if answer == "slow_down":
                slow_downs += 1

    async def _poll_device(
        self, spec: ProviderSpec, flow: Flow, device_code: str, *, actor: str
    ) -> str:
        """One token request; the answer as a word. Tokens are stored before this returns."""
        from .device import Poll, PollAnswer, next_interval, poll_device_token

        creds = self._creds(spec)
        async with self._held(spec.id) as pv:
            current = pv.read()
            try:
                await anyio.to_thread.run_sync(pv.reserve, current)
            except StorageError as err:
                await self._exchange_failed(flow.id, actor, err)
                return "failed"
            now = self.engine.now_ms()
            intent = Intent("exchange", now, None, flow.id)
            capture = pv.capture(
                current or Record(spec.id, 0, None), op="exchange", intent=intent, now_ms=now
            )
            try:
                answer = await poll_device_token(
                    spec,
                    creds,
                    device_code=device_code,
                    client=self._client(),
                    now_ms=now,
                    requested_scopes=flow.scopes,
                    capture=capture,
                )
            except ProviderTransientError as err:
                capture.close()
                log.warning("%s: device token request failed (%s); polling on", spec.id, err.code)
                return "transient"
            except ProviderError as err:
                capture.close()
                with contextlib.suppress(InvalidTransition, ConcurrentUpdateError):
                    await self._exchange_failed(flow.id, actor, err)
                return "failed"
            except BaseException:
                capture.close()
                raise
            if isinstance(answer, PollAnswer):
                capture.close()
                try:
                    if answer.poll is Poll.SLOW_DOWN:
                        interval = next_interval(await self.engine.device_interval(flow.id), answer)
                        await self.engine.record_slow_down(flow.id, actor=actor, interval=interval)
                    elif answer.poll is Poll.DENIED:
                        await self.engine.record_denied(
                            flow.id,
                            actor=actor,
                            error=answer.poll.value,
                            description=answer.description,
                        )
                    elif answer.poll is Poll.EXPIRED:
                        await self.engine.expire(
                            flow.id,
                            actor=actor,
                            reason=answer.poll.value,
                            description=answer.description,
                        )
                except (InvalidTransition, ConcurrentUpdateError):
                    pass  # it was cancelled meanwhile: the next look says so
                return answer.poll.value
            checkpoint("exchange.answer")
            tokens = replace(answer, extra={**answer.extra, "flow_id": flow.id})
            try:
                await self._finish_exchange(
                    spec, pv, current, tokens, flow.id, actor=actor, capture=capture
                )
            finally:
                capture.close()
        await self.publish()
        log.info("%s connected with the device grant (flow %s)", spec.id, flow.id)
        return "tokens"

    async def _device_ended(self, flow: Flow, *, polls: int, slow_downs: int) -> DeviceOutcome:
        state = flow.state
        tokens = None
        if state in (FlowState.EXCHANGED, FlowState.STORED, FlowState.REFRESHING):
            rec = self.vault.read(flow.provider)
            tokens = rec.tokens if rec is not None and rec.flow_id == flow.id else None
            status = "connected"
        elif state is FlowState.FAILED and flow.error_code == "access_denied":
            status = "denied"
        elif state is FlowState.EXPIRED:
            status = "expired"
        elif state is FlowState.CANCELLED:
            status = "cancelled"
        else:
            status = "failed"
        return DeviceOutcome(
            status=status,
            flow=flow,
            tokens=tokens,
            error=flow.error_code,
            description=flow.error_description,
            polls=polls,
            slow_downs=slow_downs,
        )

    # ------------------------------------------------------------------- tokens

    async def get_token(
        self, provider: str, *, actor: str = "cli", min_valid: float | None = None
    ) -> str:
        """A valid access token, refreshed first when it has less than the margin left.

        The margin is ``min_valid`` seconds, by default min(60 s, a quarter of the
        token's lifetime). Raises NotConnectedError, ReauthorizationRequired,
        ProviderTransientError (only when the current token is no longer usable).
        """
        outcome = await self.renew(provider, actor=actor, min_valid=min_valid)
        if outcome.usable and outcome.tokens is not None:
            if outcome.outcome is Outcome.RETRY:
                log.warning(
                    "%s refresh failed (%s); the current token is still valid",
                    provider,
                    outcome.reason,
                )
            return outcome.tokens.access
        assert outcome.error is not None
        raise outcome.error

    async def refresh(self, provider: str, *, actor: str, force: bool = False) -> TokenSet:
        """Refresh now (``force``) or only if due; the new (or current) pair, or raise."""
        outcome = await self.renew(provider, actor=actor, force=force)
        if outcome.ok and outcome.tokens is not None:
            return outcome.tokens
        if outcome.outcome is Outcome.RETRY and not force and outcome.usable and outcome.tokens:
            return outcome.tokens
        assert outcome.error is not None
        raise outcome.error

    async def renew(
        self,
        provider: str,
        *,
        actor: str,
        min_valid: float | None = None,
        force: bool = False,
        seen: str | None = None,
        publish: bool = True,
    ) -> RefreshOutcome:
        """Refresh the provider's tokens if they need it; what happened, as a value.

        Needed: less than ``min_valid`` seconds left (default: the on-use margin), or
        ``force``. ``seen`` is the :attr:`TokenInfo.version` the caller decided on: if
        the tokens changed since, somebody else refreshed and no request is made (a
        forced refresh also skips the request when another caller refreshed after this
        one first looked). ``publish=False`` leaves auth.json to a later ``publish()``
        (the timer publishes once per sweep). Provider and storage trouble is an outcome,
        never an exception; unknown providers and missing credentials still raise.
        """
        spec = self._spec(provider)
        if provider in self._stranded:
            await self._restore_stranded(spec)
        rec = await self._current(provider)
        if rec is None or (rec.tokens is None and rec.settled):
            return self._not_connected(provider)
        if seen is None and rec.tokens is not None:
            seen = token_hash(rec.tokens.access, 16)
        stranded = self._stranded.get(provider)
        if stranded is not None and not force and self._fresh(stranded.tokens, min_valid):
            return self._outcome(Outcome.STILL_VALID, provider, stranded.tokens, stranded.flow_id)
        if rec.settled and rec.tokens is not None and not force and stranded is None:
            if self._fresh(rec.tokens, min_valid):
                if publish:
                    await self._check_published(provider, rec)
                return self._outcome(Outcome.STILL_VALID, provider, rec.tokens, rec.flow_id)
        async with self._held(provider) as pv:
            rec = pv.read()
            if rec is None:
                return self._not_connected(provider)
            if not rec.settled:
                outcome = await self._recover_locked(spec, pv, rec, actor=actor)
            elif rec.tokens is None:
                return self._not_connected(provider)
            elif token_hash(rec.tokens.access, 16) != seen and (
                force or self._fresh(rec.tokens, min_valid)
            ):
                # somebody else refreshed while we waited for the lock
                outcome = self._outcome(Outcome.STILL_VALID, provider, rec.tokens, rec.flow_id)
            elif not force and self._fresh(rec.tokens, min_valid):
                outcome = self._outcome(Outcome.STILL_VALID, provider, rec.tokens, rec.flow_id)
            else:
                outcome = await self._refresh_locked(spec, pv, rec, actor=actor)
        if publish:
            await self.publish()
        if (
            outcome.outcome is Outcome.RETRY
            and outcome.error is not None
            and not isinstance(outcome.error, ProviderTransientError | StorageError)
            and self.is_discovered(provider)
            and await self._revalidate_after_failure(provider, actor=actor)
        ):
            # the server's metadata changed (e.g. a moved token endpoint): once more
            return await self.renew(provider, actor=actor, force=True, publish=publish)
        return outcome

    # ---------------------------------------------------------- refresh internals

    def _outcome(
        self,
        kind: Outcome,
        provider: str,
        tokens: TokenSet | None,
        flow_id: str | None,
        **kw: Any,
    ) -> RefreshOutcome:
        if tokens is not None and flow_id and tokens.flow_id != flow_id:
            tokens = replace(tokens, extra={**tokens.extra, "flow_id": flow_id})
        return RefreshOutcome(
            outcome=kind,
            provider=provider,
            flow_id=flow_id,
            times=_times(tokens) if tokens is not None else None,
            usable=self._usable(tokens),
            tokens=tokens,
            **kw,
        )

    def _not_connected(self, provider: str) -> RefreshOutcome:
        return RefreshOutcome(
            Outcome.NOT_CONNECTED,
            provider,
            reason="not_connected",
            error=NotConnectedError(provider=provider),
        )

    async def _current(self, provider: str) -> Record | None:
        """The vault's record; an auth.json entry the vault never had is adopted first."""
        rec = self.vault.read(provider)
        if rec is not None and (rec.tokens is not None or not rec.settled):
            return rec
        try:
            entry = await anyio.to_thread.run_sync(self.tokens.read, provider)
        except StorageError:
            return rec
        if entry is None or (
            rec is not None and (rec.knows(entry.access) or rec.knows(entry.refresh))
        ):
            return rec
        async with self._held(provider) as pv:
            again = pv.read()
            if again is not None and not (again.settled and again.tokens is None):
                return again
            # first use after an upgrade, or a pair put into auth.json by hand or by
            # another tool after a disconnect: the vault takes it over
            adopted = await self._write(pv, entry, flow_id=entry.flow_id, lineage=_lineage(again))
            pv.set_published_seq(adopted.seq)
            log.info("%s: took over the tokens found in auth.json", provider)
            return adopted

    async def _connection_for(self, provider: str, rec: Record | None) -> Flow | None:
        flow_id = rec.flow_id if rec is not None else None
        if flow_id:
            try:
                flow = await self.engine.get_flow(flow_id)
            except FlowError:
                flow = None
            if flow is not None and flow.state in _CONNECTION_STATES:
                return flow
        return await self.engine.connection(provider)

    async def _refresh_locked(
        self,
        spec: ProviderSpec,
        pv: ProviderVault,
        rec: Record,
        *,
        actor: str,
        attempt: int = 1,
    ) -> RefreshOutcome:
        """One refresh request, the lock held and the vault settled (or being retried)."""
        from .oauth_http import refresh_tokens

        provider = spec.id
        old = rec.tokens
        assert old is not None
        flow = await self._connection_for(provider, rec)
        if flow is not None and flow.state is FlowState.REFRESHING:
            # we hold the provider's lock, so nobody is refreshing: a crash left it so
            flow = await self._settle_refreshing(flow, rec, actor=actor)
        if flow is not None and flow.state is FlowState.EXPIRED:
            error = ReauthorizationRequired(
                f"the {spec.name} connection expired ({flow.error_code})",
                provider=provider,
                oauth_error=flow.error_code,
            )
            return self._outcome(
                Outcome.REAUTHORIZE, provider, old, rec.flow_id, reason=flow.error_code, error=error
            )
        if old.refresh is None:
            if flow is not None and flow.state is FlowState.STORED:
                flow = await self.engine.expire(flow.id, actor=actor, reason="no_refresh_token")
                await self._notify_expired(flow, "no_refresh_token")
            error = ReauthorizationRequired(
                f"{spec.name} gave no refresh token",
                provider=provider,
                oauth_error="no_refresh_token",
            )
            return self._outcome(
                Outcome.REAUTHORIZE,
                provider,
                old,
                rec.flow_id,
                reason="no_refresh_token",
                error=error,
            )
        creds = self._creds(spec)
        now = self.engine.now_ms()
        try:
            # room for the answer before the request goes out: a full disk stops us here
            await anyio.to_thread.run_sync(pv.reserve, rec)
        except StorageError as err:
            return self._retry(provider, old, rec.flow_id, err, reason="storage_error")
        used = token_hash(old.refresh)
        if attempt == 1 and rec.doubt is not None and rec.doubt.refresh_sha == used:
            attempt = rec.doubt.attempt + 1  # an earlier answer for this token may be lost
        if flow is not None:
            try:
                flow = await self.engine.begin_refresh(
                    flow.id,
                    actor=actor,
                    expected_version=flow.version,
                    detail={"refresh_sha": used, "attempt": attempt},
                )
            except StorageError as err:
                return self._retry(provider, old, rec.flow_id, err, reason="storage_error")
        flow_id = flow.id if flow is not None else rec.flow_id
        intent = Intent("refresh", now, used, flow_id, attempt)
        try:
            rec = await self._write(
                pv, old, flow_id=rec.flow_id, lineage=rec.lineage, intent=intent, now_ms=now
            )
        except StorageError as err:
            await self._ledger_failed(flow, actor, "storage_error", err.message, now)
            return self._retry(provider, old, rec.flow_id, err, reason="storage_error")
        checkpoint("refresh.intent")
        capture = pv.capture(rec, op="refresh", intent=intent, now_ms=now)
        try:
            new = await refresh_tokens(
                spec,
                creds,
                refresh_token=old.refresh,
                client=self._client(),
                now_ms=now,
                previous=old,
                capture=capture,
            )
        except ReauthorizationRequired as err:
            capture.close()
            reason = "answer_lost" if attempt > 1 else (err.oauth_error or err.code)
            with contextlib.suppress(StorageError):
                await self._write(pv, old, flow_id=rec.flow_id, lineage=rec.lineage)
            if flow is not None:
                flow = await self.engine.record_refresh_failed(
                    flow.id,
                    actor=actor,
                    permanent=True,
                    error_code=reason,
                    description=err.message,
                )
                await self._notify_expired(flow, reason)
            text = f"{spec.name} refused the refresh ({err.oauth_error})"
            if reason == "answer_lost":
                text = (
                    f"{spec.name} refused the refresh token after the answer to an earlier"
                    " refresh was lost in transit"
                )
            error = ReauthorizationRequired(
                text,
                provider=provider,
                oauth_error=reason,
                description=err.description,
                provider_status=err.provider_status,
            )
            return self._outcome(
                Outcome.REAUTHORIZE, provider, old, rec.flow_id, reason=reason, error=error
            )
        except ProviderError as err:
            capture.close()
            # settled either way; when the request may have been delivered (its answer lost
            # on the way), the next refresh with this token is a retry: "doubt" says so
            doubt = intent if _request_may_have_arrived(err) else None
            with contextlib.suppress(StorageError):
                await self._write(pv, old, flow_id=rec.flow_id, lineage=rec.lineage, doubt=doubt)
            retry = getattr(err, "retry_after", None) or DEFAULT_RETRY_DELAY
            await self._ledger_failed(
                flow, actor, err.oauth_error or err.code, err.message, now + to_ms(retry)
            )
            return self._retry(provider, old, rec.flow_id, err, reason=err.oauth_error or err.code)
        except BaseException:
            capture.close()
            # cancelled (or crashed) with the request possibly delivered: the intent stays
            # in the vault, so whoever comes next retries the old refresh token
            with anyio.CancelScope(shield=True):
                await self._ledger_failed(flow, actor, "interrupted", None, None)
            raise
        # the answer is in the vault (page cache: no kill of this process can lose it);
        # the new pair's fdatasync below is what makes it survive a power loss too
        checkpoint("refresh.answer")
        try:
            return await self._finish_refresh(
                spec, pv, rec, new, flow, actor=actor, capture=capture
            )
        finally:
            capture.close()

    async def _finish_refresh(
        self,
        spec: ProviderSpec,
        pv: ProviderVault,
        rec: Record,
        new: TokenSet,
        flow: Flow | None,
        *,
        actor: str,
        reconciled: bool = False,
        capture: Any = None,
    ) -> RefreshOutcome:
        """A new pair arrived: vault (durable) first, then the ledger; auth.json later."""
        provider = spec.id
        old = rec.tokens
        flow_id = flow.id if flow is not None else rec.flow_id
        new = replace(
            new,
            extra={
                **(old.extra if old else {}),
                **new.extra,
                **({"flow_id": flow_id} if flow_id else {}),
            },
        )
        stored = await self._store_pair(
            pv, new, flow_id=flow_id, lineage=_lineage(rec, old), torn_at="refresh.vault_write"
        )
        if stored is None:
            if capture is not None:
                await self._sync_capture(capture)  # the captured answer is the durable copy
            await self._emergency_publish(provider)
        checkpoint("refresh.stored")
        self._dirty.add(provider)
        if flow is not None and flow.state is FlowState.REFRESHING:
            detail: dict[str, Any] = {
                "rotated": bool(old and new.refresh != old.refresh),
                "refresh_sha": token_hash(new.refresh) if new.refresh else None,
            }
            if reconciled:
                detail["reconciled"] = True
            try:
                await self.engine.record_refreshed(
                    flow.id,
                    actor=actor,
                    token_expires_at=new.expires,
                    next_check_at=self._next_check_ms(new),
                    detail=detail,
                )
            except BrokerError as err:
                # the pair is safe in the vault; the ledger catches up on the next look
                log.warning("%s: the ledger missed a refresh (%s)", provider, err.code)
        log.info("%s refreshed", provider)
        return self._outcome(Outcome.REFRESHED, provider, new, flow_id)

    def _retry(
        self,
        provider: str,
        tokens: TokenSet,
        flow_id: str | None,
        err: BrokerError,
        *,
        reason: str,
    ) -> RefreshOutcome:
        retry = getattr(err, "retry_after", None) or DEFAULT_RETRY_DELAY
        return self._outcome(
            Outcome.RETRY,
            provider,
            tokens,
            flow_id,
            retry_at=self._now() + retry,
            reason=reason,
            error=err,
        )

    async def _ledger_failed(
        self,
        flow: Flow | None,
        actor: str,
        code: str,
        description: str | None,
        next_check_at: int | None,
    ) -> None:
        if flow is None or flow.state is not FlowState.REFRESHING:
            return
        try:
            await self.engine.record_refresh_failed(
                flow.id,
                actor=actor,
                permanent=False,
                error_code=code,
                description=description,
                next_check_at=next_check_at,
            )
        except BrokerError as err:
            log.warning("%s: the ledger missed a failed refresh (%s)", flow.provider, err.code)

    async def _sync_capture(self, capture: Any) -> None:
        if capture.captured:
            try:
                await anyio.to_thread.run_sync(capture.sync)
            except StorageError as err:
                # still in the page cache: it survives this process, not a power loss
                log.warning("syncing a captured answer failed (%s)", err.code)

    async def _store_pair(
        self,
        pv: ProviderVault,
        tokens: TokenSet,
        *,
        flow_id: str | None,
        lineage: tuple[str, ...],
        torn_at: str | None = None,
    ) -> Record | None:
        """Write the new pair durably, retrying a failing disk; None: kept in memory."""
        last: StorageError | None = None
        for delay in _STORE_RETRIES:
            if delay:
                await anyio.sleep(delay)
            try:
                record = await self._write(
                    pv, tokens, flow_id=flow_id, lineage=lineage, torn_at=torn_at
                )
            except StorageError as err:
                last = err
                continue
            self._stranded.pop(pv.provider, None)
            return record
        log.error(
            "%s: the vault refused the new tokens (%s); they are kept in memory and"
            " published to auth.json until the vault takes them",
            pv.provider,
            last.code if last else "error",
        )
        self._stranded[pv.provider] = _Stranded(tokens, flow_id, lineage, self.engine.now_ms())
        return None

    async def _restore_stranded(self, spec: ProviderSpec) -> None:
        """Try again to put a pair the vault refused into the vault."""
        async with self._held(spec.id) as pv:
            stranded = self._stranded.get(spec.id)
            if stranded is None:
                return
            rec = pv.read()
            if rec is not None and rec.settled and rec.tokens is not None:
                if rec.tokens.obtained_at is not None and rec.tokens.obtained_at > stranded.at:
                    self._stranded.pop(spec.id, None)  # a newer pair made it meanwhile
                    return
            await self._store_pair(
                pv, stranded.tokens, flow_id=stranded.flow_id, lineage=stranded.lineage
            )
            self._dirty.add(spec.id)

    async def _emergency_publish(self, provider: str) -> bool:
        """The vault refused a new pair: auth.json is the only other durable place."""
        self._dirty.add(provider)
        try:
            await self.publish(strict=True)
        except BrokerError as err:
            log.error("%s: auth.json refused the new tokens too (%s)", provider, err.code)
            return False
        return True

    # ----------------------------------------------------------------- recovery

    async def _recover_locked(
        self, spec: ProviderSpec, pv: ProviderVault, rec: Record, *, actor: str
    ) -> RefreshOutcome:
        """Finish what an interrupted refresh (or exchange) left in the vault."""
        from .oauth_http import token_from_answer

        provider = spec.id
        if rec.answer is not None:
            answer = rec.answer
            op = answer.op
            requested: tuple[str, ...] = ()
            if op == "exchange" and rec.intent is not None and rec.intent.flow_id:
                with contextlib.suppress(FlowError):
                    requested = (await self.engine.get_flow(rec.intent.flow_id)).scopes
            try:
                new = token_from_answer(
                    spec,
                    status=answer.status,
                    content_type=answer.content_type,
                    body=answer.body,
                    now_ms=answer.at,
                    previous=rec.tokens if op == "refresh" else None,
                    requested_scopes=requested,
                    what="refresh" if op == "refresh" else "code exchange",
                )
            except ProviderError as err:
                # a 2xx that is no token answer: the request is spent, the answer useless
                log.warning("%s: a captured answer is unusable (%s)", provider, err.code)
                intent = rec.intent if op == "refresh" else None
                rec = await self._write(
                    pv, rec.tokens, flow_id=rec.flow_id, lineage=rec.lineage, intent=intent
                )
                if intent is None:
                    return self._outcome(Outcome.STILL_VALID, provider, rec.tokens, rec.flow_id)
            else:
                log.info("%s: finishing an interrupted %s from the vault", provider, op)
                if op == "exchange":
                    return await self._recover_exchange(spec, pv, rec, new, actor=actor)
                flow = await self._connection_for(provider, rec)
                return await self._finish_refresh(
                    spec, pv, rec, new, flow, actor=actor, reconciled=True
                )
        intent = rec.intent
        assert intent is not None
        if intent.op != "refresh" or rec.tokens is None:
            rec = await self._write(pv, rec.tokens, flow_id=rec.flow_id, lineage=rec.lineage)
            return self._outcome(Outcome.STILL_VALID, provider, rec.tokens, rec.flow_id)
        # the answer never reached the vault: did it reach auth.json (the vault refusing)?
        adopted = await self._answer_in_auth_json(provider, rec)
        if adopted is not None:
            flow = await self._connection_for(provider, rec)
            return await self._finish_refresh(
                spec, pv, rec, adopted, flow, actor=actor, reconciled=True
            )
        log.warning(
            "%s: a refresh was interrupted before its answer arrived; retrying the"
            " refresh token once",
            provider,
        )
        return await self._refresh_locked(spec, pv, rec, actor=actor, attempt=intent.attempt + 1)

    async def _answer_in_auth_json(self, provider: str, rec: Record) -> TokenSet | None:
        assert rec.intent is not None
        try:
            entry = await anyio.to_thread.run_sync(self.tokens.read, provider)
        except StorageError:
            return None
        if entry is None or rec.knows(entry.access) or rec.knows(entry.refresh):
            return None
        if entry.obtained_at is None or entry.obtained_at < rec.intent.at:
            return None
        return entry

    async def _recover_exchange(
        self, spec: ProviderSpec, pv: ProviderVault, rec: Record, new: TokenSet, *, actor: str
    ) -> RefreshOutcome:
        intent = rec.intent
        flow_id = intent.flow_id if intent else None
        new = replace(new, extra={**new.extra, **({"flow_id": flow_id} if flow_id else {})})
        flow = None
        if flow_id:
            with contextlib.suppress(FlowError):
                flow = await self.engine.get_flow(flow_id)
        if flow is not None and flow.state in (FlowState.CODE_RECEIVED, FlowState.AWAITING_DEVICE):
            await self._finish_exchange(spec, pv, rec, new, flow.id, actor=actor)
        else:
            await self._store_pair(pv, new, flow_id=flow_id, lineage=_lineage(rec, rec.tokens))
            self._dirty.add(spec.id)
            if flow is not None and flow.state is FlowState.EXCHANGED:
                await self.engine.record_stored(
                    flow.id,
                    actor=actor,
                    token_expires_at=new.expires,
                    next_check_at=self._next_check_ms(new),
                )
        return self._outcome(Outcome.REFRESHED, spec.id, new, flow_id)

    async def _settle_refreshing(self, flow: Flow, rec: Record | None, *, actor: str) -> Flow:
        """A flow left in ``refreshing`` (its process died): settle it by the vault."""
        tokens = rec.tokens if rec is not None and rec.settled else None
        refreshed = False
        if tokens is not None:
            used = await self._refresh_sha_used(flow)
            if used is not None and tokens.refresh:
                # the refresh token the dead process sent is no longer the vault's
                refreshed = token_hash(tokens.refresh) != used
            else:
                refreshed = tokens.obtained_at is not None and tokens.obtained_at > flow.updated_at
        if refreshed and tokens is not None:
            return await self.engine.record_refreshed(
                flow.id,
                actor=actor,
                token_expires_at=tokens.expires,
                detail={
                    "reconciled": True,
                    "refresh_sha": token_hash(tokens.refresh) if tokens.refresh else None,
                },
            )
        return await self.engine.record_refresh_failed(
            flow.id,
            actor=actor,
            permanent=False,
            error_code="interrupted",
            description="a refresh was interrupted; the stored refresh token is kept",
            next_check_at=self.engine.now_ms(),
            detail={"reconciled": True},
        )

    async def _refresh_sha_used(self, flow: Flow) -> str | None:
        """The hash of the refresh token the flow's last ``begin_refresh`` sent."""
        record = await self.engine.inspect(flow.id)
        for event in reversed(record.events):
            if event.trigger is FlowTrigger.BEGIN_REFRESH:
                used = event.detail.get("refresh_sha")
                return used if isinstance(used, str) else None
        return None

    async def settle(
        self, provider: str, *, actor: str = "timer", flow_id: str | None = None
    ) -> FlowState | None:
        """Finish what a dead process left for this provider (vault and ledger).

        Every flow of the provider still in ``refreshing`` is settled (we hold the lock,
        so none is in flight); one that is no longer the current connection is then
        superseded by it. Returns the state of ``flow_id`` afterwards.
        """
        spec = self._spec(provider)
        async with self._held(provider) as pv:
            rec = pv.read()
            if rec is not None and not rec.settled:
                await self._recover_locked(spec, pv, rec, actor=actor)
                rec = pv.read()
            current = await self._connection_for(provider, rec)
            stale = await self.engine.list_flows(
                provider=provider, states=[FlowState.REFRESHING], limit=100
            )
            for flow in stale:
                flow = await self._settle_refreshing(flow, rec, actor=actor)
                if current is not None and flow.id != current.id:
                    with contextlib.suppress(InvalidTransition, ConcurrentUpdateError):
                        await self.engine.supersede(flow.id, by=current.id, actor=actor)
        if flow_id is None:
            return None
        return (await self.engine.get_flow(flow_id)).state

    async def reconcile(self, *, actor: str = "timer") -> ReconcileReport:
        """At start-up: finish interrupted refreshes from the vault, settle the ledger,
        remove orphaned temp files and publish the vault to auth.json."""
        report = ReconcileReport()
        # 0. connections from before the vault existed: their pairs are in auth.json only
        managed = await self.engine.list_flows(
            states=[*_CONNECTION_STATES, FlowState.EXCHANGED], limit=1_000_000
        )
        for provider in sorted({f.provider for f in managed}):
            if provider in self.catalog and self.vault.read(provider) is None:
                await self._current(provider)
        # 1. the vault first: a captured exchange answer completes its flow before the
        #    ledger's TTL sweep could expire it
        for provider in await anyio.to_thread.run_sync(self.vault.providers):
            rec = self.vault.read(provider)
            if rec is None or rec.settled or provider not in self.catalog:
                continue
            outcome = await self.renew(provider, actor=actor, publish=False)
            log.info("%s: interrupted refresh settled: %s", provider, outcome.outcome.value)
            report.recovered.append(provider)
        # 2. the ledger: flows a crash left in refreshing or exchanged
        recovery = await self.engine.recover(actor=actor)
        report.expired = [f.id for f in recovery.expired]
        for stale in recovery.refreshing:
            async with self._held(stale.provider):
                flow = await self.engine.get_flow(stale.id)
                if flow.state is not FlowState.REFRESHING:
                    continue
                flow = await self._settle_refreshing(
                    flow, self.vault.read(flow.provider), actor=actor
                )
                done = flow.state is FlowState.STORED and flow.error_code is None
                (report.refreshed if done else report.refresh_failed).append(flow.id)
        for stale in recovery.exchanged:
            async with self._held(stale.provider):
                flow = await self.engine.get_flow(stale.id)
                if flow.state is not FlowState.EXCHANGED:
                    continue
                rec = self.vault.read(flow.provider)
                if rec is not None and rec.tokens is not None and rec.flow_id == flow.id:
                    await self.engine.record_stored(
                        flow.id,
                        actor=actor,
                        token_expires_at=rec.tokens.expires,
                        detail={"reconciled": True},
                    )
                    report.stored.append(flow.id)
                else:
                    await self.engine.record_store_failed(
                        flow.id,
                        actor=actor,
                        description="the tokens were not stored before a restart; connect again",
                    )
                    report.store_failed.append(flow.id)
        # 3. auth.json: temp files of killed writers, then the whole view checked
        try:
            report.orphans_removed = await anyio.to_thread.run_sync(self.tokens.remove_orphans)
        except StorageError as err:
            log.warning("cannot clean auth.json's directory (%s)", err.code)
        report.republished = await self.publish(full=True)
        return report

    # ----------------------------------------------------------------- publishing

    async def publish(self, *, full: bool = False, strict: bool = False) -> list[str]:
        """Publish unpublished vault records to auth.json, in one rewrite.

        When auth.json changed behind our back (its signature is not the one this
        program last wrote) or ``full``, every vault provider's entry is checked, and
        entries another writer rolled back are put back (one warning per provider).
        Returns the providers whose entry was rewritten. Failures are logged (the vault
        keeps the truth; the next publish tries again) unless ``strict``.

        A publish already under way in this process is waited for: whoever returns from
        here can rely on auth.json holding what the vault held when it was called.
        """
        if (
            not (self._dirty or self._stranded or full)
            and not self._publish_lock.locked()
            and self.tokens.signature() == self.vault.published_signature()
        ):
            return []  # nothing to publish and nobody else wrote auth.json
        async with self._publish_lock:
            if not (self._dirty or self._stranded or full) and (
                self.tokens.signature() == self.vault.published_signature()
            ):
                return []  # the publish we waited for did it
            # taken now: a provider refreshed while this publish runs is dirty again after
            dirty = set(self._dirty) | set(self._stranded)
            self._dirty.clear()
            try:
                changed = await anyio.to_thread.run_sync(self._publish_sync, dirty, full)
            except BrokerError as err:
                self._dirty |= dirty
                if strict:
                    raise
                log.warning("cannot publish to auth.json (%s); trying again later", err.code)
                return []
            return changed

    def _publish_sync(self, dirty: set[str], full: bool) -> list[str]:
        published: dict[str, int] = {}
        repaired: list[str] = []
        foreign = False

        def compute(data: dict[str, Any], signature: list[int] | None) -> dict[str, Any]:
            nonlocal foreign
            foreign = full or signature != self.vault.published_signature()
            providers = set(dirty)
            if foreign:
                providers |= set(self.vault.providers())
            updates: dict[str, Any] = {}
            for provider in sorted(providers):
                stranded = self._stranded.get(provider)
                if stranded is not None:
                    updates[provider] = (stranded.tokens, stranded.flow_id)
                    continue
                # re-read under the auth.json lock: never publish an older pair
                rec = self.vault.read(provider)
                if rec is None:
                    continue
                entry = data.get(provider)
                if rec.tokens is None and entry is not None:
                    access = entry.get("access") if isinstance(entry, dict) else None
                    if not rec.knows(access if isinstance(access, str) else None):
                        continue  # a pair from elsewhere after a disconnect: not ours
                if not entry_matches(entry, rec.tokens):
                    if provider not in dirty:
                        repaired.append(provider)
                        what = (
                            "was removed"
                            if entry is None
                            else "was rolled back"
                            if isinstance(entry, dict) and rec.knows(entry.get("refresh"))
                            else "was changed"
                        )
                        log.warning(
                            "auth.json entry for %s %s by another writer; re-published from"
                            " the vault",
                            provider,
                            what,
                        )
                    updates[provider] = None if rec.tokens is None else (rec.tokens, rec.flow_id)
                published[provider] = rec.seq
            return updates

        changed, signature, wrote = self.tokens.publish(
            compute, before_replace=lambda: checkpoint("publish.rename")
        )
        for provider, seq in published.items():
            pv = self.vault.provider(provider)
            if pv.published_seq() != seq:
                pv.set_published_seq(seq)
        if foreign or wrote:
            self.vault.set_published_signature(signature)
        return changed

    async def _check_published(self, provider: str, rec: Record) -> None:
        """On read: republish when auth.json is not known to hold this record."""
        pv = self.vault.provider(provider)
        if pv.published_seq() != rec.seq:
            self._dirty.add(provider)
        elif self.tokens.signature() == self.vault.published_signature():
            return
        await self.publish()  # another writer touched auth.json: every entry is checked

    # ------------------------------------------------------------ timer's questions

    async def peek(self, provider: str) -> TokenInfo | None:
        """The provider's token times from the vault (None: no tokens), no request."""
        stranded = self._stranded.get(provider)
        rec = await self._current(provider)
        tokens = stranded.tokens if stranded is not None else rec.tokens if rec else None
        if tokens is None:
            return None
        return TokenInfo(
            provider=provider,
            flow_id=stranded.flow_id if stranded else rec.flow_id if rec else None,
            times=_times(tokens),
            version=token_hash(tokens.access, 16),
            settled=stranded is None and rec is not None and rec.settled,
        )

    async def due_connections(self, now: float, *, limit: int = 500) -> list[Connection]:
        """Connections whose next timer check is due at ``now`` (epoch seconds)."""
        return [
            Connection(f.provider, f.id, f.state, f.chat_id)
            for f in await self.engine.due_checks(to_ms(now), limit=limit)
        ]

    async def stored_connections(self) -> list[Connection]:
        flows = await self.engine.list_flows(states=[FlowState.STORED], limit=1_000_000)
        return [Connection(f.provider, f.id, f.state, f.chat_id) for f in flows]

    async def schedule(self, flow_id: str, when: float | None) -> None:
        """The timer looks at this connection next at ``when`` (epoch seconds; None: never)."""
        await self.engine.set_next_check(flow_id, None if when is None else to_ms(when))

    async def next_check(self, flow_id: str) -> float | None:
        at = await self.engine.next_check_at(flow_id)
        return None if at is None else at / 1000

    async def expire_abandoned(self, *, actor: str = "timer") -> list[Flow]:
        """Expire authorization flows left waiting past their TTL."""
        return await self.engine.sweep_expired(actor=actor)

    async def expire_connection(self, flow_id: str, *, reason: str, actor: str = "timer") -> bool:
        """End a stored connection whose tokens are gone or dead (with a notification).

        Checked again under the provider's lock: a disconnect or a refresh that
        happened meanwhile wins. True when the connection was expired.
        """
        flow = await self.engine.get_flow(flow_id)
        async with self._held(flow.provider):
            flow = await self.engine.get_flow(flow_id)
            if flow.state is not FlowState.STORED:
                return False
            rec = self.vault.read(flow.provider)
            tokens = rec.tokens if rec is not None else None
            if reason == "tokens_missing" and tokens is not None:
                return False
            if (
                reason == "token_expired"
                and tokens is not None
                and (tokens.refresh or self._usable(tokens))
            ):
                return False
            try:
                flow = await self.engine.expire(flow.id, actor=actor, reason=reason)
            except (InvalidTransition, ConcurrentUpdateError):
                return False
        await self._notify_expired(flow, reason)
        return True

    async def warn_lifetime(
        self, connection: Connection, now: float
    ) -> tuple[str | None, float | None]:
        """Warn before a grant ends on its own (a catalog ``refresh_lifetime``, forecast.py).

        Queues the warning whose window ``now`` is in, once per window (the ledger
        remembers), and returns (the kind queued now or None, when the next warning
        window opens or None).
        """
        spec = (
            self.catalog.get(connection.provider) if connection.provider in self.catalog else None
        )
        lifetime = spec.refresh_lifetime if spec else None
        if spec is None or lifetime is None or lifetime.rule == "none" or lifetime.condition:
            return None, None
        flow = await self.engine.get_flow(connection.flow_id)
        authorized, refreshed = grant_times((await self.engine.inspect(flow.id)).events)
        deadline = grant_deadline(
            lifetime,
            authorized_at=(authorized or flow.created_at) / 1000,
            last_refresh=refreshed / 1000 if refreshed else None,
        )
        queued = None
        due = warning_due(deadline, now)
        if due is not None and not await self.engine.notified(
            flow.id, due.kind, since=to_ms(due.opens)
        ):
            await self.engine.notify(
                kind=due.kind,
                provider=flow.provider,
                flow_id=flow.id,
                chat_id=flow.chat_id,
                reason="grant_lifetime",
                data={"deadline": to_ms(due.deadline), "lifetime": lifetime.public()},
            )
            queued = due.kind
        return queued, next_warning_at(deadline, now)

    async def warn_failing(
        self, connection: Connection, *, attempts: int, reason: str | None
    ) -> None:
        """Tell the owner a connection's refresh keeps failing (once per streak)."""
        await self.engine.notify(
            kind="refresh_failing",
            provider=connection.provider,
            flow_id=connection.flow_id,
            chat_id=connection.chat_id,
            reason=reason,
            data={"attempts": attempts},
        )

    async def _notify_expired(self, flow: Flow, reason: str | None) -> None:
        await self.engine.notify(
            kind="expired",
            provider=flow.provider,
            flow_id=flow.id,
            chat_id=flow.chat_id,
            reason=reason,
        )

    # ----------------------------------------------------------- remote hand-outs

    async def hand_out(self, provider: str, caller: Caller) -> HandOut:
        """An access token for ``caller``, another machine: :meth:`renew` (the same
        single-flight refresh as every other caller), then, when a usable token is there,
        its audit row, and the owner's notification when this identity gets this provider
        for the first time, committed before the token is returned. Nothing is recorded
        when no token goes out. The policy (who may have what) is the caller's to check.
        """
        outcome = await self.renew(provider, actor="api")
        if not outcome.usable or outcome.tokens is None:
            return HandOut(outcome)
        record, first = await self.engine.ledger.record_handout(
            at=self.engine.now_ms(),
            who=caller.who,
            node=caller.node,
            provider=provider,
            token_sha=token_sha(outcome.tokens.access),
            address=caller.address,
            flow_id=outcome.flow_id,
            first_data=caller.public(),
            retention=self.retention,
        )
        if first:
            log.info("%s: first token hand-out to %s", provider, caller.describe())
        return HandOut(outcome, record, first)

    async def handouts(
        self, *, provider: str | None = None, who: str | None = None, limit: int = 50
    ) -> list[HandOutRecord]:
        """The audit of token hand-outs within retention, newest first; ``who`` matches an
        identity or one of a device's tags, whatever the case."""
        since = self.retention.cutoff_ms(self.engine.now_ms()) + 1
        return await self.engine.ledger.handouts(
            provider=provider, who=who, since=since, limit=limit
        )

    # --------------------------------------------------------------- disconnect

    async def disconnect(self, provider: str, *, actor: str) -> DisconnectResult:
        """Revoke at the provider where possible, forget the tokens, end the connection."""
        from .oauth_http import revoke

        spec = self._spec(provider)
        has_endpoint = bool(spec.revocation_url)
        rec = await self._current(provider)
        async with self._held(provider) as pv:
            rec = pv.read()
            current = self._stranded[provider].tokens if provider in self._stranded else None
            current = current or (rec.tokens if rec is not None else None)
            flow = await self._connection_for(provider, rec)
            if current is None and flow is None:
                raise NotConnectedError(provider=provider)
            revoked = False
            creds = self.credentials.get(provider)
            if current is not None and has_endpoint and creds is not None:
                token, hint = (
                    (current.refresh, "refresh_token")
                    if current.refresh
                    else (current.access, "access_token")
                )
                try:
                    revoked = await revoke(
                        spec, creds, token=token, token_type_hint=hint, client=self._client()
                    )
                except BrokerError as err:
                    log.warning(
                        "%s: revocation failed (%s); forgetting tokens anyway", provider, err.code
                    )
            if rec is not None or current is not None:
                await anyio.to_thread.run_sync(pv.reserve, rec)
                await self._write(
                    pv, None, flow_id=rec.flow_id if rec else None, lineage=_lineage(rec, current)
                )
            self._stranded.pop(provider, None)
            if flow is not None:
                if flow.state is FlowState.REFRESHING:
                    flow = await self.engine.record_refresh_failed(
                        flow.id, actor=actor, permanent=False, error_code="interrupted"
                    )
                await self.engine.revoke(flow.id, actor=actor, detail={"remote": revoked})
            self._dirty.add(provider)
        await self.publish(strict=True)
        return DisconnectResult(revoked_remotely=revoked, has_revocation_endpoint=has_endpoint)

    # ------------------------------------------------------------------- status

    async def status(self) -> list[ConnectionStatus]:
        """Every provider with a connection flow, or tokens in auth.json we know of."""
        out: dict[str, ConnectionStatus] = {}
        for flow in await self.engine.connections():
            record = await self.engine.inspect(flow.id)
            last_refresh = max(
                (e.at for e in record.events if e.trigger is FlowTrigger.REFRESHED), default=None
            )
            stranded = self._stranded.get(flow.provider)
            rec = self.vault.read(flow.provider)
            tokens = stranded.tokens if stranded else rec.tokens if rec is not None else None
            spec = self.catalog.get(flow.provider) if flow.provider in self.catalog else None
            name = spec.name if spec else flow.provider
            authorized, _ = grant_times(record.events)
            deadline = grant_deadline(
                spec.refresh_lifetime if spec else None,
                authorized_at=(authorized or flow.created_at) / 1000,
                last_refresh=last_refresh / 1000 if last_refresh else None,
            )
            scopes, source = _scopes(tokens, flow.scopes)
            out[flow.provider] = ConnectionStatus(
                provider=flow.provider,
                name=name,
                state=flow.state.value,
                expires=tokens.expires if tokens else flow.token_expires_at,
                last_refresh=last_refresh,
                scopes=scopes,
                flow_id=flow.id,
                has_refresh_token=bool(tokens and tokens.refresh),
                error_code=flow.error_code,
                reconnect_by=to_ms(deadline) if deadline is not None else None,
                scope_source=source,
            )
        try:
            raw = await anyio.to_thread.run_sync(self.tokens.read_all)
        except StorageError:
            raw = {}
        for provider in sorted(set(raw) | set(self.vault.providers())):
            if provider in out or provider not in self.catalog:
                continue
            rec = self.vault.read(provider)
            entry = raw.get(provider)
            tokens = (
                rec.tokens
                if rec is not None
                else (TokenSet.from_entry(entry) if isinstance(entry, dict) else None)
            )
            if tokens is None:
                continue
            out[provider] = ConnectionStatus(
                provider=provider,
                name=self.catalog.get(provider).name,
                state="external",
                expires=tokens.expires,
                last_refresh=None,
                scopes=tuple((tokens.scope or "").split()),
                flow_id=tokens.flow_id,
                has_refresh_token=tokens.refresh is not None,
                scope_source=_scopes(tokens, ())[1],
            )
        return [out[p] for p in sorted(out)]


def _scopes(tokens: TokenSet | None, requested: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """The scopes to show and whether the provider granted them or we only asked for them."""
    if tokens is not None and tokens.scope is not None:
        source = tokens.extra.get("scope_source")
        return tuple(tokens.scope.split()), "requested" if source == "requested" else "granted"
    return requested, "requested"
