"""The product's exception tree: every error agentd-oauth raises on purpose. [pure]

Every class derives from :class:`BrokerError` and carries data, not just text: each one
declares its keyword data as annotated class attributes (a default makes it optional) and
the base stores them, so no class writes its own ``__init__``. The message is a short
technical line (a log line, a page's detail); what the owner should do about an error is
worded at the edges, each of which maps errors by class in one table looked up along the
MRO: the API (api/errors.py), the CLI (agentd/errortable.py) and the bot (bot/texts.py).

Two HTTP statuses are never confused: ``provider_status`` is what a provider (or the
daemon, for a remote caller) answered us; the status *we* answer with is the API's table's
business and no error carries it. No message ever holds a secret (client secret, code,
verifier, state, token)::

    BrokerError
    ├── FlowError                      flow_id
    │   ├── FlowNotFound
    │   ├── InvalidTransition          state, trigger
    │   ├── ConcurrentUpdateError      expected, actual
    │   ├── StateMismatchError
    │   ├── CallbackParseError         reason (also a ValueError)
    │   ├── FlowExpiredError           state
    │   └── CodeAlreadyUsedError
    ├── ProviderError                  provider, oauth_error, description, provider_status
    │   ├── ProviderTransientError     retry_after
    │   │   └── ProviderTLSError       host, reason
    │   ├── ReauthorizationRequired    daemon
    │   ├── RegistrationError
    │   └── TokenRejectedError
    ├── ConfigError                    file, key, hint
    │   ├── UnknownProviderError       provider, suggestions
    │   ├── DiscoveryError             url, reason
    │   ├── NoDeviceEndpointError      provider, name
    │   └── DotUnavailableError
    ├── CredentialsMissingError        provider, needs_secret
    ├── NotConnectedError              provider, daemon
    ├── StorageError                   path
    │   └── TokenFileCorruptError
    ├── RequestError                   (a request the API refuses before the engine)
    │   ├── BadRequestError            parameter
    │   └── UnauthorizedError          (the guard's refusals are private ones)
    ├── AnswerError                    (an answer the API could not build)
    └── ServiceError                   (a local service the edges talk to)
        ├── TailscaleError             local_api_status, retry_after
        ├── TransportError             retry_after
        └── DaemonRefusedError         daemon_code
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

__all__ = [
    "AnswerError",
    "BadRequestError",
    "BrokerError",
    "CallbackParseError",
    "CodeAlreadyUsedError",
    "ConcurrentUpdateError",
    "ConfigError",
    "CredentialsMissingError",
    "DaemonRefusedError",
    "DiscoveryError",
    "DotUnavailableError",
    "FlowError",
    "FlowExpiredError",
    "FlowNotFound",
    "InvalidTransition",
    "NoDeviceEndpointError",
    "NotConnectedError",
    "ProviderError",
    "ProviderTLSError",
    "ProviderTransientError",
    "ReauthorizationRequired",
    "RegistrationError",
    "RequestError",
    "ServiceError",
    "StateMismatchError",
    "StorageError",
    "TailscaleError",
    "TokenFileCorruptError",
    "TokenRejectedError",
    "TransportError",
    "UnauthorizedError",
    "UnknownProviderError",
    "by_class",
]

_REQUIRED: Any = object()
_T = TypeVar("_T")


def by_class(table: Mapping[type[BaseException], _T], err: BaseException, default: _T) -> _T:
    """The row of ``table`` for ``err``'s class or its nearest listed ancestor (along the
    MRO), else ``default``: how each edge (API, CLI, bot) maps errors in one table."""
    for cls in type(err).__mro__:
        row = table.get(cls)
        if row is not None:
            return row
    return default


class BrokerError(Exception):
    """Root of every error agentd-oauth raises on purpose."""

    #: a short machine-readable code used by the API, the CLI and the bot
    code: ClassVar[str] = "broker_error"
    #: the message when none is given, formatted with the error's data
    template: ClassVar[str] = ""
    #: the keyword data this class and its parents declare: name -> default
    fields: ClassVar[dict[str, Any]] = {}

    message: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                if name == "message" or str(annotation).startswith("ClassVar"):
                    continue
                fields[name] = vars(klass).get(name, _REQUIRED)
        cls.fields = fields

    def __init__(self, message: str | None = None, **data: Any) -> None:
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no {', '.join(unknown)}")
        for name, default in self.fields.items():
            if name in data:
                value = data[name]
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name}")
            else:
                value = default
            setattr(self, name, value)
        self.message = self._compose(self._default_message() if message is None else message)
        super().__init__(self.message)

    def _default_message(self) -> str:
        """The message when none is given: ``template`` with the data, else the code."""
        return self.template.format(**self.data) if self.template else self.code

    def _compose(self, message: str) -> str:
        """The stored message (a subclass may add its data to it)."""
        return message

    @property
    def data(self) -> dict[str, Any]:
        """The declared keyword data, as given (or defaulted)."""
        return {name: getattr(self, name) for name in self.fields}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.data))


def _rebuild(cls: type[BrokerError], message: str, data: dict[str, Any]) -> BrokerError:
    error = cls.__new__(cls)
    BrokerError.__init__(error, message, **data)
    error.message = message
    error.args = (message,)
    return error


# --------------------------------------------------------------------------- flows


class FlowError(BrokerError):
    """Something is wrong with an authorization flow."""

    code = "flow_error"
    flow_id: str | None = None


class FlowNotFound(FlowError):
    """No flow matches the given id or OAuth state."""

    code = "flow_not_found"


class InvalidTransition(FlowError):
    """The trigger is not allowed from the flow's current state; nothing changed."""

    code = "invalid_transition"
    template = "cannot {trigger!r} a flow in state {state!r}"
    state: str
    trigger: str


