"""oidc-provider over HTTPS with a private CA, reached the way ``agentd`` reaches providers.

``[client] ca_file`` (next to the system CAs) is trusted by the provider calls too, not only
by the daemon call: the exchange and the refresh work through it, and without it they fail
with one line naming the host and the reason. The Basic client's secret holds ``:``, ``+``,
``%``, ``/`` and a space (RFC 6749 §2.3.1 encoding); the scopes shown are the granted ones.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from authlib.oauth2.auth import ClientAuth

from agentd.config import Config, load_config
from agentd.context import open_context
from flowengine.catalog import Catalog
from flowengine.credentials import CredentialStore
from flowengine.errors import ProviderTLSError
from flowengine.oauth_http import basic_auth_header
from flowengine.protocol import parse_callback
from flowengine.states import FlowState
from flowengine.vault import Vault, vault_root
from tests.agentd.cli_helpers import agentd_command
from tests.e2e.conftest import SPECIAL, OidcServer
from tests.e2e.helpers import (
    CLIENTS,
    NATIVE_REDIRECT,
    WEB_REDIRECT,
    credentials_for,
    follow_to_redirect,
    spec_for,
)

pytestmark = pytest.mark.slow

PROVIDER = "oidc-basic"
TLS_LINE = (
    "TLS verification failed for localhost: unable to get local issuer certificate"
    " (trust its CA with [client] ca_file; the system CAs are always trusted)"
)


def env_for(root: Path, *, ca_file: Path | None) -> dict[str, str]:
    """An agentd environment in ``root``; the private CA only through ``[client] ca_file``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTD_", "AGENT_AUTH", "XDG_", "SSL_CERT"))
    }
    env.update(
        HOME=str(root / "home"),
        XDG_CONFIG_HOME=str(root / "config"),
        AGENTD_PATHS_STATE_DIR=str(root / "state"),
        AGENTD_PATHS_AUTH_FILE=str(root / "auth.json"),
        LC_ALL="C.UTF-8",
    )
    if ca_file is not None:
        env["AGENTD_CLIENT_CA_FILE"] = str(ca_file)
    return env


def config_for(root: Path, *, ca_file: Path | None) -> Config:
    config = load_config(env=env_for(root, ca_file=ca_file))
    assert config.problems == (), config.problems
    return config


def catalog_for(server: OidcServer) -> Catalog:
    catalog = Catalog()
    for provider in CLIENTS:
        catalog.register(spec_for(provider, server.issuer))
    return catalog


def store_credentials(config: Config, server: OidcServer) -> None:
    store = CredentialStore(config.credentials_path)
    for provider in CLIENTS:
        store.put(
            provider,
            credentials_for(
                provider, basic_secret=server.basic_secret, post_secret=server.post_secret
            ),
        )


def browser_trust(server: OidcServer) -> ssl.SSLContext:
    assert server.ca_file is not None
    return ssl.create_default_context(cafile=str(server.ca_file))


def grants(server: OidcServer, grant_type: str) -> list[dict[str, object]]:
    client_id = CLIENTS[PROVIDER][0]
    return [
        g
        for g in server.grants()
        if g.get("client_id") == client_id and g.get("grant_type") == grant_type
    ]


async def connect_through(config: Config, server: OidcServer, catalog: Catalog) -> str:
    """A whole connect over the agentd composition (open_context); the flow id."""
    async with open_context(config, catalog=catalog) as ctx:
        start = await ctx.broker.begin(PROVIDER, redirect_uri=WEB_REDIRECT, actor="test")
        query = await follow_to_redirect(
            start.authorize_url, WEB_REDIRECT, verify=browser_trust(server)
        )
        await ctx.engine.record_callback(parse_callback(query), actor="test")
        await ctx.broker.complete_state(start.state, actor="test")
        return start.flow.id


