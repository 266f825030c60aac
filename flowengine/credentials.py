"""OAuth client credentials (client id, client secret), kept apart from the catalog.

One JSON file (default ``<state>/credentials.json``), mode 0600, written atomically under
an exclusive flock on ``credentials.json.lock``::

    {"dexcom": {"client_id": "...", "client_secret": "..."}}

A client this agent registered itself (RFC 7591, registration.py) also keeps what the
authorization server answered under ``registration`` (issuer, redirect URIs, grants, the
secret's expiry, the RFC 7592 registration access token and configuration URI)::

    {"mcp-example-com": {"client_id": "...", "registration": {"issuer": "...", ...}}}

Storing credentials by hand (:meth:`CredentialStore.put`) drops a stored registration.

Credentials never go to the ledger, a log line or an exception message; ``repr`` of
:class:`ClientCredentials` hides the secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TokenFileCorruptError
from .tokens import _FileLock, atomic_write_json, read_json_object, signature_of, write_without

__all__ = ["ClientCredentials", "CredentialStore"]


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """A registered OAuth client: its id and (for confidential clients) its secret."""

    client_id: str
    client_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id.strip():
            raise ValueError("client_id must be a non-empty string")
        if self.client_secret is not None and not isinstance(self.client_secret, str):
            raise ValueError("client_secret must be a string or None")

    @property
    def has_secret(self) -> bool:
        return bool(self.client_secret)


class CredentialStore:
    """Client credentials per provider id in a private JSON file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            from .paths import credentials_path

            path = credentials_path()
        self.path = Path(path)
        self._lock = _FileLock(self.path.with_name(self.path.name + ".lock"))
        #: the parsed file and the signature it had (re-read only when the file changes)
        self._cache: tuple[list[int] | None, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.path)!r})"

    def _read(self) -> dict[str, Any]:
        signature = signature_of(self.path)
        if signature is not None and self._cache is not None and self._cache[0] == signature:
            return dict(self._cache[1])
        try:
            data = read_json_object(self.path)
            self._cache = (signature, data)
            return dict(data)
        except TokenFileCorruptError as err:
            # same class, clearer words: it is the credentials file, not auth.json
            raise TokenFileCorruptError(
                f"{self.path} (client credentials) is not a JSON object; it was left"
                " untouched: fix or move it away",
                path=str(self.path),
            ) from err

    def get(self, provider: str) -> ClientCredentials | None:
        entry = self._read().get(provider)
        if not isinstance(entry, dict):
            return None
        client_id = entry.get("client_id")
        secret = entry.get("client_secret")
        if not isinstance(client_id, str) or not client_id:
            return None
        return ClientCredentials(
            client_id=client_id, client_secret=secret if isinstance(secret, str) else None
        )

    def put(
        self,
        provider: str,
        creds: ClientCredentials,
        *,
        registration: Mapping[str, Any] | None = None,
    ) -> None:
        """Store a client; ``registration``: what RFC 7591 registration answered (else a
        stored registration is dropped: these credentials were given by hand)."""
        with self._lock.hold():
            data = self._read()
            entry = dict(data.get(provider) or {}) if isinstance(data.get(provider), dict) else {}
            entry["client_id"] = creds.client_id
            if creds.client_secret:
                entry["client_secret"] = creds.client_secret
            else:
                entry.pop("client_secret", None)
            if registration is not None:
                entry["registration"] = dict(registration)
            else:
                entry.pop("registration", None)
            data[provider] = entry
            atomic_write_json(self.path, data)

    def registration(self, provider: str) -> dict[str, Any] | None:
        """The stored RFC 7591 registration answer of ``provider`` (secrets included), if any."""
        entry = self._read().get(provider)
        if not isinstance(entry, dict) or not isinstance(entry.get("registration"), dict):
            return None
        return dict(entry["registration"])

    def delete(self, provider: str) -> bool:
        with self._lock.hold():
            return write_without(self.path, self._read(), provider)

    def providers(self) -> list[str]:
        return sorted(p for p, v in self._read().items() if isinstance(v, dict))