class ConcurrentUpdateError(FlowError):
    """Another actor changed the flow first (version mismatch); nothing was written."""

    code = "concurrent_update"
    template = "flow {flow_id} changed concurrently (expected version {expected}, found {actual})"
    expected: int
    actual: int


class StateMismatchError(FlowError):
    """A callback's OAuth state parameter matches no flow waiting for it."""

    code = "state_mismatch"


class CallbackParseError(FlowError, ValueError):
    """The callback query is malformed; ``reason`` is safe to show (it holds no input).
    Also a ValueError: it is bad input to a parser."""

    code = "bad_callback"
    template = "{reason}"
    reason: str


class FlowExpiredError(FlowError):
    """The flow expired (or ended) before this step; ``state`` says how it ended."""

    code = "flow_expired"
    state: str = ""


class CodeAlreadyUsedError(FlowError):
    """The authorization code for this state was already handed out or recorded."""

    code = "code_already_used"


# ------------------------------------------------------------------------ providers


class ProviderError(BrokerError):
    """The OAuth provider answered with an error or could not be reached."""

    code = "provider_error"
    provider: str
    oauth_error: str | None = None
    description: str | None = None
    #: the HTTP status the provider answered (None: no answer)
    provider_status: int | None = None


class ProviderTransientError(ProviderError):
    """Network trouble, 5xx or 429 at the provider: retry later, tokens are kept."""

    code = "provider_unavailable"
    retry_after: float | None = None


class ProviderTLSError(ProviderTransientError):
    """TLS to the provider (or the daemon) failed: an untrusted certificate or a bad handshake."""

    code = "tls_error"
    host: str
    reason: str


class ReauthorizationRequired(ProviderError):
    """The grant is gone (invalid_grant, invalid_client ...): the owner must connect again.

    ``oauth_error`` is the reason as a code: the provider's error, or ours
    ("no_refresh_token", "answer_lost").
    """

    code = "reauthorization_required"
    template = "{provider} refused the grant ({oauth_error})"
    #: where the grant is gone, when not here (``agentd token --from``): connect it there
    daemon: str | None = None


class RegistrationError(ProviderError):
    """The authorization server refused to register us as a client (RFC 7591 §3.2.2)."""

    code = "registration_failed"


class TokenRejectedError(ProviderError):
    """An integration's API did not accept the access token (raised by its classifier)."""

    code = "token_rejected"
    template = "{oauth_error}"
    provider: str = ""
    oauth_error: str | None = "token rejected"


