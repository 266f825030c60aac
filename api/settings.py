"""ApiSettings: everything the HTTP side needs to know, as one frozen value. [pure-ish]

Built by the composition root (agentd/context.py ``api_settings``) from the ``[server]``
section of agentd.toml; tests build it directly. The API bearer token is read from config
or from ``<state>/api-token`` (created 0600 on first start) by :func:`load_api_token`.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from flowengine.errors import ConfigError

__all__ = ["MODES", "ApiSettings", "Mode", "load_api_token", "token_matches"]

Mode = Literal["tls", "serve", "plain-test"]

#: tls: Hypercorn terminates TLS with the tailscaled certificate (Mode A);
#: serve: plain HTTP on loopback behind `tailscale serve` (Mode B);
#: plain-test: plain HTTP on loopback for tests and the demo, no identity at all
MODES: tuple[str, ...] = ("tls", "serve", "plain-test")

DEFAULT_SOCKET = "/var/run/tailscale/tailscaled.sock"


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the daemon's HTTP API is served and guarded."""

    mode: Mode = "tls"
    #: bind address; "" = the Tailscale IP (tls) or 127.0.0.1 (serve, plain-test)
    host: str = ""
    port: int = 8400
    #: port in the redirect URI; 0 = ``port`` (tls) or 443-less 8400 (serve)
    public_port: int = 0
    #: MagicDNS name (host.tailnet.ts.net); "" = ask tailscaled
    public_name: str = ""
    #: the exact redirect URI registered at providers; "" = derived from the name and port
    redirect_uri: str = ""
    cert_file: Path | None = None
    key_file: Path | None = None
    #: where a certificate pair fetched from tailscaled is written (0700 dir, 0600 files)
    tls_dir: Path | None = None
    api_token: str = field(default="", repr=False)
    #: tailnet logins (UserProfile.LoginName) allowed to reach the daemon; empty = any
    allowed_logins: tuple[str, ...] = ()
    allow_public_bind: bool = False
    localapi_socket: str = DEFAULT_SOCKET
    #: seconds between looks at the certificate files (tls mode)
    cert_check_interval: float = 30.0
    #: seconds between certificate fetches from tailscaled when it supplies the pair
    cert_refetch_interval: float = 6 * 3600.0
    #: longest ``?wait=`` a poller may ask for
    max_wait: float = 30.0
    #: the unix socket same-host clients (``agentd connect``) use; None = none
    local_socket: Path | None = None
    #: how long the callback page waits for the daemon's own exchange before answering
    callback_wait: float = 10.0
    #: a connection must send a complete request head this soon after it opened (or after
    #: its previous response); it is closed otherwise (slow and silent clients)
    header_timeout: float = 15.0
    #: the TLS handshake must finish within this many seconds
    handshake_timeout: float = 10.0
    #: LocalAPI whois answers wait at most this long (the guard fails closed after it)
    whois_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown server mode {self.mode!r}", key="server.mode")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.port} is not a TCP port", key="server.port")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                "cert_file and key_file go together", key="server.cert_file", hint="set both"
            )

    @property
    def owner_check(self) -> bool:
        """Whether callers must be one of ``allowed_logins``."""
        return bool(self.allowed_logins)

    def with_token(self, token: str) -> ApiSettings:
        return replace(self, api_token=token)


def load_api_token(path: Path, configured: str = "") -> str:
    """The bearer token: ``configured`` if set, else ``path`` (created 0600 when missing)."""
    if configured:
        return configured
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # another process created it a moment ago (or it was empty): use what is there
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented bearer token with the configured one."""
    if not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))
