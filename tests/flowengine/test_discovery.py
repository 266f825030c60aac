"""discovery.py: well-known locations, URL rules, challenges, validation, ids, the store.

The pure parts are tables; ``discover`` runs against small httpx.MockTransport sites. The
real authorization server and protected resource are in tests/e2e/test_anything.py.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowengine.catalog import load_catalog
from flowengine.discovery import (
    LOOPBACK_HTTP_FOR_TESTS,
    STRICT,
    DiscoveredStore,
    Discovery,
    authorization_server_metadata_urls,
    canonical_resource,
    check_url,
    discover,
    insert_well_known,
    parse_www_authenticate,
    protected_resource_metadata_urls,
    provider_id_for,
    spec_for,
    validate_authorization_server,
    validate_protected_resource,
)
from flowengine.errors import ConfigError, DiscoveryError, ProviderTransientError

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------ well-known URLs


@pytest.mark.parametrize(
    ("url", "suffix", "expected"),
    [
        (
            "https://as.example.com",
            "oauth-authorization-server",
            "https://as.example.com/.well-known/oauth-authorization-server",
        ),
        (
            "https://as.example.com/",
            "oauth-authorization-server",
            "https://as.example.com/.well-known/oauth-authorization-server",
        ),
        # RFC 8414 §3.1: inserted between host and path; a terminating "/" removed first
        (
            "https://as.example.com/tenant1",
            "oauth-authorization-server",
            "https://as.example.com/.well-known/oauth-authorization-server/tenant1",
        ),
        (
            "https://as.example.com/tenant1/",
            "oauth-authorization-server",
            "https://as.example.com/.well-known/oauth-authorization-server/tenant1",
        ),
        (
            "https://as.example.com:8443/a/b",
            "openid-configuration",
            "https://as.example.com:8443/.well-known/openid-configuration/a/b",
        ),
        # RFC 9728 §3.1: a query is kept
        (
            "https://mcp.example.com/mcp?tenant=x",
            "oauth-protected-resource",
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp?tenant=x",
        ),
    ],
)
def test_insert_well_known(url: str, suffix: str, expected: str) -> None:
    assert insert_well_known(url, suffix) == expected


def test_authorization_server_locations_in_the_mcp_order() -> None:
    assert authorization_server_metadata_urls("https://as.example.com") == [
        "https://as.example.com/.well-known/oauth-authorization-server",
        "https://as.example.com/.well-known/openid-configuration",
    ]
    assert authorization_server_metadata_urls("https://as.example.com/tenant1") == [
        "https://as.example.com/.well-known/oauth-authorization-server/tenant1",
        "https://as.example.com/.well-known/openid-configuration/tenant1",
        "https://as.example.com/tenant1/.well-known/openid-configuration",
    ]


def test_protected_resource_locations() -> None:
    assert protected_resource_metadata_urls("https://r.example.com/public/mcp") == [
        "https://r.example.com/.well-known/oauth-protected-resource/public/mcp",
        "https://r.example.com/.well-known/oauth-protected-resource",
    ]
    assert protected_resource_metadata_urls("https://r.example.com/") == [
        "https://r.example.com/.well-known/oauth-protected-resource"
    ]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://MCP.Example.com/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com:443/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com/mcp/", "https://mcp.example.com/mcp"),
        ("HTTPS://mcp.example.com", "https://mcp.example.com/"),
    ],
)
def test_canonical_resource_equal(a: str, b: str) -> None:
    assert canonical_resource(a) == canonical_resource(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://mcp.example.com/mcp", "https://mcp.example.com/MCP"),
        ("https://mcp.example.com:8443/mcp", "https://mcp.example.com/mcp"),
        ("http://mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com/mcp?a=1", "https://mcp.example.com/mcp"),
    ],
)
def test_canonical_resource_different(a: str, b: str) -> None:
    assert canonical_resource(a) != canonical_resource(b)


# ------------------------------------------------------------------------ URL rules


@pytest.mark.parametrize(
    "url",
    [
        "https://as.example.com",
        "https://as.example.com/tenant?x=1",
        "https://[2001:db8::1]:8443/x",
    ],
)
def test_https_urls_pass(url: str) -> None:
    assert check_url(url, what="x") == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://as.example.com", "not_https"),
        ("http://127.0.0.1:8080/oauth", "not_https"),  # loopback too, by default
        ("ftp://as.example.com", "not_https"),
        ("https://as.example.com/#frag", "invalid"),
        ("https://as.example.com/#", "invalid"),
        ("https://user:pass@as.example.com/", "invalid"),
        ("https://as.example.com:99999/", "invalid"),
        ("https://as.example.com/a b", "invalid"),
        ("/relative/path", "invalid"),
        ("as.example.com", "invalid"),
        ("", "invalid"),
        (None, "invalid"),
        ("https://" + "a" * 3000, "invalid"),
    ],
)
def test_other_urls_are_refused(url: Any, reason: str) -> None:
    with pytest.raises(DiscoveryError) as info:
        check_url(url, what="the URL")
    assert info.value.reason == reason
    assert info.value.code == "discovery_failed"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8080/oauth", True),
        ("http://[::1]:8080/oauth", True),
        ("http://localhost:8080/oauth", True),
        ("http://127.5.6.7/x", True),
        ("http://10.0.0.1/oauth", False),
        ("http://as.example.com/oauth", False),
        ("http://localhost.example.com/", False),
    ],
)
def test_the_tests_loopback_policy(url: str, ok: bool) -> None:
    if ok:
        assert check_url(url, what="x", policy=LOOPBACK_HTTP_FOR_TESTS) == url
    else:
        with pytest.raises(DiscoveryError):
            check_url(url, what="x", policy=LOOPBACK_HTTP_FOR_TESTS)


def test_only_the_test_suite_loosens_the_url_policy() -> None:
    """No configuration key, flag or environment variable turns plain http on: nothing in
    the product but the definition itself names the loose policy."""
    found = sorted(
        str(path.relative_to(REPO))
        for package in ("flowengine", "api", "bot", "agentd", "integrations")
        for path in (REPO / package).rglob("*.py")
        if any(
            word in path.read_text(encoding="utf-8")
            for word in ("LOOPBACK_HTTP_FOR_TESTS", "allow_loopback_http=True")
        )
    )
    assert found == ["flowengine/discovery.py"]
    assert STRICT.allow_loopback_http is False


# ----------------------------------------------------------------- WWW-Authenticate


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer", {"bearer": {}}),
        (
            'Bearer resource_metadata="https://r.example.com/.well-known/oauth-protected-resource"',
            {
                "bearer": {
                    "resource_metadata": "https://r.example.com/.well-known/oauth-protected-resource"
                }
            },
        ),
        (
            'Bearer realm="mcp", error="invalid_token", error_description="expired, sorry",'
            ' scope="mcp:tools mcp:read"',
            {
                "bearer": {
                    "realm": "mcp",
                    "error": "invalid_token",
                    "error_description": "expired, sorry",
                    "scope": "mcp:tools mcp:read",
                }
            },
        ),
        (
            'DPoP algs="ES256 PS256", Bearer resource_metadata="https://x.example/m"',
            {
                "dpop": {"algs": "ES256 PS256"},
                "bearer": {"resource_metadata": "https://x.example/m"},
            },
        ),
        (
            'Negotiate YIIB9w==, BEARER Resource_Metadata="https://x.example/m"',
            {"negotiate": {}, "bearer": {"resource_metadata": "https://x.example/m"}},
        ),
        ('Bearer realm="a \\"quoted\\" realm"', {"bearer": {"realm": 'a "quoted" realm'}}),
        ("Bearer realm=token68value", {"bearer": {"realm": "token68value"}}),
        ("", {}),
        ('Bearer realm="unterminated', {"bearer": {}}),
    ],
)
def test_parse_www_authenticate(header: str, expected: dict[str, dict[str, str]]) -> None:
    assert parse_www_authenticate(header) == expected


# ------------------------------------------------------------------------ validation

ISSUER = "https://as.example.com/tenant"


def as_metadata(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/authorize",
        "token_endpoint": f"{ISSUER}/token",
        "code_challenge_methods_supported": ["S256"],
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def test_metadata_of_the_issuer_passes_with_or_without_a_trailing_slash() -> None:
    url = "https://as.example.com/.well-known/oauth-authorization-server/tenant"
    assert validate_authorization_server(as_metadata(), issuer=ISSUER, url=url)
    assert validate_authorization_server(as_metadata(issuer=ISSUER + "/"), issuer=ISSUER, url=url)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (as_metadata(issuer="https://as.example.com/other"), "issuer_mismatch"),
        (as_metadata(issuer="https://evil.example.com/tenant"), "issuer_mismatch"),
        (as_metadata(issuer=None), "issuer_mismatch"),
        (as_metadata(issuer=42), "issuer_mismatch"),
        (as_metadata(token_endpoint=None), "invalid"),
        (as_metadata(authorization_endpoint=None), "invalid"),
        (as_metadata(token_endpoint="http://as.example.com/token"), "not_https"),
        (as_metadata(device_authorization_endpoint="http://as.example.com/d"), "not_https"),
        (as_metadata(registration_endpoint="https://as.example.com/#r"), "invalid"),
        (as_metadata(code_challenge_methods_supported=["plain"]), "no_pkce"),
        (as_metadata(code_challenge_methods_supported="S256"), "no_pkce"),
        (["not", "an", "object"], "invalid"),
    ],
)
def test_metadata_refused(metadata: Any, reason: str) -> None:
    with pytest.raises(DiscoveryError) as info:
        validate_authorization_server(metadata, issuer=ISSUER, url="https://as.example.com/m")
    assert info.value.reason == reason


def test_pkce_unsaid_is_refused_for_a_protected_resource_only() -> None:
    silent = as_metadata(code_challenge_methods_supported=None)
    assert validate_authorization_server(silent, issuer=ISSUER, url="u")
    with pytest.raises(DiscoveryError) as info:
        validate_authorization_server(silent, issuer=ISSUER, url="u", for_resource=True)
    assert info.value.reason == "no_pkce"


RESOURCE = "https://mcp.example.com/mcp"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (
            {"resource": "https://mcp.example.com/other", "authorization_servers": [ISSUER]},
            "resource_mismatch",
        ),
        ({"authorization_servers": [ISSUER]}, "resource_mismatch"),
        ({"resource": RESOURCE}, "invalid"),
        ({"resource": RESOURCE, "authorization_servers": []}, "invalid"),
        ({"resource": RESOURCE, "authorization_servers": ["http://as.example.com"]}, "not_https"),
        ({"resource": RESOURCE, "authorization_servers": [7]}, "invalid"),
        ("nope", "invalid"),
    ],
)
def test_resource_metadata_refused(metadata: Any, reason: str) -> None:
    with pytest.raises(DiscoveryError) as info:
        validate_protected_resource(metadata, resource=RESOURCE, url="https://m")
    assert info.value.reason == reason


def test_resource_metadata_compared_after_normalisation() -> None:
    data = {"resource": "https://MCP.example.com:443/mcp/", "authorization_servers": [ISSUER]}
    assert validate_protected_resource(data, resource=RESOURCE, url="u") is data


# --------------------------------------------------------------------- scope choice


def found(**kw: Any) -> Discovery:
    values: dict[str, Any] = {
        "source": RESOURCE,
        "issuer": ISSUER,
        "metadata_url": "https://as.example.com/.well-known/oauth-authorization-server/tenant",
        "metadata": as_metadata(scopes_supported=["openid", "offline_access"]),
        "resource": RESOURCE,
        "resource_metadata_url": "https://mcp.example.com/.well-known/oauth-protected-resource/mcp",
        "resource_metadata": {
            "resource": RESOURCE,
            "authorization_servers": [ISSUER],
            "scopes_supported": ["mcp:a", "mcp:b"],
        },
        "via": "well-known",
    }
    values.update(kw)
    return Discovery(**values)


def test_scopes_from_the_challenge_then_the_resource_then_offline_access() -> None:
    assert found(challenge_scopes=("mcp:a",)).scopes() == ("mcp:a", "offline_access")
    assert found().scopes() == ("mcp:a", "mcp:b", "offline_access")
    assert found(metadata=as_metadata()).scopes() == ("mcp:a", "mcp:b")
    assert found(resource_metadata=None, resource=None).scopes() == ("offline_access",)
    both = found(challenge_scopes=("offline_access", "x"))
    assert both.scopes() == ("offline_access", "x")


def test_the_fingerprint_follows_what_the_entry_is_made_of() -> None:
    base = found()
    assert base.fingerprint() == found(via="challenge", source="https://else").fingerprint()
    moved = found(metadata=as_metadata(token_endpoint=f"{ISSUER}/v2/token"))
    assert moved.fingerprint() != base.fingerprint()
    more = found(metadata={**base.metadata, "op_policy_uri": "https://x"})
    assert more.fingerprint() == base.fingerprint()  # a field the entry does not use


# ---------------------------------------------------------------------- ids, entries


def owner_map(owners: dict[str, str]) -> Callable[[str], str | None]:
    return owners.get


@pytest.mark.parametrize(
    ("resource", "owners", "expected"),
    [
        ("https://mcp.example.com/mcp", {}, "mcp-example-com"),
        ("https://www.example.com/", {}, "example-com"),
        ("https://MCP.Example.COM:8443/x", {}, "mcp-example-com-8443"),
        ("https://[::1]:9000/x", {}, "1-9000"),
        # the same source keeps its id
        (
            "https://mcp.example.com/mcp",
            {"mcp-example-com": "https://mcp.example.com/mcp"},
            "mcp-example-com",
        ),
        # another source on the host: its path, then a number
        (
            "https://mcp.example.com/mcp",
            {"mcp-example-com": "https://mcp.example.com/b"},
            "mcp-example-com-mcp",
        ),
        (
            "https://mcp.example.com/mcp",
            {"mcp-example-com": "https://x", "mcp-example-com-mcp": "https://y"},
            "mcp-example-com-2",
        ),
        # a built-in provider's id ("" = not discovered) is never taken over
        ("https://github.com/", {"github-com": ""}, "github-com-2"),
    ],
)
def test_provider_ids_from_the_host(resource: str, owners: dict[str, str], expected: str) -> None:
    discovery = found(resource=resource, source=resource)
    pid = provider_id_for(discovery, owner_map(owners))
    assert pid == expected
    spec_for(discovery, pid)  # the id is one the catalog takes


def test_spec_for_a_resource() -> None:
    discovery = found(
        metadata=as_metadata(
            scopes_supported=["offline_access"],
            revocation_endpoint=f"{ISSUER}/revoke",
            device_authorization_endpoint=f"{ISSUER}/device",
            registration_endpoint=f"{ISSUER}/register",
        ),
        resource_metadata={
            "resource": RESOURCE,
            "authorization_servers": [ISSUER],
            "scopes_supported": ["mcp:a"],
            "resource_name": "Calendar MCP",
        },
    )
    spec = spec_for(discovery, "mcp-example-com")
    assert spec.name == "Calendar MCP"
    assert spec.resource == RESOURCE
    assert spec.issuer == ISSUER
    assert (spec.authorize_url, spec.token_url) == (f"{ISSUER}/authorize", f"{ISSUER}/token")
    assert spec.revocation_url == f"{ISSUER}/revoke"
    assert spec.device_authorization_url == f"{ISSUER}/device"
    assert spec.registration_url == f"{ISSUER}/register"
    assert spec.scopes == ("mcp:a", "offline_access")
    assert spec.authorize_params == {"prompt": "consent"}  # OIDC Core §11 for offline_access
    assert spec.use_pkce is True
    assert spec.token_auth_method == "none"
    assert spec.docs_url == discovery.metadata_url
    assert spec.sources == (discovery.resource_metadata_url,)
    assert spec.unverified_fields() == ["scopes", "authorize_params"]


def test_spec_for_a_bare_issuer_has_no_resource() -> None:
    spec = spec_for(found(resource=None, resource_metadata=None, via="issuer"), "as-example-com")
    assert spec.resource is None
    assert spec.name == "as.example.com"
    assert spec.sources == ()


# ------------------------------------------------------------------------- the store


def test_the_store_round_trip(tmp_path: Path) -> None:
    store = DiscoveredStore(tmp_path / "discovered.json")
    assert store.entries() == {}
    assert store.find(RESOURCE) is None
    discovery = found()
    spec = spec_for(discovery, "mcp-example-com")
    store.put(spec, discovery, now_ms=1_000)
    assert stat.S_IMODE((tmp_path / "discovered.json").stat().st_mode) == 0o600
    assert store.find(RESOURCE) == "mcp-example-com"
    assert store.find("https://MCP.example.com/mcp/") == "mcp-example-com"
    assert store.find(ISSUER) == "mcp-example-com"
    assert store.source_of("mcp-example-com") == RESOURCE
    assert store.specs() == {"mcp-example-com": spec}
    catalog = load_catalog(tmp_path / "none.toml", discovered=tmp_path / "discovered.json")
    assert catalog.get("mcp-example-com") == spec
    assert "dexcom" in catalog
    store.put(spec, discovery, now_ms=2_000)
    store.touch("mcp-example-com", now_ms=3_000)
    info = store.entry("mcp-example-com")["discovery"]  # type: ignore[index]
    assert (info["discovered_at"], info["validated_at"]) == (1_000, 3_000)
    assert info["fingerprint"] == discovery.fingerprint()
    assert store.delete("mcp-example-com")
    assert not store.delete("mcp-example-com")
    assert store.ids() == []


def test_a_user_catalog_still_overrides_a_discovered_provider(tmp_path: Path) -> None:
    store = DiscoveredStore(tmp_path / "discovered.json")
    store.put(spec_for(found(), "mcp-example-com"), found(), now_ms=1)
    user = tmp_path / "providers.toml"
    user.write_text('[providers.mcp-example-com]\nname = "My calendar"\n')
    catalog = load_catalog(user, discovered=tmp_path / "discovered.json")
    assert catalog.get("mcp-example-com").name == "My calendar"
    assert catalog.get("mcp-example-com").resource == RESOURCE


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '["a list"]',
        '{"providers": {"Bad Id": {"spec": {}}}}',
        '{"providers": {"x": {}}}',
    ],
)
def test_a_damaged_store_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "discovered.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_catalog(tmp_path / "none.toml", discovered=path)


# ---------------------------------------------------------------------- discover()


class Site:
    """A few HTTPS hosts answering GETs from a table: path -> (status, headers, body)."""

    def __init__(self, pages: dict[str, tuple[int, dict[str, str], Any]]) -> None:
        self.pages = pages
        self.seen: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.seen.append(url)
        status, headers, body = self.pages.get(url, (404, {}, {"error": "not_found"}))
        if isinstance(body, bytes):
            return httpx.Response(status, headers=headers, content=body)
        return httpx.Response(status, headers=headers, json=body)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


PRM = {"resource": RESOURCE, "authorization_servers": [ISSUER], "scopes_supported": ["mcp:a"]}
AS_AT = "https://as.example.com/.well-known/oauth-authorization-server/tenant"


@pytest.mark.anyio
async def test_discover_through_the_challenge() -> None:
    named = "https://meta.example.com/prm.json"
    site = Site(
        {
            RESOURCE: (
                401,
                {"WWW-Authenticate": f'Bearer resource_metadata="{named}", scope="mcp:a"'},
                {},
            ),
            named: (200, {}, PRM),
            AS_AT: (200, {}, as_metadata()),
        }
    )
    async with site.client() as client:
        result = await discover(RESOURCE, client=client)
    assert (result.via, result.resource_metadata_url, result.metadata_url) == (
        "challenge",
        named,
        AS_AT,
    )
    assert result.challenge_scopes == ("mcp:a",)
    assert site.seen == [RESOURCE, named, AS_AT]
    assert result.requests == 3


@pytest.mark.anyio
async def test_the_root_document_names_the_origin() -> None:
    root = "https://mcp.example.com/.well-known/oauth-protected-resource"
    site = Site(
        {
            root: (200, {}, {**PRM, "resource": "https://mcp.example.com"}),
            AS_AT: (200, {}, as_metadata()),
        }
    )
    async with site.client() as client:
        result = await discover(RESOURCE, client=client)
    assert result.resource == "https://mcp.example.com"
    assert result.via == "well-known"
    # the path-specific document would have had to name the full URL
    site.pages["https://mcp.example.com/.well-known/oauth-protected-resource/mcp"] = (
        200,
        {},
        {**PRM, "resource": "https://mcp.example.com"},
    )
    async with site.client() as client:
        with pytest.raises(DiscoveryError) as info:
            await discover(RESOURCE, client=client)
    assert info.value.reason == "resource_mismatch"


@pytest.mark.anyio
async def test_an_issuer_with_openid_configuration_inserted() -> None:
    inserted = "https://as.example.com/.well-known/openid-configuration/tenant"
    site = Site({inserted: (200, {}, as_metadata())})
    async with site.client() as client:
        result = await discover(ISSUER, client=client)
    assert result.via == "issuer"
    assert result.metadata_url == inserted
    assert result.resource is None
    assert site.seen == [
        ISSUER,
        "https://as.example.com/.well-known/oauth-protected-resource/tenant",
        "https://as.example.com/.well-known/oauth-protected-resource",
        AS_AT,
        inserted,
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pages", "error", "reason"),
    [
        ({}, DiscoveryError, "no_metadata"),
        (
            {
                RESOURCE: (
                    401,
                    {"WWW-Authenticate": 'Bearer resource_metadata="https://m.example/x"'},
                    {},
                )
            },
            DiscoveryError,
            "no_metadata",
        ),
        ({AS_AT: (200, {}, b"<html>")}, DiscoveryError, "invalid"),
        ({AS_AT: (503, {}, {})}, ProviderTransientError, None),
        # a redirect is not followed: no document there
        (
            {AS_AT: (302, {"Location": "http://as.example.com/m"}, {})},
            DiscoveryError,
            "no_metadata",
        ),
        ({AS_AT: (200, {}, b"{" + b" " * 300_000 + b"}")}, DiscoveryError, "invalid"),
        (
            {
                "https://mcp.example.com/.well-known/oauth-protected-resource/mcp": (200, {}, PRM),
            },
            DiscoveryError,
            "no_metadata",
        ),
    ],
)
async def test_discover_failures(
    pages: dict[str, tuple[int, dict[str, str], Any]], error: type[Exception], reason: str | None
) -> None:
    target = RESOURCE if any("mcp" in p for p in pages) or not pages else ISSUER
    site = Site(pages)
    async with site.client() as client:
        with pytest.raises(error) as info:
            await discover(target, client=client)
    if reason is not None:
        assert info.value.reason == reason  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_an_unreachable_host_is_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(ProviderTransientError) as info:
            await discover(RESOURCE, client=client)
    assert "mcp.example.com" in info.value.message


def test_discovery_public_view_holds_nothing_secret() -> None:
    data = found().public()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {
        "source",
        "issuer",
        "metadata_url",
        "resource",
        "resource_metadata_url",
        "via",
        "challenge_scopes",
        "fingerprint",
    }
