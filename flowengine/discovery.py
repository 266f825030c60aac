"""Discovery: from a URL the owner types to an authorization server's endpoints.

``agentd connect <url>`` takes either a protected resource (an MCP server, an API) or an
authorization server's issuer. :func:`discover` finds out which, in the order the MCP
authorization specification gives:

1. **The resource's challenge.** The URL is requested without a token; a ``401`` whose
   ``WWW-Authenticate: Bearer`` challenge carries ``resource_metadata="…"`` names its
   protected resource metadata (RFC 9728 §5.1). Its ``scope`` parameter, if any, is what
   the resource wants (RFC 6750 §3).
2. **Protected resource metadata at the well-known URI** (RFC 9728 §3.1): the suffix
   ``/.well-known/oauth-protected-resource`` inserted between host and path, then at the
   host's root.
3. **Authorization server metadata** of the metadata's first ``authorization_servers``
   entry, or of the URL itself when it is no protected resource: RFC 8414 §3.1 with path
   insertion (``/.well-known/oauth-authorization-server/tenant``), then OpenID Connect
   discovery inserted (``/.well-known/openid-configuration/tenant``) and appended
   (``/tenant/.well-known/openid-configuration``); for an issuer without a path the two
   root documents.

What is accepted:

* every URL fetched, and every endpoint a document names, is ``https`` (a query is kept, a
  fragment or user info is refused). Plain ``http`` to a loopback address exists only for
  the test suite (:data:`LOOPBACK_HTTP_FOR_TESTS`); no configuration key, flag or
  environment variable turns it on.
* the authorization server metadata's ``issuer`` is the issuer the document was fetched
  for (RFC 8414 §3.3, OpenID Connect Discovery §4.3), compared as strings that may differ
  only by a trailing ``/``;
* the protected resource metadata's ``resource`` is the resource identifier it was
  fetched for (RFC 9728 §3.3): the URL the owner gave for a challenge or the path-specific
  document, its origin for the root document; compared after lower-casing scheme and host,
  dropping a default port and a trailing ``/``;
* ``authorization_endpoint`` and ``token_endpoint`` are present, and PKCE with S256 is
  possible: a server whose ``code_challenge_methods_supported`` omits S256 is refused, and
  so is a protected resource's server that does not list the field at all (the MCP
  specification requires clients to refuse it).

No redirect is followed (a 3xx counts as "no document here") and documents are read up to
256 KiB. Fetching is :func:`discover`'s only I/O; everything else here is pure and
table-tested. The result becomes a catalog entry (:func:`spec_for`) persisted by
:class:`DiscoveredStore` in the state directory (``discovered.json``) and merged into the
catalog (catalog.load_catalog).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .catalog import ProviderSpec, parse_discovered, spec_fields
from .errors import ConfigError, DiscoveryError, ProviderTransientError, StorageError
from .models import public_fields

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "LOOPBACK_HTTP_FOR_TESTS",
    "STRICT",
    "DiscoveredStore",
    "Discovery",
    "UrlPolicy",
    "authorization_server_metadata_urls",
    "canonical_resource",
    "check_url",
    "discover",
    "insert_well_known",
    "parse_www_authenticate",
    "protected_resource_metadata_urls",
    "provider_id_for",
    "spec_for",
]

log = logging.getLogger("flowengine.discovery")

OAUTH_AS = "oauth-authorization-server"
OPENID = "openid-configuration"
PROTECTED_RESOURCE = "oauth-protected-resource"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: a metadata document larger than this is refused
MAX_DOCUMENT = 256 * 1024
_LOOPBACK_NAMES = frozenset({"localhost"})


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """Which URLs discovery fetches and accepts: HTTPS only, unless a test says otherwise."""

    #: plain http to 127.0.0.1, ::1 or localhost (the test suite's servers)
    allow_loopback_http: bool = False


#: what the product uses: HTTPS only
STRICT = UrlPolicy()
#: the test suite's policy (its authorization servers run on loopback); never configurable
LOOPBACK_HTTP_FOR_TESTS = UrlPolicy(allow_loopback_http=True)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: Any, *, what: str, policy: UrlPolicy = STRICT) -> str:
    """``url`` if it is an absolute https URL (no fragment, no user info); else DiscoveryError."""
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise DiscoveryError(f"{what} is not a URL", url=str(url)[:200], reason="invalid")
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise DiscoveryError(
            f"{what} holds spaces or control characters", url=url[:200], reason="invalid"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise DiscoveryError(
            f"{what} is not a valid URL: {url}", url=url, reason="invalid"
        ) from None
    if not parts.netloc or not parts.hostname:
        raise DiscoveryError(f"{what} is not an absolute URL: {url}", url=url, reason="invalid")
    if parts.username is not None or parts.password is not None:
        raise DiscoveryError(
            f"{what} must not carry a user name or password", url=url, reason="invalid"
        )
    if parts.fragment or url.endswith("#"):
        raise DiscoveryError(f"{what} must not have a fragment: {url}", url=url, reason="invalid")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and policy.allow_loopback_http and _is_loopback(parts.hostname):
        return url
    raise DiscoveryError(
        f"{what} must use https, got {url}",
        url=url,
        reason="not_https",
        hint="OAuth metadata and endpoints are only trusted over HTTPS",
    )


def insert_well_known(url: str, suffix: str) -> str:
    """``/.well-known/<suffix>`` between the host and the path (RFC 8414 §3.1, RFC 9728 §3.1).

    A terminating ``/`` of the path is removed first; a query is kept.
    """
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"/.well-known/{suffix}{path}", parts.query, ""))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def protected_resource_metadata_urls(resource: str) -> list[str]:
    """Where a resource's metadata may be (RFC 9728 §3.1): path-specific, then the root.

    Each with the resource identifier it must name.
    """
    first = insert_well_known(resource, PROTECTED_RESOURCE)
    root = insert_well_known(_origin(resource), PROTECTED_RESOURCE)
    return [first] if first == root else [first, root]


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the order the MCP specification gives."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    appended = urlunsplit(
        (parts.scheme, parts.netloc, f"{path}/.well-known/{OPENID}", parts.query, "")
    )
    urls = [insert_well_known(issuer, OAUTH_AS), insert_well_known(issuer, OPENID), appended]
    return list(dict.fromkeys(urls))


def canonical_resource(url: str) -> str:
    """A resource identifier for comparison: scheme and host lower-cased, default port and
    a trailing ``/`` dropped (RFC 3986 §6.2.2/§6.2.3 normalisation)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and not (
        (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    ):
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, host, path, parts.query, ""))


