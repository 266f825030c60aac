from __future__ import annotations

from pathlib import Path

import pytest

from flowengine import paths
from flowengine.catalog import BUILTIN_CATALOG, Catalog, ProviderSpec, load_catalog
from flowengine.errors import ConfigError, UnknownProviderError

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
