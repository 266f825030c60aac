"""The broker's exception tree. [pure]

Every error the engine raises derives from :class:`BrokerError` and carries data, not
just text. No error message ever contains a secret (client secret, code, verifier, token)::

    BrokerError
    ├── FlowError
    │   ├── FlowNotFound
    │   ├── InvalidTransition
    │   ├── ConcurrentUpdateError
    │   ├── StateMismatchError
    │   ├── FlowExpiredError
    │   └── CodeAlreadyUsedError
    ├── ProviderError
    │   ├── ProviderTransientError
    │   │   └── ProviderTLSError
    │   ├── ReauthorizationRequired
    │   └── RegistrationError
    ├── ConfigError
    │   ├── UnknownProviderError
    │   └── DiscoveryError
    ├── CredentialsMissingError
    ├── NotConnectedError
    └── StorageError
        └── TokenFileCorruptError
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "CodeAlreadyUsedError",
    "ConcurrentUpdateError",
    "ConfigError",
    "CredentialsMissingError",
    "DiscoveryError",
    "FlowError",
    "FlowExpiredError",
    "FlowNotFound",
    "InvalidTransition",
    "NotConnectedError",
    "ProviderError",
    "ProviderTLSError",
    "ProviderTransientError",
    "ReauthorizationRequired",
    "RegistrationError",
    "StateMismatchError",
    "StorageError",
    "TokenFileCorruptError",
    "UnknownProviderError",
]


class BrokerError(Exception):
    """Root of every error agentd-oauth raises on purpose."""

    #: a short machine-readable code used by the API and the CLI
    code: str = "broker_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- flows


class FlowError(BrokerError):
    """Something is wrong with an authorization flow."""

    code = "flow_error"

    def __init__(self, message: str, *, flow_id: str | None = None) -> None:
        super().__init__(message)
        self.flow_id = flow_id


class FlowNotFound(FlowError):
    """No flow matches the given id or OAuth state."""

    code = "flow_not_found"


class InvalidTransition(FlowError):
    """The trigger is not allowed from the flow's current state; nothing changed."""

    code = "invalid_transition"

    def __init__(self, *, flow_id: str | None, state: str, trigger: str) -> None:
        super().__init__(
            f"cannot {trigger!r} a flow in state {state!r}",
            flow_id=flow_id,
        )
        self.state = state
        self.trigger = trigger


class ConcurrentUpdateError(FlowError):
    """Another actor changed the flow first (version mismatch); nothing was written."""

    code = "concurrent_update"

    def __init__(self, *, flow_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"flow {flow_id} changed concurrently (expected version {expected}, found {actual})",
            flow_id=flow_id,
        )
        self.expected = expected
        self.actual = actual


class StateMismatchError(FlowError):
    """A callback's OAuth state parameter matches no flow waiting for it."""

    code = "state_mismatch"


class FlowExpiredError(FlowError):
    """The flow expired (or ended) before this step; start a new one."""

    code = "flow_expired"

    def __init__(self, message: str, *, flow_id: str | None = None, state: str = "") -> None:
        super().__init__(message, flow_id=flow_id)
        self.state = state


class CodeAlreadyUsedError(FlowError):
    """The authorization code for this state was already handed out or recorded."""

    code = "code_already_used"


# ------------------------------------------------------------------------ providers


class ProviderError(BrokerError):
    """The OAuth provider answered with an error or could not be reached."""

    code = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        oauth_error: str | None = None,
        description: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.oauth_error = oauth_error
        self.description = description
        self.http_status = http_status


class ProviderTransientError(ProviderError):
    """Network trouble, 5xx or 429 at the provider: retry later, tokens are kept."""

    code = "provider_unavailable"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        oauth_error: str | None = None,
        description: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message,
            provider=provider,
            oauth_error=oauth_error,
            description=description,
            http_status=http_status,
        )
        self.retry_after = retry_after


class ProviderTLSError(ProviderTransientError):
    """TLS to the provider (or the daemon) failed: an untrusted certificate or a bad handshake."""

    code = "tls_error"

    def __init__(self, message: str, *, provider: str, host: str, reason: str) -> None:
        super().__init__(message, provider=provider)
        self.host = host
        self.reason = reason


class ReauthorizationRequired(ProviderError):
    """The grant is gone (invalid_grant, invalid_client ...): the owner must connect again."""

    code = "reauthorization_required"


class RegistrationError(ProviderError):
    """The authorization server refused to register us as a client (RFC 7591 §3.2.2)."""

    code = "registration_failed"


# --------------------------------------------------------------------------- config


class ConfigError(BrokerError):
    """A configuration or catalog file is invalid; says which file, key and why."""

    code = "config_error"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = ": ".join(part for part in (file, key) if part)
        text = f"{where}: {message}" if where else message
        if hint:
            text = f"{text} (hint: {hint})"
        super().__init__(text)
        self.file = file
        self.key = key
        self.hint = hint


class UnknownProviderError(ConfigError):
    """No provider with this id is in the catalog."""

    code = "unknown_provider"

    def __init__(self, provider: str, *, suggestions: list[str] | None = None) -> None:
        self.provider = provider
        self.suggestions = list(suggestions or [])
        hint = f"did you mean {', '.join(self.suggestions)}?" if self.suggestions else None
        super().__init__(f"unknown provider {provider!r}", hint=hint)


class DiscoveryError(ConfigError):
    """A URL does not lead to usable OAuth metadata (RFC 9728 / RFC 8414): not HTTPS, no
    metadata, an issuer or resource that does not match, a required field missing."""

    code = "discovery_failed"

    def __init__(self, message: str, *, url: str, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url = url
        #: a short code: not_https, no_metadata, issuer_mismatch, resource_mismatch, invalid
        self.reason = reason


class CredentialsMissingError(BrokerError):
    """No client id (or secret) is stored for this provider yet."""

    code = "credentials_missing"

    def __init__(self, provider: str, *, needs_secret: bool = True) -> None:
        super().__init__(f"no client credentials stored for {provider!r}")
        self.provider = provider
        self.needs_secret = needs_secret


class NotConnectedError(BrokerError):
    """The provider has no stored tokens: connect it first."""

    code = "not_connected"

    def __init__(self, provider: str) -> None:
        super().__init__(f"{provider} is not connected; run: agentd connect {provider}")
        self.provider = provider


# -------------------------------------------------------------------------- storage


class StorageError(BrokerError):
    """The ledger or the token file could not be read or written."""

    code = "storage_error"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class TokenFileCorruptError(StorageError):
    """auth.json is not a JSON object of entries; it was left untouched."""

    code = "token_file_corrupt"