def _same_issuer(found: Any, expected: str) -> bool:
    return isinstance(found, str) and (
        found == expected or found.rstrip("/") == expected.rstrip("/")
    )


# ------------------------------------------------------------ WWW-Authenticate

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(
    rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*(,|$)", re.DOTALL
)
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")


def parse_www_authenticate(header: str) -> dict[str, dict[str, str]]:
    """The challenges of a ``WWW-Authenticate`` value: scheme (lower case) -> its parameters.

    RFC 9110 §11.6.1 syntax: ``Bearer realm="x", resource_metadata="https://…", DPoP
    algs="ES256"``. Quoted strings may hold commas and escaped quotes. A token68
    challenge has no parameters. Unparseable input gives what was parsed up to there.
    """
    out: dict[str, dict[str, str]] = {}
    pos = 0
    text = header[:8192]
    while pos < len(text):
        m = _SCHEME.match(text, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < len(text):
            p = _PARAM.match(text, pos)
            if not p:
                break
            value = p.group(2)
            if value is not None:
                value = re.sub(r"\\(.)", r"\1", value)
            else:
                value = p.group(3)
            params.setdefault(p.group(1).lower(), value)
            pos = p.end()
        if pos < len(text) and not params:
            # a token68 (e.g. "Negotiate abc=="): skip to the next comma
            nxt = text.find(",", pos)
            pos = len(text) if nxt < 0 else nxt + 1
        out.setdefault(scheme, params)
    return out


# ---------------------------------------------------------------------- results


#: what Discovery.public leaves out: the documents (its fingerprint stands for them), the cost
_NOT_SHOWN = ("metadata", "resource_metadata", "elapsed", "requests")


@dataclass(frozen=True, slots=True)
class Discovery:
    """What discovery found. Public data only: metadata documents hold no secret."""

    #: the URL the owner gave
    source: str
    issuer: str
    metadata_url: str
    metadata: Mapping[str, Any]
    #: the protected resource (RFC 8707 ``resource``), None for a bare issuer
    resource: str | None = None
    resource_metadata_url: str | None = None
    resource_metadata: Mapping[str, Any] | None = None
    #: "challenge" (WWW-Authenticate), "well-known" (RFC 9728 document) or "issuer"
    via: str = "issuer"
    #: what the resource's challenge asked for (its ``scope`` parameter)
    challenge_scopes: tuple[str, ...] = ()
    #: seconds the requests took, all together
    elapsed: float = 0.0
    requests: int = 0

    @property
    def device_authorization_url(self) -> str | None:
        value = self.metadata.get("device_authorization_endpoint")
        return value if isinstance(value, str) else None

    @property
    def registration_url(self) -> str | None:
        value = self.metadata.get("registration_endpoint")
        return value if isinstance(value, str) else None

    def scopes(self) -> tuple[str, ...]:
        """The scopes to ask for (MCP scope selection): the challenge's, else the resource's
        ``scopes_supported``, plus ``offline_access`` when the server offers it (so that the
        connection gets a refresh token)."""
        chosen = list(self.challenge_scopes)
        if not chosen and self.resource_metadata is not None:
            chosen = _strings(self.resource_metadata.get("scopes_supported"))
        offered = _strings(self.metadata.get("scopes_supported"))
        if "offline_access" in offered and "offline_access" not in chosen:
            chosen.append("offline_access")
        return tuple(dict.fromkeys(chosen))

    def fingerprint(self) -> str:
        """Changes when anything the catalog entry is made of changes."""
        return _fingerprint(self.metadata, self.resource_metadata)

    def public(self) -> dict[str, Any]:
        data = public_fields(self, omit=_NOT_SHOWN)
        data["fingerprint"] = self.fingerprint()
        return data


#: metadata fields the catalog entry is made of (a change in them is a change)
_AS_FIELDS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "revocation_endpoint",
    "device_authorization_endpoint",
    "registration_endpoint",
    "scopes_supported",
    "code_challenge_methods_supported",
    "token_endpoint_auth_methods_supported",
    "grant_types_supported",
)
_PR_FIELDS = ("resource", "authorization_servers", "scopes_supported", "resource_name")