# --------------------------------------------------------------------------- config


class ConfigError(BrokerError):
    """A configuration or catalog file is invalid; says which file, key and why."""

    code = "config_error"
    file: str | None = None
    key: str | None = None
    hint: str | None = None

    def _compose(self, message: str) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        text = f"{where}: {message}" if where else message
        return f"{text} (hint: {self.hint})" if self.hint else text


class UnknownProviderError(ConfigError):
    """No provider with this id is in the catalog; ``suggestions`` are close ids."""

    code = "unknown_provider"
    template = "unknown provider {provider!r}"
    provider: str
    suggestions: tuple[str, ...] = ()

    def _compose(self, message: str) -> str:
        self.suggestions = tuple(self.suggestions)
        if self.suggestions and self.hint is None:
            self.hint = f"did you mean {', '.join(self.suggestions)}?"
        return super()._compose(message)


class DiscoveryError(ConfigError):
    """A URL does not lead to usable OAuth metadata (RFC 9728 / RFC 8414): not HTTPS, no
    metadata, an issuer or resource that does not match, a required field missing."""

    code = "discovery_failed"
    url: str
    #: a short code: not_https, no_metadata, issuer_mismatch, resource_mismatch, invalid
    reason: str


class NoDeviceEndpointError(ConfigError):
    """The provider has no device authorization endpoint: it connects with a link only."""

    code = "no_device_endpoint"
    template = "{name} has no device authorization endpoint"
    provider: str
    name: str

    def _compose(self, message: str) -> str:
        self.key = self.key or f"providers.{self.provider}.device_authorization_url"
        return super()._compose(message)


class DotUnavailableError(ConfigError):
    """Graphviz ``dot`` is not installed (Debian: apt-get install graphviz)."""

    code = "dot_unavailable"
    template = "Graphviz 'dot' is not installed (apt-get install graphviz)"


class CredentialsMissingError(BrokerError):
    """No client id (or secret) is stored for this provider yet."""

    code = "credentials_missing"
    template = "no client credentials stored for {provider!r}"
    provider: str
    needs_secret: bool = True


class NotConnectedError(BrokerError):
    """The provider has no stored tokens (on ``daemon``, for a remote caller)."""

    code = "not_connected"
    provider: str
    #: where the tokens were asked for, when not here (``agentd token --from``)
    daemon: str | None = None

    def _default_message(self) -> str:
        where = f" on {self.daemon}" if self.daemon else ""
        return f"{self.provider} is not connected{where}"


# -------------------------------------------------------------------------- storage


class StorageError(BrokerError):
    """The ledger or the token file could not be read or written."""

    code = "storage_error"
    path: str | None = None


class TokenFileCorruptError(StorageError):
    """auth.json is not a JSON object of entries; it was left untouched."""

    code = "token_file_corrupt"


# ---------------------------------------------------------------------------- edges


class RequestError(BrokerError):
    """A request the API refuses before it reaches the engine."""

    code = "api_error"


class BadRequestError(RequestError):
    """A query parameter is missing or malformed; ``parameter`` names it."""

    code = "bad_request"
    parameter: str | None = None


class UnauthorizedError(RequestError):
    """No or wrong bearer token."""

    code = "unauthorized"


class AnswerError(BrokerError):
    """The answer carrying a token could not be built (no detail: it might quote it)."""

    code = "internal_error"


class ServiceError(BrokerError):
    """A local service an edge relies on (tailscaled, the chat service, the daemon) failed."""

    code = "service_error"


class TailscaleError(ServiceError):
    """tailscaled could not be asked, or refused; its status and Retry-After when known."""

    code = "tailscale_error"
    #: the HTTP status tailscaled's LocalAPI answered
    local_api_status: int | None = None
    retry_after: float | None = None


class TransportError(ServiceError):
    """The chat service refused a request or could not be reached (after retries)."""

    code = "transport_error"
    retry_after: float | None = None


class DaemonRefusedError(ServiceError):
    """The daemon answered a local request with an error; ``daemon_code`` is its code."""

    code = "daemon_refused"
    daemon_code: str
