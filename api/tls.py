"""The daemon's own TLS (Mode A): one SSLContext, reloaded in place when the pair changes.

Hypercorn builds its SSL context once. :class:`CertManager` owns that context; when the
certificate files change (``tailscale cert`` rewrites them atomically, so a new inode) it
calls ``load_cert_chain`` again on the *same* context: new handshakes get the new pair,
live connections keep the old one. :class:`TailscaleCertSource` fetches the pair from
tailscaled (LocalAPI or CLI) into a private 0700 directory as 0600 files; tailscaled
caches it and renews near expiry, so fetching every few hours is cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from flowengine.errors import ConfigError

from .tailscale import CertPair, TailscaleClient, TailscaleError

__all__ = ["CertManager", "TailscaleCertSource", "server_context"]

log = logging.getLogger("api.tls")

ALPN = ("h2", "http/1.1")


def server_context(alpn: Sequence[str] = ALPN) -> ssl.SSLContext:
    """A server-side context as Hypercorn would build it (TLS >= 1.2, no compression)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def _fingerprint(cert: bytes, key: bytes) -> str:
    return hashlib.sha256(cert + b"\0" + key).hexdigest()


class CertManager:
    """Owns the server SSLContext; ``reload_if_changed`` swaps in a new pair."""

    def __init__(self, cert_file: str | Path, key_file: str | Path) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.context = server_context()
        self.reloads = 0
        self._fingerprint = ""
        try:
            self._load()
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"cannot load the TLS certificate pair ({type(err).__name__}: {err})",
                file=str(self.cert_file),
                hint="run `tailscale cert` or check server.cert_file / server.key_file",
            ) from err

    def _read(self) -> tuple[bytes, bytes]:
        return self.cert_file.read_bytes(), self.key_file.read_bytes()

    def _load(self, cert: bytes | None = None, key: bytes | None = None) -> None:
        """Load one snapshot of the pair: first into a scratch context, then the live one.

        A failing ``load_cert_chain`` can leave a context half-updated (new certificate,
        old key: every handshake fails), so the live context only sees a pair that loaded.
        """
        if cert is None or key is None:
            cert, key = self._read()
        with tempfile.TemporaryDirectory(prefix="agentd-tls-") as tmp:
            cert_copy, key_copy = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            for path, data in ((cert_copy, cert), (key_copy, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            server_context().load_cert_chain(certfile=cert_copy, keyfile=key_copy)
            self.context.load_cert_chain(certfile=cert_copy, keyfile=key_copy)
        self._fingerprint = _fingerprint(cert, key)

    def reload_if_changed(self) -> bool:
        """Load the files again if their bytes changed. A broken pair keeps the old one."""
        try:
            cert, key = self._read()
        except OSError as err:
            log.warning("certificate files unreadable, keeping the loaded pair: %s", err)
            return False
        if _fingerprint(cert, key) == self._fingerprint:
            return False
        try:
            self._load(cert, key)
        except (OSError, ssl.SSLError) as err:
            # e.g. the key was replaced but the certificate not yet: try again next round
            log.warning("new certificate pair not loadable yet, keeping the old one: %s", err)
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every ``interval`` seconds, forever (run it in a task group)."""
        while True:
            await anyio.sleep(interval)
            self.reload_if_changed()


def _write_private(path: Path, data: bytes) -> None:
    """Atomic write of a 0600 file (temp file in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class TailscaleCertSource:
    """Fetches the node's certificate pair from tailscaled into ``directory``."""

    def __init__(self, client: TailscaleClient, domain: str, directory: Path) -> None:
        self.client = client
        self.domain = domain
        self.directory = Path(directory)
        self.cert_file = self.directory / f"{domain}.crt"
        self.key_file = self.directory / f"{domain}.key"

    async def fetch(self) -> bool:
        """Fetch the pair; write it (0600) only if it changed. True when the files changed."""
        pair: CertPair = await self.client.cert_pair(self.domain)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        changed = False
        # key first: a reader that sees the new certificate must find its key already there
        for path, data in ((self.key_file, pair.key_pem), (self.cert_file, pair.cert_pem)):
            try:
                same = path.read_bytes() == data
            except FileNotFoundError:
                same = False
            if not same:
                _write_private(path, data)
                changed = True
        return changed

    async def refresh_forever(self, manager: CertManager, interval: float) -> None:
        """Fetch every ``interval`` seconds and reload; errors are logged and retried."""
        while True:
            await anyio.sleep(interval)
            try:
                if await self.fetch():
                    manager.reload_if_changed()
            except TailscaleError as err:
                delay = err.retry_after or interval
                log.warning("certificate refresh failed (%s); next try in %.0fs", err, delay)
                await anyio.sleep(max(0.0, delay - interval))
