"""Driving a real authorization server from tests: catalog entries and the browser part."""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from flowengine.broker import Broker
from flowengine.catalog import Catalog, ProviderSpec
from flowengine.clock import ManualClock
from flowengine.credentials import ClientCredentials, CredentialStore
from flowengine.engine import FlowEngine
from flowengine.protocol import parse_callback
from flowengine.tokens import TokenSet, TokenStore

NATIVE_REDIRECT = "http://127.0.0.1/callback"
WEB_REDIRECT = "https://client.example.org/callback"

#: provider id -> (client id, auth method, redirect uri)
CLIENTS = {
    "oidc-public": ("e2e-public", "none", NATIVE_REDIRECT),
    "oidc-basic": ("e2e-basic", "client_secret_basic", WEB_REDIRECT),
    "oidc-post": ("e2e-post", "client_secret_post", WEB_REDIRECT),
}


def spec_for(provider: str, issuer: str) -> ProviderSpec:
    _, method, _ = CLIENTS[provider]
    return ProviderSpec(
        id=provider,
        name=f"oidc-provider ({method})",
        authorize_url=f"{issuer}/auth",
        token_url=f"{issuer}/token",
        revocation_url=f"{issuer}/token/revocation",
        scopes=("openid", "offline_access"),
        use_pkce=True,
        token_auth_method=method,  # type: ignore[arg-type]
        # oidc-provider issues refresh tokens only for offline_access with prompt=consent
        authorize_params={"prompt": "consent"},
        rotates_refresh_tokens=True,
    )


def credentials_for(provider: str, *, basic_secret: str, post_secret: str) -> ClientCredentials:
    client_id, method, _ = CLIENTS[provider]
    secret = {"client_secret_basic": basic_secret, "client_secret_post": post_secret}.get(method)
    return ClientCredentials(client_id, secret)


@dataclass
class Setup:
    root: Path
    issuer: str
    basic_secret: str
    post_secret: str

    def catalog(self) -> Catalog:
        catalog = Catalog()
        for provider in CLIENTS:
            catalog.register(spec_for(provider, self.issuer))
        return catalog

    def write_credentials(self) -> None:
        store = CredentialStore(self.root / "credentials.json")
        for provider in CLIENTS:
            store.put(
                provider,
                credentials_for(
                    provider, basic_secret=self.basic_secret, post_secret=self.post_secret
                ),
            )

    async def open_broker(
        self, http: httpx.AsyncClient, *, clock: ManualClock | None = None
    ) -> Broker:
        engine = await FlowEngine.open(
            self.root / "ledger.sqlite3", clock=clock or ManualClock(time.time())
        )
        return Broker(
            engine,
            catalog=self.catalog(),
            credentials=CredentialStore(self.root / "credentials.json"),
            tokens=TokenStore(self.root / "auth.json"),
            http=http,
        )


async def follow_to_redirect(
    url: str, redirect_uri: str, *, verify: ssl.SSLContext | bool = True
) -> str:
    """Play the browser: follow the authorize URL through login and consent.

    Returns the query string of the final redirect to ``redirect_uri`` (never requested).
    ``verify``: the browser's trust (an HTTPS server with a private CA needs it).
    """
    async with httpx.AsyncClient(timeout=30, verify=verify) as browser:
        for _ in range(12):
            response = await browser.get(url, follow_redirects=False)
            location = response.headers.get("location")
            if response.status_code not in (302, 303) or not location:
                raise AssertionError(
                    f"authorization stopped at HTTP {response.status_code}: {response.text[:300]}"
                )
            if location.startswith(redirect_uri):
                return urlsplit(location).query
            url = urljoin(url, location)
    raise AssertionError("too many redirects during authorization")


async def connect(broker: Broker, provider: str) -> TokenSet:
    """A whole connect: begin, the owner authorizes, the callback, the exchange."""
    _, _, redirect_uri = CLIENTS[provider]
    start = await broker.begin(provider, redirect_uri=redirect_uri, actor="test")
    query = await follow_to_redirect(start.authorize_url, redirect_uri)
    await broker.engine.record_callback(parse_callback(query), actor="test")
    return await broker.complete_state(start.state, actor="test")


_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"\s*/?>')


async def answer_device(
    verification_uri_complete: str, *, approve: bool, verify: ssl.SSLContext | bool = True
) -> str:
    """Play the owner at the device page without a browser: confirm (or deny) the user code.

    oidc-provider's pages: the complete URI auto-posts the code (form_post), the confirmation
    form carries ``confirm=yes`` (approve) or ``abort=yes`` (deny), then login and consent
    redirect through to the success page. Returns the last page's text.
    """
    async with httpx.AsyncClient(timeout=30, verify=verify, follow_redirects=True) as owner:
        page = await owner.get(verification_uri_complete)
        action = str(page.url).split("?", 1)[0]
        form = dict(_HIDDEN.findall(page.text))
        confirm = await owner.post(action, data=form)
        fields = dict(_HIDDEN.findall(confirm.text))
        if not approve:
            fields.pop("confirm", None)
            fields["abort"] = "yes"
        done = await owner.post(action, data=fields)
        done.raise_for_status()
        return done.text