def _fingerprint(metadata: Mapping[str, Any], resource: Mapping[str, Any] | None) -> str:
    relevant = {
        "as": {k: metadata.get(k) for k in _AS_FIELDS},
        "pr": {k: resource.get(k) for k in _PR_FIELDS} if resource is not None else None,
    }
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and v and " " not in v]


# ------------------------------------------------------------------- validation


def validate_authorization_server(
    document: Any,
    *,
    issuer: str,
    url: str,
    policy: UrlPolicy = STRICT,
    for_resource: bool = False,
) -> dict[str, Any]:
    """RFC 8414 §3.3 checks of one metadata document; the document, or DiscoveryError."""
    metadata = _json_object(document, what="the metadata", url=url)
    found = metadata.get("issuer")
    if not _same_issuer(found, issuer):
        raise DiscoveryError(
            f"the metadata at {url} names issuer {_shown(found)}, not {issuer} it was fetched for"
            " (RFC 8414 §3.3): refused",
            url=url,
            reason="issuer_mismatch",
        )
    for key in ("authorization_endpoint", "token_endpoint"):
        if key not in metadata:
            raise DiscoveryError(f"the metadata at {url} has no {key}", url=url, reason="invalid")
    for key in (
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "device_authorization_endpoint",
        "registration_endpoint",
    ):
        if metadata.get(key) is not None:
            check_url(metadata[key], what=f"{key} of {issuer}", policy=policy)
    methods = metadata.get("code_challenge_methods_supported")
    if methods is not None and (not isinstance(methods, list) or "S256" not in methods):
        raise DiscoveryError(
            f"{issuer} does not support PKCE with S256 (code_challenge_methods_supported): refused",
            url=url,
            reason="no_pkce",
        )
    if methods is None and for_resource:
        raise DiscoveryError(
            f"{issuer} does not say it supports PKCE (no code_challenge_methods_supported);"
            " the MCP authorization specification requires refusing it",
            url=url,
            reason="no_pkce",
        )
    return metadata


