"""Dynamic client registration (RFC 7591): the agent registers itself as an OAuth client.

When a discovered authorization server has a ``registration_endpoint`` and no client is
stored for it, :func:`register` asks for a **public client**: ``token_endpoint_auth_method``
``none`` (PKCE S256 protects the code), the daemon's callback as the only redirect URI,
``authorization_code`` and ``refresh_token`` (plus the device grant when the server has a
device endpoint), and a ``client_name`` saying which agent this is. When the server offers
no ``none`` method (``token_endpoint_auth_methods_supported``) a confidential client is
asked for instead (``client_secret_basic``, else ``client_secret_post``).

The server may change what we asked for; its answer is what counts (§3.2.1: it returns
every registered field): the client id, a secret if it issued one (with its expiry), the
auth method, the redirect URIs and grants it registered, and the RFC 7592 registration
access token and client configuration URI if it gave them. All of it is stored with the
client credentials (credentials.py, mode 0600); the secret and the registration access
token never reach a log line, an exception or a ``repr``.

A stored registration is reused while it fits (:meth:`Registration.fits`): same issuer,
secret not expired, our redirect URI and the grants needed registered.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ProviderError, ProviderTransientError, RegistrationError

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "CLIENT_NAME",
    "DEVICE_GRANT",
    "Registration",
    "client_name",
    "register",
    "registration_request",
]

log = logging.getLogger("flowengine.registration")

CLIENT_NAME = "agentd-oauth"
SOFTWARE_ID = "agentd-oauth"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_MAX_ANSWER = 64 * 1024


def client_name(host: str | None = None) -> str:
    """What the owner sees on the consent screen: this agent, on this machine."""
    where = host or socket.gethostname() or "this machine"
    return f"{CLIENT_NAME} (personal AI agent) on {where}"[:120]


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered client, as the authorization server answered. Secrets hidden in repr."""

    issuer: str
    client_id: str
    token_endpoint_auth_method: str
    redirect_uris: tuple[str, ...] = ()
    grant_types: tuple[str, ...] = ()
    client_secret: str | None = field(default=None, repr=False)
    #: epoch seconds; 0 or None: the secret does not expire
    client_secret_expires_at: int | None = None
    client_id_issued_at: int | None = None
    registration_access_token: str | None = field(default=None, repr=False)
    registration_client_uri: str | None = None
    #: epoch ms, ours
    registered_at: int = 0

    def fits(
        self,
        *,
        issuer: str,
        redirect_uri: str | None,
        device: bool = False,
        now: float,
    ) -> bool:
        """May this registration be used for a connect with these needs right now?"""
        if self.issuer.rstrip("/") != issuer.rstrip("/"):
            return False
        expires = self.client_secret_expires_at
        if self.client_secret and expires and expires <= now + 60:
            return False
        if redirect_uri is not None and redirect_uri not in self.redirect_uris:
            return False
        return not (device and self.grant_types and DEVICE_GRANT not in self.grant_types)

    def to_json(self) -> dict[str, Any]:
        """What credentials.py stores (the secrets included: the file is 0600)."""
        data: dict[str, Any] = {
            "issuer": self.issuer,
            "client_id": self.client_id,
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "redirect_uris": list(self.redirect_uris),
            "grant_types": list(self.grant_types),
            "client_secret_expires_at": self.client_secret_expires_at,
            "client_id_issued_at": self.client_id_issued_at,
            "registration_access_token": self.registration_access_token,
            "registration_client_uri": self.registration_client_uri,
            "registered_at": self.registered_at,
        }
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, client_secret: str | None) -> Registration:
        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key)
            return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

        def number(key: str) -> int | None:
            value = data.get(key)
            return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

        token = data.get("registration_access_token")
        uri = data.get("registration_client_uri")
        return cls(
            issuer=str(data.get("issuer", "")),
            client_id=str(data.get("client_id", "")),
            token_endpoint_auth_method=str(data.get("token_endpoint_auth_method", "none")),
            redirect_uris=strings("redirect_uris"),
            grant_types=strings("grant_types"),
            client_secret=client_secret,
            client_secret_expires_at=number("client_secret_expires_at"),
            client_id_issued_at=number("client_id_issued_at"),
            registration_access_token=token if isinstance(token, str) else None,
            registration_client_uri=uri if isinstance(uri, str) else None,
            registered_at=number("registered_at") or 0,
        )

    def public(self) -> dict[str, Any]:
        """For ``agentd providers``/``status``: no secret, no registration access token."""
        data = self.to_json()
        data.pop("registration_access_token", None)
        data["has_client_secret"] = bool(self.client_secret)
        return data


