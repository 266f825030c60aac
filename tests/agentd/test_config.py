"""agentd.toml as typed sections: what load_config builds, the sections' shape, the settings
the composition root makes from them, and a key that is no longer used."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from agentd.config import DEPRECATED, SCHEMA, load_config
from agentd.context import api_settings, api_token
from agentd.sections import SECTIONS


def _load(tmp_path: Path, text: str, **env: str) -> typing.Any:
    path = tmp_path / "agentd.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={"HOME": str(tmp_path), **env})


@pytest.mark.parametrize("name", list(SCHEMA))
def test_each_section_mirrors_the_schema_key_for_key(name: str) -> None:
    section = SECTIONS[name]
    hints = typing.get_type_hints(section)
    fields = dataclasses.fields(section)
    assert [f.name for f in fields] == list(SCHEMA[name])
    for field in fields:
        kind = SCHEMA[name][field.name][0]
        # a list in the file is a tuple in the section; every other type is the schema's
        expected = tuple if kind is list else kind
        hint = hints[field.name]
        assert (typing.get_origin(hint) or hint) is expected, field.name
    assert section.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert list(SECTIONS) == list(SCHEMA)


def test_sections_are_read_by_attribute_with_defaults_the_file_and_the_environment(
    tmp_path: Path,
) -> None:
    config = _load(
        tmp_path,
        '[server]\nport = 9443\nallowed_logins = ["owner@example.com"]\n'
        '[telegram]\nbot_token = "1:secret-token"\napi_id = 5\napi_hash = "secret-hash"\n'
        'owner_ids = [7, "8"]\n',
        AGENTD_TIMER_CODE_TTL="120",
    )
    assert config.problems == ()
    assert config.server.port == 9443
    assert config.server.mode == "tls"  # the default
    assert config.server.allowed_logins == ("owner@example.com",)
    assert config.timer.code_ttl == 120.0
    assert config.timer.awaiting_ttl == 600.0
    assert config.telegram.owner_ids == (7, 8)
    assert config.telegram_enabled
    assert config.server is config.server  # built once
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timer.code_ttl = 1  # type: ignore[misc]
    for secret in ("secret-token", "secret-hash"):
        assert secret not in repr(config.telegram)
    assert dict(config.items())["remote.burst"] == 30


def test_a_wrong_value_is_a_problem_and_its_section_holds_the_default(tmp_path: Path) -> None:
    config = _load(tmp_path, '[server]\nport = "8400x"\n[timer]\ncode_ttl = -1\n')
    assert {p.key for p in config.problems} == {"server.port", "timer.code_ttl"}
    assert config.server.port == 8400
    assert "greater than 0" in next(p.message for p in config.problems if "ttl" in p.key)


def test_api_settings_maps_agentd_toml(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[server]\nmode = "serve"\nport = 8401\npublic_name = "host.tailnet.ts.net"\n'
        'allowed_logins = ["owner@example.com"]\napi_token = "t"\n'
        'localapi_socket = "/run/tailscale/tailscaled.sock"\n'
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\n',
    )
    settings = api_settings(config)
    assert settings.mode == "serve"
    assert settings.port == 8401
    assert settings.allowed_logins == ("owner@example.com",)
    assert settings.owner_check
    assert settings.cert_file is None
    assert settings.tls_dir == tmp_path / "state" / "tls"
    assert settings.localapi_socket == "/run/tailscale/tailscaled.sock"
    assert "api_token" not in repr(settings)
    assert not (tmp_path / "state" / "api-token").exists()  # showing settings makes no file


def test_api_token_loads_or_creates_the_token_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = _load(tmp_path, f'[paths]\nstate_dir = "{state}"\n')
    token_file = state / "api-token"
    first = api_token(config)
    again = api_token(config)
    assert first == again == token_file.read_text().strip()
    configured = _load(tmp_path, f'[server]\napi_token = "cfg"\n[paths]\nstate_dir = "{state}"\n')
    assert api_token(configured) == "cfg"


def test_a_deprecated_key_is_accepted_with_a_warning(tmp_path: Path) -> None:
    assert "client.api_base_url" in DEPRECATED
    config = _load(
        tmp_path,
        '[client]\napi_base_url = "https://host.tailnet.ts.net:8400"\n',
        AGENTD_CLIENT_API_BASE_URL="https://elsewhere:8400",
    )
    assert config.problems == ()
    assert [(w.file, w.key) for w in config.warnings] == [
        (str(tmp_path / "agentd.toml"), "client.api_base_url"),
        ("$AGENTD_CLIENT_API_BASE_URL", "client.api_base_url"),
    ]
    assert "unix socket" in str(config.warnings[0])
    assert not hasattr(config.client, "api_base_url")
    assert config.unknown == {"client.api_base_url": "https://host.tailnet.ts.net:8400"}
