from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from flowengine import paths
from flowengine.catalog import BUILTIN_CATALOG, Catalog, ProviderSpec, load_catalog
from flowengine.errors import (
    ConfigError,
    ProviderError,
    ProviderTransientError,
    ReauthorizationRequired,
    UnknownProviderError,
)
from flowengine.oauth_http import exchange_code, refresh_tokens
from tests.fakes import FakeProvider

REQUIRED_BUILTINS = (
    "dexcom",
    "dexcom-eu",
    "dexcom-sandbox",
    "oura",
    "withings",
    "whoop",
    "fitbit",
    "strava",
    "google",
    "github",
    "spotify",
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_catalog_has_the_required_providers_with_https_endpoints() -> None:
    catalog = load_catalog()
    for pid in REQUIRED_BUILTINS:
        spec = catalog.get(pid)
        assert spec.id == pid
        assert spec.authorize_url.startswith("https://")
        assert spec.token_url.startswith("https://")
        assert spec.docs_url
        assert spec.docs_url.startswith("https://")
        assert spec.name


def test_builtin_quirks_are_encoded() -> None:
    catalog = load_catalog()
    withings = catalog.get("withings")
    assert withings.token_params == {"action": "requesttoken"}
    assert withings.response_envelope == "body"
    assert {401, 503} <= withings.envelope_reauthorize
    assert 601 in withings.envelope_transient
    assert withings.scope_separator == ","
    assert catalog.get("strava").scope_separator == ","
    assert catalog.get("fitbit").token_auth_method == "client_secret_basic"
    assert catalog.get("dexcom").token_auth_method == "client_secret_post"
    assert catalog.get("dexcom").scopes == ("offline_access",)
    assert catalog.get("dexcom-eu").token_url == "https://api.dexcom.eu/v2/oauth2/token"
    assert catalog.get("dexcom-sandbox").api_base_url == "https://sandbox-api.dexcom.com"
    assert catalog.get("google").authorize_params == {"access_type": "offline", "prompt": "consent"}
    assert catalog.get("google").revocation_url == "https://oauth2.googleapis.com/revoke"


def test_unknown_provider_suggests_close_matches() -> None:
    with pytest.raises(UnknownProviderError) as info:
        load_catalog().get("dexcon")
    assert info.value.provider == "dexcon"
    assert "dexcom" in info.value.suggestions
    assert "did you mean" in str(info.value)


def test_contains_ids_and_all_agree() -> None:
    catalog = load_catalog()
    assert "oura" in catalog
    assert "nope" not in catalog
    assert catalog.ids() == sorted(catalog.ids())
    assert [s.id for s in catalog.all()] == catalog.ids()


def test_user_file_overrides_fields_and_adds_providers(tmp_path: Path) -> None:
    user = _write(
        tmp_path / "providers.toml",
        """
        [providers.dexcom]
        scopes = ["offline_access", "extra"]

        [providers.myhealth]
        name = "My Health"
        authorize_url = "https://auth.example.org/authorize"
        token_url = "https://auth.example.org/token"
        token_auth_method = "none"
        scope_separator = ","
        """,
    )
    catalog = load_catalog(user)
    dexcom = catalog.get("dexcom")
    assert dexcom.scopes == ("offline_access", "extra")
    assert dexcom.token_url == "https://api.dexcom.com/v2/oauth2/token"  # untouched
    mine = catalog.get("myhealth")
    assert mine.name == "My Health"
    assert not mine.needs_secret
    assert mine.scope_separator == ","
    assert catalog.get("fitbit").needs_secret


def test_default_user_file_is_the_xdg_config_one() -> None:
    _write(
        paths.user_catalog_path(),
        '[providers.oura]\nname = "Oura Ring"\n',
    )
    assert load_catalog().get("oura").name == "Oura Ring"


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('[providers.x]\nauthorize_url = "https://a/x"\n', "providers.x.token_url", "required"),
        (
            '[providers.oura]\ntoken_auth_method = "client_secret_jwt"\n',
            "providers.oura.token_auth_method",
            "must be one of",
        ),
        ('[providers.oura]\nscopes = "a"\nuse_pkce = "yes"\n', "providers.oura.use_pkce", "true"),
        (
            '[providers.oura]\ntoken_url = "http://example.org/t"\n',
            "providers.oura.token_url",
            "https",
        ),
        ('[providers.oura]\ntokn_url = "https://x/t"\n', "providers.oura.tokn_url", "token_url"),
        ('[providers.oura]\nscope_separator = ";"\n', "providers.oura.scope_separator", "','"),
        (
            "[providers.oura]\naccess_token_lifetime = -5\n",
            "providers.oura.access_token_lifetime",
            "positive",
        ),
        ("[providers.oura]\ntoken_params = { a = [1] }\n", "providers.oura.token_params.a", "str"),
        ('[providers."Bad Id"]\nname = "x"\n', "providers.Bad Id", "lowercase"),
        (
            '[providers.oura]\nrefresh_lifetime = { rule = "forever" }\n',
            "providers.oura.refresh_lifetime.rule",
            "absolute, idle, none",
        ),
        (
            '[providers.oura]\nrefresh_lifetime = { rule = "absolute" }\n',
            "providers.oura.refresh_lifetime",
            "needs months or days",
        ),
        (
            '[providers.oura]\nrefresh_lifetime = { rule = "idle", months = -1 }\n',
            "providers.oura.refresh_lifetime.months",
            "whole number",
        ),
        (
            '[providers.oura]\nrefresh_lifetime = { rule = "none", days = 3 }\n',
            "providers.oura.refresh_lifetime",
            "takes no months",
        ),
        (
            '[providers.oura]\nrefresh_lifetime = { rule = "idle", days = 3, weeks = 1 }\n',
            "providers.oura.refresh_lifetime.weeks",
            "unknown field",
        ),
        (
            '[providers.oura]\nrefresh_lifetime = "6 months"\n',
            "providers.oura.refresh_lifetime",
            "table",
        ),
        (
            '[providers.oura]\nverified = ["token_urls"]\n',
            "providers.oura.verified",
            "did you mean 'token_url'",
        ),
        ('[providers.oura]\nverified = ["name"]\n', "providers.oura.verified", "not a field"),
        (
            '[providers.oura]\nenvelope_transient = ["601"]\n',
            "providers.oura.envelope_transient",
            "integer",
        ),
        ('[providers.oura]\nsources = ["ftp://x"]\n', "providers.oura.sources[0]", "http"),
        (
            "[providers.oura]\nrefresh_params = { scope = 1.5 }\n",
            "providers.oura.refresh_params.scope",
            "str",
        ),
    ],
)
def test_invalid_user_file_names_file_provider_and_field(
    tmp_path: Path, body: str, key: str, words: str
) -> None:
    user = _write(tmp_path / "providers.toml", body)
    with pytest.raises(ConfigError) as info:
        load_catalog(user)
    assert info.value.file == str(user)
    assert info.value.key == key
    assert str(user) in str(info.value)
    assert words in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    user = _write(tmp_path / "providers.toml", "[providers.oura\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_catalog(user)
    assert info.value.file == str(user)


def test_with_override_registers_a_local_provider_without_touching_the_original() -> None:
    catalog = load_catalog()
    local = ProviderSpec(
        id="sim",
        name="Simulated",
        authorize_url="http://127.0.0.1:9/authorize",
        token_url="http://127.0.0.1:9/token",
        token_auth_method="none",
    )
    bigger = catalog.with_override(local)
    assert bigger.get("sim") == local
    assert "sim" not in catalog
    catalog.register(local)
    assert "sim" in catalog


def test_with_override_validates() -> None:
    bad = ProviderSpec(id="sim", name="S", authorize_url="ftp://x", token_url="https://t/")
    with pytest.raises(ConfigError, match="authorize_url"):
        Catalog().with_override(bad)


def test_builtin_file_ships_next_to_the_module() -> None:
    assert BUILTIN_CATALOG.name == "providers.toml"
    assert BUILTIN_CATALOG.is_file()


# ------------------------------------------------------------------ catalog truth


def test_every_builtin_entry_names_its_documentation_and_what_was_checked() -> None:
    from flowengine.catalog import CLAIM_FIELDS

    for spec in load_catalog():
        assert spec.docs_url, spec.id
        assert spec.verified, f"{spec.id} names no verified field"
        assert spec.verified <= set(CLAIM_FIELDS)
        assert all(s.startswith("https://") for s in spec.sources)
        # nothing is both verified and flagged
        assert not set(spec.unverified_fields()) & spec.verified


@pytest.mark.parametrize(
    ("provider", "field", "value"),
    [
        # user.info is for SDK/contract partners only: public apps ask for user.metrics
        ("withings", "scopes", ("user.metrics",)),
        ("withings", "token_params", {"action": "requesttoken"}),
        ("withings", "exchange_params", {}),
        ("withings", "refresh_params", {}),
        # GitHub supports PKCE (S256) since 2025-07-14
        ("github", "use_pkce", True),
        # WHOOP sends scope=offline on the refresh only
        ("whoop", "token_params", {}),
        ("whoop", "exchange_params", {}),
        ("whoop", "refresh_params", {"scope": "offline"}),
        ("dexcom", "use_pkce", False),
        ("dexcom", "refresh_lifetime", None),
        ("oura", "refresh_lifetime", None),
    ],
)
def test_catalog_values_match_the_documentation(provider: str, field: str, value: object) -> None:
    assert getattr(load_catalog().get(provider), field) == value


def test_refresh_lifetime_rules() -> None:
    from flowengine.catalog import RefreshLifetime

    catalog = load_catalog()
    assert catalog.get("spotify").refresh_lifetime == RefreshLifetime("absolute", months=6)
    assert catalog.get("github").refresh_lifetime == RefreshLifetime("idle", months=6)
    assert catalog.get("withings").refresh_lifetime == RefreshLifetime("idle", months=12)
    assert catalog.get("fitbit").refresh_lifetime == RefreshLifetime("none")
    google = catalog.get("google")
    assert google.refresh_lifetime == RefreshLifetime(
        "absolute", days=7, condition="the app's publishing status is Testing"
    )
    # the 7 days come from third parties only: flagged
    assert "refresh_lifetime" in google.unverified_fields()
    assert "refresh_lifetime" in catalog.get("spotify").verified


def test_user_file_sets_the_new_fields(tmp_path: Path) -> None:
    from flowengine.catalog import RefreshLifetime

    user = _write(
        tmp_path / "providers.toml",
        """
        [providers.google]
        refresh_lifetime = { rule = "absolute", days = 7 }
        verified = ["authorize_url", "token_url", "refresh_lifetime"]

        [providers.mine]
        authorize_url = "https://auth.example.org/authorize"
        token_url = "https://auth.example.org/token"
        exchange_params = { audience = "api" }
        refresh_params = { scope = "offline" }
        response_envelope = "data"
        envelope_transient = [9]
        envelope_reauthorize = [7, 8]
        sources = ["https://auth.example.org/docs"]
        """,
    )
    catalog = load_catalog(user)
    google = catalog.get("google")
    assert google.refresh_lifetime == RefreshLifetime("absolute", days=7)
    assert "refresh_lifetime" not in google.unverified_fields()
    mine = catalog.get("mine")
    assert mine.exchange_params == {"audience": "api"}
    assert mine.refresh_params == {"scope": "offline"}
    assert mine.envelope_transient == frozenset({9})
    assert mine.envelope_reauthorize == frozenset({7, 8})
    assert mine.sources == ("https://auth.example.org/docs",)
    assert mine.verified == frozenset()
    assert "authorize_url" in mine.unverified_fields()
    public = mine.public()
    assert public["envelope_reauthorize"] == [7, 8]
    assert public["refresh_params"] == {"scope": "offline"}
    assert public["unverified"] == mine.unverified_fields()
    # a spec made in code goes through the same validation
    Catalog().with_override(google)


# -------------------------------------------------- the hooks at work (oauth_http)


def _spec(fake: FakeProvider, **fields: Any) -> ProviderSpec:
    return fake.spec(**fields)


@pytest.mark.anyio
async def test_exchange_and_refresh_parameters_go_where_the_catalog_says() -> None:
    fake = FakeProvider()
    spec = _spec(
        fake,
        token_params={"every": "1"},
        exchange_params={"audience": "api"},
        refresh_params={"scope": "offline"},
    )
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        code = fake.issue_code(redirect_uri="https://cb")
        tokens = await exchange_code(
            spec,
            fake.credentials(),
            code=code,
            redirect_uri="https://cb",
            code_verifier=None,
            client=client,
            now_ms=0,
        )
        await refresh_tokens(
            spec, fake.credentials(), refresh_token=tokens.refresh or "", client=client, now_ms=0
        )
    exchange, refresh = (r.form for r in fake.requests)
    assert (exchange["every"], exchange["audience"]) == ("1", "api")
    assert "scope" not in exchange
    assert (refresh["every"], refresh["scope"]) == ("1", "offline")
    assert "audience" not in refresh


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"),
    [(9, ProviderTransientError), (7, ReauthorizationRequired), (5, ProviderError)],
)
async def test_envelope_statuses_are_sorted_by_the_catalog(status: int, error: type) -> None:
    fake = FakeProvider(envelope=True)
    spec = _spec(fake, envelope_transient=frozenset({9}), envelope_reauthorize=frozenset({7}))
    fake.fail_next(httpx.Response(200, json={"status": status, "error": "x"}))
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        with pytest.raises(ProviderError) as info:
            await refresh_tokens(
                spec, fake.credentials(), refresh_token="r", client=client, now_ms=0
            )
    assert type(info.value) is error
    assert info.value.oauth_error == f"status_{status}"
    assert info.value.provider_status == 200