def _json_object(document: Any, *, what: str, url: str) -> dict[str, Any]:
    """``document`` if it is a JSON object, else DiscoveryError (reason ``invalid``)."""
    if not isinstance(document, dict):
        raise DiscoveryError(f"{what} at {url} is not a JSON object", url=url, reason="invalid")
    return document


def _shown(value: Any) -> str:
    """A value a document named where another was expected, short enough to quote."""
    return value if isinstance(value, str) else repr(value)[:80]


def validate_protected_resource(
    document: Any, *, resource: str, url: str, policy: UrlPolicy = STRICT
) -> dict[str, Any]:
    """RFC 9728 §3.3 checks of a protected resource metadata document."""
    metadata = _json_object(document, what="the resource metadata", url=url)
    named = metadata.get("resource")
    if not isinstance(named, str) or canonical_resource(named) != canonical_resource(resource):
        raise DiscoveryError(
            f"the resource metadata at {url} describes {_shown(named)}, not {resource}"
            " (RFC 9728 §3.3): refused",
            url=url,
            reason="resource_mismatch",
        )
    check_url(named, what="the resource", policy=policy)
    servers = metadata.get("authorization_servers")
    if not isinstance(servers, list) or not servers:
        raise DiscoveryError(
            f"the resource metadata at {url} names no authorization_servers",
            url=url,
            reason="invalid",
        )
    for server in servers:
        check_url(server, what="an authorization server of the resource", policy=policy)
    return metadata


# ---------------------------------------------------------------------- fetching


async def _nothing() -> Any:
    """An empty async iterator (a probe does not read the body)."""
    return
    yield  # pragma: no cover


class _Fetcher:
    def __init__(self, client: httpx.AsyncClient, policy: UrlPolicy) -> None:
        self.client = client
        self.policy = policy
        self.requests = 0

    async def get(self, url: str, *, what: str, body: bool = True) -> httpx.Response:
        """The response, its body read up to MAX_DOCUMENT (not at all with ``body=False``).

        Network trouble raises ProviderTransientError (TLS: ProviderTLSError).
        """
        import httpx

        from .oauth_http import tls_error

        check_url(url, what=what, policy=self.policy)
        host = urlsplit(url).hostname or url
        self.requests += 1
        try:
            async with self.client.stream(
                "GET",
                url,
                headers={"Accept": "application/json"},
                follow_redirects=False,
            ) as response:
                content = bytearray()
                async for chunk in response.aiter_bytes() if body else _nothing():
                    content += chunk
                    if len(content) > MAX_DOCUMENT:
                        raise DiscoveryError(
                            f"{url} answered with more than {MAX_DOCUMENT // 1024} KiB",
                            url=url,
                            reason="invalid",
                        )
        except httpx.TimeoutException as err:
            raise ProviderTransientError(
                f"{host} did not answer in time ({what})", provider=host
            ) from err
        except httpx.TransportError as err:
            tls = tls_error(err, url, provider=host, during=f"cannot fetch {what}")
            if tls is not None:
                raise tls from err
            raise ProviderTransientError(
                f"cannot reach {host} for {what}: {type(err).__name__}", provider=host
            ) from err
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=bytes(content),
            request=response.request,
        )

    async def document(self, url: str, *, what: str) -> Any | None:
        """The JSON of a 200 answer; None when there is no document at ``url``."""
        response = await self.get(url, what=what)
        if response.status_code != 200:
            if response.status_code >= 500:
                host = urlsplit(url).hostname or url
                raise ProviderTransientError(
                    f"{host} failed {what} (HTTP {response.status_code}); try again later",
                    provider=host,
                    provider_status=response.status_code,
                )
            return None
        try:
            return json.loads(response.content)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DiscoveryError(
                f"{what} at {url} is not JSON", url=url, reason="invalid"
            ) from None