@pytest.mark.anyio
async def test_exchange_and_refresh_trust_the_private_ca_through_ca_file(
    tmp_path: Path, oidc_tls_server: OidcServer
) -> None:
    assert SPECIAL in oidc_tls_server.basic_secret
    assert oidc_tls_server.issuer.startswith("https://localhost:")
    config = config_for(tmp_path, ca_file=oidc_tls_server.ca_file)
    store_credentials(config, oidc_tls_server)
    catalog = catalog_for(oidc_tls_server)
    flow_id = await connect_through(config, oidc_tls_server, catalog)
    async with open_context(config, catalog=catalog) as ctx:
        (status,) = await ctx.broker.status()
        assert (status.flow_id, status.state) == (flow_id, "stored")
        assert (status.scopes, status.scope_source) == (("openid", "offline_access"), "granted")
        before = ctx.tokens.read(PROVIDER)
        refreshed = await ctx.broker.refresh(PROVIDER, actor="test", force=True)
        assert before is not None
        assert refreshed.access != before.access
    entry = json.loads((tmp_path / "auth.json").read_text())[PROVIDER]
    assert (entry["scope"], entry["scope_source"]) == ("openid offline_access", "granted")
    assert [g["status"] for g in grants(oidc_tls_server, "authorization_code")][-1] == 200
    assert [g["status"] for g in grants(oidc_tls_server, "refresh_token")][-1] == 200


@pytest.mark.anyio
async def test_without_ca_file_the_exchange_fails_with_one_tls_line(
    tmp_path: Path, oidc_tls_server: OidcServer
) -> None:
    config = config_for(tmp_path, ca_file=None)  # the system CAs only
    store_credentials(config, oidc_tls_server)
    exchanges = len(grants(oidc_tls_server, "authorization_code"))
    async with open_context(config, catalog=catalog_for(oidc_tls_server)) as ctx:
        start = await ctx.broker.begin(PROVIDER, redirect_uri=WEB_REDIRECT, actor="test")
        query = await follow_to_redirect(
            start.authorize_url, WEB_REDIRECT, verify=browser_trust(oidc_tls_server)
        )
        await ctx.engine.record_callback(parse_callback(query), actor="test")
        with pytest.raises(ProviderTLSError) as info:
            await ctx.broker.complete_state(start.state, actor="test")
        flow = await ctx.engine.get_flow(start.flow.id)
    assert info.value.message == f"cannot reach oidc-provider (client_secret_basic): {TLS_LINE}"
    assert (info.value.host, info.value.provider) == ("localhost", PROVIDER)
    assert flow.state is FlowState.FAILED
    assert flow.error_code == "tls_error"
    assert len(grants(oidc_tls_server, "authorization_code")) == exchanges  # never reached it


def run_cli(root: Path, *args: str, ca_file: Path | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agentd_command(), *args],
        env=env_for(root, ca_file=ca_file),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_the_cli_refreshes_through_ca_file_and_says_why_it_cannot_without(
    tmp_path: Path, oidc_tls_server: OidcServer
) -> None:
    import anyio

    ca_file = oidc_tls_server.ca_file
    # the provider in the user's catalog, the credentials through the CLI itself
    (tmp_path / "config" / "agent").mkdir(parents=True)
    spec = spec_for(PROVIDER, oidc_tls_server.issuer)
    (tmp_path / "config" / "agent" / "providers.toml").write_text(
        f"""
[providers.{PROVIDER}]
name = "{spec.name}"
authorize_url = "{spec.authorize_url}"
token_url = "{spec.token_url}"
revocation_url = "{spec.revocation_url}"
scopes = ["openid", "offline_access"]
token_auth_method = "client_secret_basic"
authorize_params = {{ prompt = "consent" }}
""",
        encoding="utf-8",
    )
    stored = subprocess.run(
        [*agentd_command(), "credentials", PROVIDER, "--client-id", "e2e-basic", "--secret-stdin"],
        input=oidc_tls_server.basic_secret + "\n",
        env=env_for(tmp_path, ca_file=ca_file),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert stored.returncode == 0, stored.stderr
    config = config_for(tmp_path, ca_file=ca_file)
    anyio.run(connect_through, config, oidc_tls_server, catalog_for(oidc_tls_server))

    status = run_cli(tmp_path, "status", ca_file=ca_file)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].endswith("  openid offline_access  -"), status.stdout

    auth = tmp_path / "auth.json"
    # due: `token` must refresh (the vault holds the connection's pair; auth.json shows it)
    vault = Vault(vault_root(tmp_path / "state")).provider(PROVIDER)
    with vault.locked():
        record = vault.read()
        assert record is not None
        assert record.tokens is not None
        expired = replace(record.tokens, expires=int(time.time() * 1000) - 1000)
        vault.write(expired, flow_id=record.flow_id, lineage=record.lineage)
    without = run_cli(tmp_path, "token", PROVIDER, ca_file=None)
    assert without.returncode == 5
    assert without.stdout == ""
    assert without.stderr.splitlines() == [
        f"error: cannot reach oidc-provider (client_secret_basic): {TLS_LINE}"
    ]
    with_ca = run_cli(tmp_path, "token", PROVIDER, ca_file=ca_file)
    assert with_ca.returncode == 0, with_ca.stderr
    assert with_ca.stdout == json.loads(auth.read_text())[PROVIDER]["access"] + "\n"


