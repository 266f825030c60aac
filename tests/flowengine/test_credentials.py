from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flowengine import paths
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.errors import TokenFileCorruptError


def test_round_trip_file_mode_and_default_path() -> None:
    store = CredentialStore()
    assert store.path == paths.credentials_path()
    assert store.get("dexcom") is None
    store.put("dexcom", ClientCredentials("id-1", "s3cret"))
    store.put("spotify", ClientCredentials("id-2"))
    assert store.get("dexcom") == ClientCredentials("id-1", "s3cret")
    assert store.get("spotify") == ClientCredentials("id-2", None)
    assert store.providers() == ["dexcom", "spotify"]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.delete("dexcom") is True
    assert store.delete("dexcom") is False
    assert store.providers() == ["spotify"]


def test_repr_hides_the_secret() -> None:
    creds = ClientCredentials("client-abc", "very-secret-value")
    assert "very-secret-value" not in repr(creds)
    assert "client-abc" in repr(creds)


def test_empty_client_id_is_refused() -> None:
    with pytest.raises(ValueError, match="client_id"):
        ClientCredentials("  ")


def test_corrupt_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json", encoding="utf-8")
    store = CredentialStore(path)
    with pytest.raises(TokenFileCorruptError) as info:
        store.put("dexcom", ClientCredentials("id"))
    assert info.value.path == str(path)
    assert path.read_text(encoding="utf-8") == "{not json"


def test_replacing_a_secret_with_none_removes_it(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "c.json")
    store.put("x", ClientCredentials("id", "s"))
    store.put("x", ClientCredentials("id2"))
    assert store.get("x") == ClientCredentials("id2", None)
    assert "client_secret" not in store.path.read_text(encoding="utf-8")