async def _authorization_server(
    fetch: _Fetcher, issuer: str, *, for_resource: bool
) -> tuple[str, dict[str, Any]] | None:
    """(metadata URL, metadata) of ``issuer``, or None when no document was found.

    A document that is found but fails validation (an issuer mismatch) is an error, not a
    reason to try the next location.
    """
    for url in authorization_server_metadata_urls(issuer):
        data = await fetch.document(url, what="authorization server metadata")
        if data is None:
            continue
        return url, validate_authorization_server(
            data, issuer=issuer, url=url, policy=fetch.policy, for_resource=for_resource
        )
    return None


async def discover(
    url: str,
    *,
    client: httpx.AsyncClient,
    policy: UrlPolicy = STRICT,
    clock: Callable[[], float] = time.monotonic,
) -> Discovery:
    """Discover the authorization server behind ``url`` (a protected resource or an issuer).

    Raises DiscoveryError (not HTTPS, no metadata, a mismatch), ProviderTransientError
    (network trouble, 5xx) or ProviderTLSError.
    """
    started = clock()
    source = check_url(url.strip(), what="the URL", policy=policy)
    fetch = _Fetcher(client, policy)

    # 1. the resource's own challenge
    challenge_scopes: tuple[str, ...] = ()
    candidates: list[tuple[str, str, str]] = []  # (metadata url, resource it names, via)
    probe = await fetch.get(source, what="the resource", body=False)
    if probe.status_code == 401:
        bearer = parse_www_authenticate(probe.headers.get("www-authenticate", "")).get("bearer", {})
        challenge_scopes = tuple(s for s in bearer.get("scope", "").split() if s)
        named = bearer.get("resource_metadata")
        if named:
            candidates.append((named, source, "challenge"))
    # 2. the well-known locations
    for at in protected_resource_metadata_urls(source):
        root = urlsplit(at).path == f"/.well-known/{PROTECTED_RESOURCE}" and bool(
            urlsplit(source).path.strip("/")
        )
        resource = _origin(source) if root else source
        if not any(c[0] == at for c in candidates):
            candidates.append((at, resource, "well-known"))

    resource_doc: dict[str, Any] | None = None
    resource_url: str | None = None
    resource_id: str | None = None
    via = "issuer"
    for at, resource, how in candidates:
        data = await fetch.document(at, what="protected resource metadata")
        if data is None:
            if how == "challenge":
                raise DiscoveryError(
                    f"the resource names its metadata at {at}, but nothing is there",
                    url=at,
                    reason="no_metadata",
                )
            continue
        resource_doc = validate_protected_resource(data, resource=resource, url=at, policy=policy)
        resource_url, resource_id, via = at, str(resource_doc["resource"]), how
        break

    # 3. the authorization server
    if resource_doc is not None:
        issuers = [s for s in resource_doc["authorization_servers"] if isinstance(s, str)]
        found = None
        for issuer in issuers:
            found = await _authorization_server(fetch, issuer, for_resource=True)
            if found is not None:
                break
        if found is None:
            raise DiscoveryError(
                f"no authorization server metadata for {', '.join(issuers)}"
                f" (the authorization server of {resource_id})",
                url=issuers[0],
                reason="no_metadata",
            )
    else:
        issuer = source
        found = await _authorization_server(fetch, issuer, for_resource=False)
        if found is None:
            raise DiscoveryError(
                f"{source} is neither a protected resource with RFC 9728 metadata nor an"
                " authorization server with RFC 8414 or OpenID Connect metadata",
                url=source,
                reason="no_metadata",
                hint="give the MCP server's URL or the authorization server's issuer",
            )
    metadata_url, metadata = found
    result = Discovery(
        source=source,
        issuer=str(metadata["issuer"]),
        metadata_url=metadata_url,
        metadata=metadata,
        resource=resource_id,
        resource_metadata_url=resource_url,
        resource_metadata=resource_doc,
        via=via,
        challenge_scopes=challenge_scopes,
        elapsed=clock() - started,
        requests=fetch.requests,
    )
    log.info(
        "discovered %s: issuer %s via %s (%d requests)",
        source,
        result.issuer,
        via,
        fetch.requests,
    )
    return result