def auth_method_for(metadata: Mapping[str, Any]) -> str:
    """``none`` unless the server says it does not take public clients (RFC 8414 §2)."""
    offered = metadata.get("token_endpoint_auth_methods_supported")
    if not isinstance(offered, list) or "none" in offered:
        return "none"
    for method in ("client_secret_basic", "client_secret_post"):
        if method in offered:
            return method
    return "none"


def registration_request(
    *,
    metadata: Mapping[str, Any],
    redirect_uri: str | None,
    name: str,
    software_version: str = "",
) -> dict[str, Any]:
    """The client metadata we send (RFC 7591 §2)."""
    supported = metadata.get("grant_types_supported")
    offered = set(supported) if isinstance(supported, list) else None
    grants: list[str] = []
    if redirect_uri is not None:
        grants.append("authorization_code")
    if metadata.get("device_authorization_endpoint") and (
        offered is None or DEVICE_GRANT in offered
    ):
        grants.append(DEVICE_GRANT)
    if offered is None or "refresh_token" in offered:
        grants.append("refresh_token")
    body: dict[str, Any] = {
        "client_name": name,
        "token_endpoint_auth_method": auth_method_for(metadata),
        "grant_types": grants,
        "response_types": ["code"] if redirect_uri is not None else [],
        "redirect_uris": [redirect_uri] if redirect_uri is not None else [],
        "software_id": SOFTWARE_ID,
    }
    if software_version:
        body["software_version"] = software_version
    return body


async def register(
    endpoint: str,
    request: Mapping[str, Any],
    *,
    issuer: str,
    provider: str,
    client: httpx.AsyncClient,
    now_ms: int,
    timeout: float | None = None,
) -> Registration:
    """POST the client metadata (RFC 7591 §3.1) and check the answer (§3.2)."""
    import httpx

    from .oauth_http import DEFAULT_TIMEOUT, tls_error

    log.info("registering a client at %s for %s", endpoint, provider)
    try:
        response = await client.post(
            endpoint,
            json=dict(request),
            headers={"Accept": "application/json"},
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        )
    except httpx.TimeoutException as err:
        raise ProviderTransientError(
            f"{issuer} did not answer the client registration in time", provider=provider
        ) from err
    except httpx.TransportError as err:
        tls = tls_error(err, endpoint, provider=provider, during="client registration")
        if tls is not None:
            raise tls from err
        raise ProviderTransientError(
            f"cannot reach {issuer} to register a client: {type(err).__name__}",
            provider=provider,
        ) from err
    status = response.status_code
    if status == 429 or status >= 500:
        raise ProviderTransientError(
            f"{issuer} failed the client registration (HTTP {status}); try again later",
            provider=provider,
            provider_status=status,
        )
    try:
        data = json.loads(response.content[:_MAX_ANSWER]) if response.content else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if status >= 400 or not isinstance(data, dict):
        error = data.get("error") if isinstance(data, dict) else None
        description = data.get("error_description") if isinstance(data, dict) else None
        code = error[:64] if isinstance(error, str) else None
        raise RegistrationError(
            f"{issuer} refused to register this agent as a client"
            + (f": {code}" if code else "")
            + f" (HTTP {status})",
            provider=provider,
            oauth_error=code,
            description=description[:200] if isinstance(description, str) else None,
            provider_status=status,
        )
    client_id = data.get("client_id")
    if not isinstance(client_id, str) or not client_id or not client_id.isprintable():
        raise RegistrationError(
            f"{issuer} answered the client registration without a client_id",
            provider=provider,
            provider_status=status,
        )
    secret = data.get("client_secret")
    method = data.get("token_endpoint_auth_method")
    if not isinstance(method, str):
        method = str(request.get("token_endpoint_auth_method", "none"))
    if method not in ("none", "client_secret_basic", "client_secret_post"):
        raise RegistrationError(
            f"{issuer} registered the client for {method!r} authentication, which this"
            " agent cannot do",
            provider=provider,
            provider_status=status,
        )
    if method != "none" and not isinstance(secret, str):
        raise ProviderError(
            f"{issuer} registered a confidential client but sent no client_secret",
            provider=provider,
            provider_status=status,
        )
    registration = Registration.from_json(
        {
            **{k: v for k, v in data.items() if k != "client_secret"},
            "issuer": issuer,
            "token_endpoint_auth_method": method,
            "redirect_uris": data.get("redirect_uris", request.get("redirect_uris", [])),
            "grant_types": data.get("grant_types", request.get("grant_types", [])),
            "registered_at": now_ms,
        },
        client_secret=secret if isinstance(secret, str) and secret else None,
    )
    log.info(
        "registered client for %s at %s (%s)",
        provider,
        issuer,
        registration.token_endpoint_auth_method,
    )
    return registration
