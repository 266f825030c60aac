"""Broker: the facade the bot, the CLI, the API and the refresh timer use.

It ties the flow engine (ledger), the catalog, the client credentials, auth.json and the
token endpoint together:

* ``begin`` / ``complete`` / ``complete_state``: an authorization from the link to stored
  tokens, every step recorded in the ledger;
* ``get_token`` / ``refresh``: a valid access token, refreshed single-flight: in one
  process a per-provider ``anyio.Lock``, across processes the exclusive flock on
  ``auth.json.lock``; auth.json is re-read after the locks are taken, so N tasks and M
  processes asking at expiry cause exactly one token-endpoint request;
* write-ahead: the ledger says ``refreshing`` before the request goes out and ``stored``
  only after the new pair is in auth.json; ``reconcile`` repairs what a crash left;
* ``disconnect`` (RFC 7009 revocation where the provider has it) and ``status``.

The flock is held for the whole refresh (request included, bounded by the HTTP timeout),
which also serialises refreshes of different providers across processes; readers of
auth.json are never blocked (writes are atomic renames).

httpx and Authlib are imported only when a request is made, so importing this module
stays cheap; ``agentd token`` reads auth.json through TokenStore first anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio

from .catalog import Catalog, ProviderSpec
from .clock import to_ms
from .credentials import ClientCredentials, CredentialStore
from .engine import FlowEngine
from .errors import (
    BrokerError,
    ConfigError,
    CredentialsMissingError,
    FlowError,
    NotConnectedError,
    ProviderError,
    ReauthorizationRequired,
    StorageError,
)
from .forecast import grant_deadline, grant_times
from .models import Flow
from .protocol import build_authorize_url
from .states import FlowState, FlowTrigger
from .tokens import TokenSet, TokenStore

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "Broker",
    "ConnectStart",
    "ConnectionStatus",
    "DisconnectResult",
    "ReconcileReport",
    "reconnect_hint",
]

log = logging.getLogger("flowengine.broker")

#: when a transient refresh failure gives no Retry-After, look again after this long
DEFAULT_RETRY_DELAY = 60.0

_CONNECTION_STATES = (FlowState.STORED, FlowState.REFRESHING, FlowState.EXPIRED)


def reconnect_hint(spec: ProviderSpec) -> str:
    """What the owner must do after a permanent refresh failure."""
    return (
        f'{spec.name} needs to be connected again: say "connect {spec.id}" to the bot'
        f" or run: agentd connect {spec.id}"
    )


@dataclass(frozen=True, slots=True)
class ConnectStart:
    """What ``begin`` returns: the flow and the link the owner opens. Secrets hidden."""

    flow: Flow
    spec: ProviderSpec
    state: str = field(repr=False)
    authorize_url: str = field(repr=False)


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
        return {
            "provider": self.provider,
            "name": self.name,
            "state": self.state,
            "expires": self.expires,
            "last_refresh": self.last_refresh,
            "scopes": list(self.scopes),
            "flow_id": self.flow_id,
            "has_refresh_token": self.has_refresh_token,
            "error_code": self.error_code,
            "reconnect_by": self.reconnect_by,
            "scope_source": self.scope_source,
        }


@dataclass(slots=True)
class ReconcileReport:
    """What ``reconcile`` repaired at start-up (flow ids)."""

    refreshed: list[str] = field(default_factory=list)
    refresh_failed: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    store_failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


class Broker:
    """Connect providers, hand out fresh access tokens, disconnect."""

    def __init__(
        self,
        engine: FlowEngine,
        *,
        catalog: Catalog,
        credentials: CredentialStore,
        tokens: TokenStore,
        http: httpx.AsyncClient | None = None,
        leeway: float = 60.0,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.credentials = credentials
        self.tokens = tokens
        self.leeway = leeway
        self._http = http
        self._own_http = False
        self._locks: dict[str, anyio.Lock] = {}

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

    def _creds(self, spec: ProviderSpec) -> ClientCredentials:
        creds = self.credentials.get(spec.id)
        if creds is None or (spec.needs_secret and not creds.client_secret):
            raise CredentialsMissingError(spec.id, needs_secret=spec.needs_secret)
        return creds

    def _next_check(self, tokens: TokenSet, now: int) -> int | None:
        if tokens.expires is None:
            return None
        return max(now, tokens.expires - to_ms(2 * self.leeway))

    async def _write(self, provider: str, tokens: TokenSet, *, flow_id: str | None) -> None:
        """Write an entry; the caller holds ``self.tokens.locked()``."""
        await anyio.to_thread.run_sync(
            lambda: self.tokens.write_unlocked(provider, tokens, flow_id=flow_id)
        )

    # ------------------------------------------------------------------- connect

    async def begin(
        self,
        provider: str,
        *,
        redirect_uri: str,
        actor: str,
        chat_id: int | None = None,
        scopes: list[str] | tuple[str, ...] | None = None,
    ) -> ConnectStart:
        """Start a flow and build the authorize link (RFC 6749 §4.1.1, PKCE S256)."""
        spec = self.catalog.get(provider)
        creds = self._creds(spec)
        wanted = tuple(scopes) if scopes is not None else spec.scopes
        started = await self.engine.start(
            provider,
            redirect_uri=redirect_uri,
            scopes=wanted,
            use_pkce=spec.use_pkce,
            actor=actor,
            chat_id=chat_id,
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
                extra_params=spec.authorize_params,
            )
        except ValueError as err:
            await self.engine.cancel(started.flow.id, actor=actor)
            raise ConfigError(str(err), key=f"providers.{provider}") from err
        flow = await self.engine.issue_url(started.flow.id, actor=actor)
        return ConnectStart(flow=flow, spec=spec, state=started.state, authorize_url=url)

    async def complete(self, flow_id: str, code: str, *, actor: str) -> TokenSet:
        """Exchange the code, store the tokens in auth.json, record every step."""
        from .oauth_http import exchange_code

        flow = await self.engine.get_flow(flow_id)
        spec = self.catalog.get(flow.provider)
        verifier = await self.engine.code_verifier(flow_id) if flow.uses_pkce else None
        try:
            creds = self._creds(spec)
            tokens = await exchange_code(
                spec,
                creds,
                code=code,
                redirect_uri=flow.redirect_uri,
                code_verifier=verifier,
                client=self._client(),
                now_ms=self.engine.now_ms(),
                requested_scopes=flow.scopes,
            )
        except (ProviderError, CredentialsMissingError) as err:
            await self.engine.record_exchange_failed(
                flow_id,
                actor=actor,
                error_code=getattr(err, "oauth_error", None) or err.code,
                description=err.message,
            )
            raise
        # exchanged -> stored under the auth.json lock, so reconcile never sees it half-way
        async with self._lock(spec.id), self.tokens.locked():
            await self.engine.record_exchange(
                flow_id,
                actor=actor,
                detail={"has_refresh": tokens.refresh is not None, "expires_at": tokens.expires},
            )
            try:
                await self._write(spec.id, tokens, flow_id=flow_id)
            except StorageError as err:
                await self.engine.record_store_failed(flow_id, actor=actor, description=err.message)
                raise
            await self.engine.record_stored(
                flow_id,
                actor=actor,
                token_expires_at=tokens.expires,
                next_check_at=self._next_check(tokens, self.engine.now_ms()),
            )
        log.info("%s connected (flow %s)", spec.id, flow_id)
        return replace(tokens, extra={**tokens.extra, "flow_id": flow_id})

    async def complete_state(self, state: str, *, actor: str) -> TokenSet:
        """Take the code that arrived for ``state`` (once) and complete its flow."""
        pending = await self.engine.take_code(state, actor=actor)
        return await self.complete(pending.flow_id, pending.code, actor=actor)

    # ------------------------------------------------------------------- tokens

    def _read(self, provider: str) -> TokenSet | None:
        return self.tokens.read(provider)

    async def get_token(
        self, provider: str, *, actor: str = "cli", min_valid: float | None = None
    ) -> str:
        """A valid access token, refreshed first when it expires within the leeway."""
        spec = self.catalog.get(provider)
        leeway_ms = to_ms(self.leeway if min_valid is None else max(min_valid, 0.0))
        current = self._read(provider)
        if current is None:
            raise NotConnectedError(provider)
        if current.is_valid(self.engine.now_ms(), leeway_ms=leeway_ms):
            return current.access
        tokens = await self._refresh(spec, actor=actor, force=False, leeway_ms=leeway_ms)
        return tokens.access

    async def refresh(self, provider: str, *, actor: str, force: bool = False) -> TokenSet:
        """Refresh now (force) or only if due; single-flight like ``get_token``."""
        spec = self.catalog.get(provider)
        return await self._refresh(spec, actor=actor, force=force, leeway_ms=to_ms(self.leeway))

    async def _connection_for(self, provider: str, current: TokenSet) -> Flow | None:
        flow_id = current.flow_id
        if flow_id:
            try:
                flow = await self.engine.get_flow(flow_id)
            except FlowError:
                flow = None
            if flow is not None and flow.state in _CONNECTION_STATES:
                return flow
        return await self.engine.connection(provider)

    async def _refresh(
        self, spec: ProviderSpec, *, actor: str, force: bool, leeway_ms: int
    ) -> TokenSet:
        provider = spec.id
        seen = self._read(provider)
        if seen is None:
            raise NotConnectedError(provider)
        async with self._lock(provider):
            current = self._read(provider)
            if current is None:
                raise NotConnectedError(provider)
            if self._done_meanwhile(seen, current, force=force, leeway_ms=leeway_ms):
                return current
            async with self.tokens.locked():
                # another process may have refreshed while we waited for the flock
                current = self._read(provider)
                if current is None:
                    raise NotConnectedError(provider)
                if self._done_meanwhile(seen, current, force=force, leeway_ms=leeway_ms):
                    return current
                return await self._refresh_locked(spec, current, actor=actor, force=force)

    def _done_meanwhile(
        self, seen: TokenSet, current: TokenSet, *, force: bool, leeway_ms: int
    ) -> bool:
        if current.access != seen.access:
            return True  # somebody refreshed after we looked: use theirs
        return not force and current.is_valid(self.engine.now_ms(), leeway_ms=leeway_ms)

    async def _refresh_locked(
        self, spec: ProviderSpec, current: TokenSet, *, actor: str, force: bool
    ) -> TokenSet:
        from .oauth_http import refresh_tokens

        provider = spec.id
        flow = await self._connection_for(provider, current)
        if flow is not None and flow.state is FlowState.REFRESHING:
            # we hold the flock, so nobody is refreshing: a crash left it so
            flow = await self._reconcile_refreshing(flow, current, actor=actor)
        if flow is not None and flow.state is FlowState.EXPIRED:
            raise ReauthorizationRequired(
                reconnect_hint(spec), provider=provider, oauth_error=flow.error_code
            )
        if current.refresh is None:
            if flow is not None:
                flow = await self.engine.expire(flow.id, actor=actor, reason="no_refresh_token")
                await self._notify_expired(spec, flow)
            raise ReauthorizationRequired(
                f"{spec.name} gave no refresh token. {reconnect_hint(spec)}",
                provider=provider,
                oauth_error="no_refresh_token",
            )
        creds = self._creds(spec)
        if flow is not None:
            flow = await self.engine.begin_refresh(
                flow.id, actor=actor, expected_version=flow.version
            )
        now = self.engine.now_ms()
        try:
            new = await refresh_tokens(
                spec,
                creds,
                refresh_token=current.refresh,
                client=self._client(),
                now_ms=now,
                previous=current,
            )
        except ReauthorizationRequired as err:
            if flow is not None:
                flow = await self.engine.record_refresh_failed(
                    flow.id,
                    actor=actor,
                    permanent=True,
                    error_code=err.oauth_error or err.code,
                    description=err.message,
                )
                await self._notify_expired(spec, flow)
            raise ReauthorizationRequired(
                f"{spec.name} refused the refresh ({err.oauth_error}). {reconnect_hint(spec)}",
                provider=provider,
                oauth_error=err.oauth_error,
                description=err.description,
                http_status=err.http_status,
            ) from err
        except ProviderError as err:
            retry = getattr(err, "retry_after", None) or DEFAULT_RETRY_DELAY
            if flow is not None:
                await self.engine.record_refresh_failed(
                    flow.id,
                    actor=actor,
                    permanent=False,
                    error_code=err.oauth_error or err.code,
                    description=err.message,
                    next_check_at=now + to_ms(retry),
                )
            if not force and current.is_valid(self.engine.now_ms()):
                log.warning(
                    "%s refresh failed (%s); the current token is still valid", provider, err.code
                )
                return current
            raise
        except BaseException:
            # cancelled or crashed mid-request: leave the ledger consistent, keep the tokens
            if flow is not None:
                with anyio.CancelScope(shield=True):
                    await self.engine.record_refresh_failed(
                        flow.id, actor=actor, permanent=False, error_code="interrupted"
                    )
            raise
        try:
            await self._write(provider, new, flow_id=flow.id if flow else current.flow_id)
        except BrokerError as err:
            if flow is not None:
                await self.engine.record_refresh_failed(
                    flow.id,
                    actor=actor,
                    permanent=False,
                    error_code="store_failed",
                    description=err.message,
                )
            raise
        if flow is not None:
            await self.engine.record_refreshed(
                flow.id,
                actor=actor,
                token_expires_at=new.expires,
                next_check_at=self._next_check(new, self.engine.now_ms()),
                detail={"rotated": new.refresh != current.refresh},
            )
        log.info("%s refreshed", provider)
        return replace(new, extra={**current.extra, **({"flow_id": flow.id} if flow else {})})

    async def _notify_expired(self, spec: ProviderSpec, flow: Flow) -> None:
        await self.engine.notify(
            kind="expired",
            provider=spec.id,
            message=reconnect_hint(spec),
            flow_id=flow.id,
            chat_id=flow.chat_id,
        )

    # --------------------------------------------------------------- disconnect

    async def disconnect(self, provider: str, *, actor: str) -> DisconnectResult:
        """Revoke at the provider where possible, forget the tokens, end the connection."""
        from .oauth_http import revoke

        spec = self.catalog.get(provider)
        has_endpoint = bool(spec.revocation_url)
        async with self._lock(provider), self.tokens.locked():
            current = self._read(provider)
            flow = (
                await self._connection_for(provider, current)
                if current is not None
                else await self.engine.connection(provider)
            )
            if current is None and flow is None:
                raise NotConnectedError(provider)
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
            if current is not None:
                await anyio.to_thread.run_sync(self.tokens.delete_unlocked, provider)
            if flow is not None:
                if flow.state is FlowState.REFRESHING:
                    flow = await self.engine.record_refresh_failed(
                        flow.id, actor=actor, permanent=False, error_code="interrupted"
                    )
                await self.engine.revoke(flow.id, actor=actor, detail={"remote": revoked})
        return DisconnectResult(revoked_remotely=revoked, has_revocation_endpoint=has_endpoint)

    # ---------------------------------------------------------------- reconcile

    async def _reconcile_refreshing(
        self, flow: Flow, current: TokenSet | None, *, actor: str
    ) -> Flow:
        if (
            current is not None
            and current.obtained_at is not None
            and current.obtained_at >= flow.updated_at
            and current.flow_id in (None, flow.id)
        ):
            return await self.engine.record_refreshed(
                flow.id,
                actor=actor,
                token_expires_at=current.expires,
                next_check_at=self._next_check(current, self.engine.now_ms()),
                detail={"reconciled": True},
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

    async def reconcile(self, *, actor: str = "timer") -> ReconcileReport:
        """At start-up: settle flows a crash left in ``refreshing`` or ``exchanged``."""
        recovery = await self.engine.recover(actor=actor)
        report = ReconcileReport(expired=[f.id for f in recovery.expired])
        if not (recovery.refreshing or recovery.exchanged):
            return report
        async with self.tokens.locked():
            # whoever was mid-refresh or mid-store in another process has finished now
            for stale in recovery.refreshing:
                flow = await self.engine.get_flow(stale.id)
                if flow.state is not FlowState.REFRESHING:
                    continue
                flow = await self._reconcile_refreshing(
                    flow, self._read(flow.provider), actor=actor
                )
                last = flow.state is FlowState.STORED and flow.error_code is None
                (report.refreshed if last else report.refresh_failed).append(flow.id)
            for stale in recovery.exchanged:
                flow = await self.engine.get_flow(stale.id)
                if flow.state is not FlowState.EXCHANGED:
                    continue
                current = self._read(flow.provider)
                if current is not None and current.flow_id == flow.id:
                    await self.engine.record_stored(
                        flow.id,
                        actor=actor,
                        token_expires_at=current.expires,
                        next_check_at=self._next_check(current, self.engine.now_ms()),
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
        return report

    # ------------------------------------------------------------------- status

    async def status(self) -> list[ConnectionStatus]:
        """Every provider with a connection flow or an auth.json entry we know of."""
        raw = self.tokens.read_all()
        out: dict[str, ConnectionStatus] = {}
        for flow in await self.engine.connections():
            record = await self.engine.inspect(flow.id)
            last_refresh = max(
                (e.at for e in record.events if e.trigger is FlowTrigger.REFRESHED), default=None
            )
            entry = raw.get(flow.provider)
            tokens = TokenSet.from_entry(entry) if isinstance(entry, dict) else None
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
        for provider, entry in raw.items():
            if provider in out or provider not in self.catalog or not isinstance(entry, dict):
                continue
            tokens = TokenSet.from_entry(entry)
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