# ------------------------------------------------------------- catalog entries

_ID_CHARS = re.compile(r"[^a-z0-9]+")


def provider_id_for(discovery: Discovery, taken: Callable[[str], str | None]) -> str:
    """A provider id derived from the host (``mcp.example.com`` -> ``mcp-example-com``).

    ``taken(id)`` returns the source URL an existing entry was discovered from ("" for a
    provider that was not discovered) or None for a free id. The same source keeps its id;
    another source on the same host gets the path added, then a number.
    """
    target = discovery.resource or discovery.source
    parts = urlsplit(target)
    host = (parts.hostname or "provider").lower()
    host = host.removeprefix("www.")
    base = _ID_CHARS.sub("-", host).strip("-") or "provider"
    if parts.port is not None and parts.port not in (80, 443):
        base = f"{base}-{parts.port}"
    base = base[:48].strip("-")
    path = _ID_CHARS.sub("-", parts.path.lower()).strip("-")[:12].strip("-")
    tries = [base] + ([f"{base}-{path}"] if path else [])
    tries += [f"{base}-{n}" for n in range(2, 100)]
    for candidate in tries:
        owner = taken(candidate)
        if owner is None or owner == discovery.source:
            return candidate
    raise DiscoveryError(
        f"too many providers discovered on {host}", url=discovery.source, reason="invalid"
    )


def spec_for(
    discovery: Discovery,
    provider_id: str,
    *,
    token_auth_method: str = "none",
    scopes: Sequence[str] | None = None,
) -> ProviderSpec:
    """The catalog entry a discovery makes (validated like any catalog entry)."""
    meta = discovery.metadata
    wanted = tuple(scopes) if scopes is not None else discovery.scopes()
    name = None
    if discovery.resource_metadata is not None:
        label = discovery.resource_metadata.get("resource_name")
        if isinstance(label, str) and label.strip() and label.isprintable():
            name = label.strip()[:80]
    if name is None:
        name = urlsplit(discovery.resource or discovery.issuer).netloc
    verified = {"authorize_url", "token_url", "issuer", "use_pkce", "token_auth_method"}
    values: dict[str, Any] = {
        "name": name,
        "authorize_url": meta["authorization_endpoint"],
        "token_url": meta["token_endpoint"],
        "issuer": discovery.issuer,
        "scopes": wanted,
        "use_pkce": True,
        "token_auth_method": token_auth_method,
        "docs_url": discovery.metadata_url,
        "notes": f"discovered from {discovery.source} ({discovery.via})",
    }
    for key, field_name in (
        ("revocation_endpoint", "revocation_url"),
        ("device_authorization_endpoint", "device_authorization_url"),
        ("registration_endpoint", "registration_url"),
    ):
        if isinstance(meta.get(key), str):
            values[field_name] = meta[key]
            verified.add(field_name)
    if discovery.resource is not None:
        values["resource"] = discovery.resource
        values["sources"] = (discovery.resource_metadata_url,)
        verified.add("resource")
    if "offline_access" in wanted:
        # OpenID Connect Core §11: offline_access is honoured with prompt=consent
        values["authorize_params"] = {"prompt": "consent"}
    values["verified"] = frozenset(verified)
    spec = ProviderSpec(id=provider_id, **values)
    # the same checks as a hand-written entry
    parse_discovered({"providers": {provider_id: {"spec": spec_fields(spec)}}}, file="<discovery>")
    return spec


