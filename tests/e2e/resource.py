"""A small protected resource (think: an MCP server) for the "connect anything" tests.

HTTPS on ``https://localhost:<port>`` with a trustme certificate, in a thread
(``http.server``). It protects a few paths, each showing one way of being discovered:

``/mcp``    401 with ``WWW-Authenticate: Bearer resource_metadata="<origin>/meta/mcp",
            scope="mcp:tools"``; the metadata (at a location only the challenge names) says
            ``resource = <origin>/mcp`` and names the authorization server
            ``<issuer>/oauth`` (RFC 8414 inserted-path metadata)
``/quiet``  401 with a bare ``WWW-Authenticate: Bearer``: the client must find
            ``/.well-known/oauth-protected-resource/quiet`` (RFC 9728 §3.1); its server is
            ``<issuer>/oidc`` (OpenID Connect appended-path metadata)
``/wrong``  401 whose metadata describes another resource (RFC 9728 §3.3: refused)

A request with ``Authorization: Bearer <jwt>`` is answered 200 with the token's claims when
the JWT verifies against the authorization server's JWKS (RS256), is not expired, and its
``aud`` is exactly the resource; else 401 ``error="invalid_token"`` (RFC 6750 §3.1).

``set_authorization_server(path, issuer)`` changes what a resource's metadata names (the
tests use it to see the client validate metadata again when it changed). Every request is
recorded in ``requests`` (method, path, whether a bearer token came).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import trustme
from joserfc import jwt
from joserfc.jwk import KeySet


@dataclass
class ProtectedResource:
    origin: str
    #: resource path -> the authorization server issuer its metadata names
    servers: dict[str, str]
    ca_file: Path
    requests: list[tuple[str, str, bool]] = field(default_factory=list)
    _jwks: dict[str, KeySet] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def set_authorization_server(self, path: str, issuer: str) -> None:
        with self._lock:
            self.servers[path] = issuer

    def metadata(self, path: str, *, lie: bool = False) -> dict[str, Any]:
        with self._lock:
            issuer = self.servers[path]
        return {
            "resource": self.url("/elsewhere" if lie else path),
            "authorization_servers": [issuer],
            "scopes_supported": ["mcp:tools", "mcp:read"],
            "bearer_methods_supported": ["header"],
            "resource_name": f"Test MCP server {path}",
        }

    def keys(self, issuer: str) -> KeySet:
        with self._lock:
            cached = self._jwks.get(issuer)
        if cached is not None:
            return cached
        with httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca_file))) as client:
            meta_url = issuer.replace("https://", "").split("/", 1)
            host, tenant = meta_url[0], meta_url[1]
            meta = client.get(f"https://{host}/.well-known/oauth-authorization-server/{tenant}")
            if meta.status_code != 200:
                meta = client.get(f"{issuer}/.well-known/openid-configuration")
            keys = KeySet.import_key_set(client.get(meta.json()["jwks_uri"]).json())
        with self._lock:
            self._jwks[issuer] = keys
        return keys

    def check(self, path: str, token: str) -> dict[str, Any] | None:
        """The claims of a token valid for this resource, else None."""
        with self._lock:
            issuer = self.servers[path]
        try:
            decoded = jwt.decode(token, self.keys(issuer), algorithms=["RS256"])
        except Exception:  # noqa: BLE001 - any failure is "invalid_token"
            return None
        claims = dict(decoded.claims)
        if claims.get("aud") != self.url(path) or claims.get("iss") != issuer:
            return None
        if float(claims.get("exp", 0)) <= time.time():
            return None
        return claims


def _handler(resource: ProtectedResource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            return

        def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            auth = self.headers.get("Authorization", "")
            resource.requests.append(("GET", path, auth.startswith("Bearer ")))
            if path == "/meta/mcp":
                return self._json(200, resource.metadata("/mcp"))
            if path == "/meta/wrong":
                return self._json(200, resource.metadata("/wrong", lie=True))
            if path == "/.well-known/oauth-protected-resource/quiet":
                return self._json(200, resource.metadata("/quiet"))
            if path not in resource.servers:
                return self._json(404, {"error": "not_found"})
            if auth.startswith("Bearer "):
                claims = resource.check(path, auth.removeprefix("Bearer ").strip())
                if claims is not None:
                    return self._json(
                        200, {"ok": True, "aud": claims["aud"], "sub": claims.get("sub")}
                    )
                return self._json(
                    401,
                    {"error": "invalid_token"},
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            if path == "/quiet":
                challenge = "Bearer"
            else:
                named = "/meta/mcp" if path == "/mcp" else "/meta/wrong"
                challenge = f'Bearer resource_metadata="{resource.url(named)}", scope="mcp:tools"'
            return self._json(401, {"error": "unauthorized"}, {"WWW-Authenticate": challenge})

    return Handler


@contextmanager
def running_resource(
    issuer_origin: str, ca: trustme.CA, ca_file: Path
) -> Iterator[ProtectedResource]:
    """The protected resource on a random port of 127.0.0.1 (``https://localhost:<port>``)."""
    cert = ca.issue_cert("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    resource = ProtectedResource(
        origin="",
        servers={
            "/mcp": f"{issuer_origin}/oauth",
            "/quiet": f"{issuer_origin}/oidc",
            "/wrong": f"{issuer_origin}/oauth",
        },
        ca_file=ca_file,
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(resource))
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    resource.origin = f"https://localhost:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="protected-resource", daemon=True)
    thread.start()
    try:
        yield resource
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