@pytest.mark.anyio
async def test_the_scopes_shown_are_the_granted_ones(
    tmp_path: Path, oidc_server: OidcServer
) -> None:
    # without prompt=consent oidc-provider grants no offline_access: "openid" only
    provider = "oidc-public"
    spec = replace(spec_for(provider, oidc_server.issuer), authorize_params={})
    catalog = Catalog()
    catalog.register(spec)
    config = config_for(tmp_path, ca_file=None)
    store_credentials(config, oidc_server)
    async with open_context(config, catalog=catalog) as ctx:
        start = await ctx.broker.begin(provider, redirect_uri=NATIVE_REDIRECT, actor="test")
        query = await follow_to_redirect(start.authorize_url, NATIVE_REDIRECT)
        await ctx.engine.record_callback(parse_callback(query), actor="test")
        tokens = await ctx.broker.complete_state(start.state, actor="test")
        (status,) = await ctx.broker.status()
    assert start.flow.scopes == ("openid", "offline_access")  # asked for
    assert (tokens.scope, tokens.extra["scope_source"]) == ("openid", "granted")
    assert (status.scopes, status.scope_source) == (("openid",), "granted")
    entry = json.loads((tmp_path / "auth.json").read_text())[provider]
    assert entry["scope"] == "openid"


def test_basic_auth_without_form_encoding_is_refused_by_the_server(
    oidc_server: OidcServer,
) -> None:
    # why we build the header ourselves: Authlib's ClientAuth sends the raw secret
    client_id = CLIENTS[PROVIDER][0]
    form = "grant_type=authorization_code&code=not-a-code&redirect_uri=" + WEB_REDIRECT

    def answer(authorization: str) -> httpx.Response:
        return httpx.post(
            f"{oidc_server.issuer}/token",
            content=form,
            headers={
                "Authorization": authorization,
                "Content-Type": "application/x-www-form-urlencoded",
            },
            timeout=30,
        )

    _, headers, _ = ClientAuth(client_id, oidc_server.basic_secret, "client_secret_basic").prepare(
        "POST", "/token", {}, form
    )
    raw = base64.b64decode(headers["Authorization"][6:]).decode()
    assert raw == f"{client_id}:{oidc_server.basic_secret}"  # not encoded
    refused = answer(headers["Authorization"])
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "invalid_request",
        "error_description": "client_id and client_secret in the authorization header are not"
        " properly encoded",
    }
    # ours authenticates the client: the server goes on to refuse the bogus code instead
    ours = answer(basic_auth_header(client_id, oidc_server.basic_secret))
    assert (ours.status_code, ours.json()["error"]) == (400, "invalid_grant")