# ------------------------------------------------------------------------ store


class DiscoveredStore:
    """The providers discovery found, in ``<state>/discovered.json`` (no secrets in it).

    ``{"version": 1, "providers": {id: {"spec": {...}, "discovery": {...}}}}``; written
    atomically under an flock like the credentials file, mode 0600 all the same.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .tokens import _FileLock

        self.path = Path(path)
        self._lock = _FileLock(self.path.with_name(self.path.name + ".lock"))

    def __repr__(self) -> str:
        return f"DiscoveredStore({str(self.path)!r})"

    def _read(self) -> dict[str, Any]:
        from .tokens import read_json_object

        try:
            data = read_json_object(self.path)
        except StorageError as err:
            raise ConfigError(
                f"cannot read the discovered providers: {err.message}", file=str(self.path)
            ) from None
        providers = data.get("providers")
        return dict(providers) if isinstance(providers, dict) else {}

    def entries(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self._read().items() if isinstance(v, dict)}

    def entry(self, provider: str) -> dict[str, Any] | None:
        return self.entries().get(provider)

    def specs(self) -> dict[str, ProviderSpec]:
        return parse_discovered({"providers": self.entries()}, file=str(self.path))

    def source_of(self, provider: str) -> str | None:
        entry = self.entry(provider)
        if entry is None:
            return None
        info = entry.get("discovery")
        return str(info.get("source", "")) if isinstance(info, dict) else ""

    def find(self, source: str) -> str | None:
        """The provider id discovered from ``source`` (or whose resource it is), if any."""
        wanted = canonical_resource(source)
        for pid, entry in sorted(self.entries().items()):
            info = entry.get("discovery")
            if not isinstance(info, dict):
                continue
            for key in ("source", "resource", "issuer"):
                value = info.get(key)
                if isinstance(value, str) and canonical_resource(value) == wanted:
                    return pid
        return None

    def put(self, spec: ProviderSpec, discovery: Discovery, *, now_ms: int) -> None:
        from .tokens import atomic_write_json, read_json_object

        with self._lock.hold():
            data = read_json_object(self.path)
            providers = data.get("providers")
            providers = dict(providers) if isinstance(providers, dict) else {}
            old = providers.get(spec.id)
            first = now_ms
            if isinstance(old, dict) and isinstance(old.get("discovery"), dict):
                first = int(old["discovery"].get("discovered_at") or now_ms)
            info = discovery.public()
            info.update(discovered_at=first, validated_at=now_ms)
            providers[spec.id] = {"spec": spec_fields(spec), "discovery": info}
            atomic_write_json(self.path, {"version": 1, "providers": providers})

    def touch(self, provider: str, *, now_ms: int) -> None:
        """Record that the entry was validated again and had not changed."""
        from .tokens import atomic_write_json, read_json_object

        with self._lock.hold():
            data = read_json_object(self.path)
            providers = data.get("providers")
            if not isinstance(providers, dict) or not isinstance(providers.get(provider), dict):
                return
            entry = dict(providers[provider])
            info = dict(entry.get("discovery") or {})
            info["validated_at"] = now_ms
            entry["discovery"] = info
            providers = {**providers, provider: entry}
            atomic_write_json(self.path, {"version": 1, "providers": providers})

    def delete(self, provider: str) -> bool:
        from .tokens import atomic_write_json, read_json_object

        with self._lock.hold():
            data = read_json_object(self.path)
            providers = data.get("providers")
            if not isinstance(providers, dict) or provider not in providers:
                return False
            providers = {k: v for k, v in providers.items() if k != provider}
            atomic_write_json(self.path, {"version": 1, "providers": providers})
            return True

    def ids(self) -> Iterable[str]:
        return sorted(self.entries())
