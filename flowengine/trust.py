"""The TLS trust of every HTTPS call the product makes: system CAs plus ``[client] ca_file``.

Its own module (stdlib only) so that a caller that needs nothing else of oauth_http, such
as ``agentd token --from`` (agentd/remote.py), does not load httpx and Authlib for it;
:mod:`flowengine.oauth_http` re-exports :func:`client_ssl_context`.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from .errors import ConfigError

__all__ = ["client_ssl_context"]


def client_ssl_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The trust of every HTTPS call: the system CA store plus ``ca_file`` (PEM) when given.

    Without any system CA (a bare container) certifi's bundle stands in for the store.
    Raises ConfigError when ``ca_file`` cannot be loaded.
    """
    context = ssl.create_default_context()
    if context.cert_store_stats()["x509_ca"] == 0:
        paths = ssl.get_default_verify_paths()
        if not (paths.capath and os.path.isdir(paths.capath)):
            import certifi

            context.load_verify_locations(cafile=certifi.where())
    if ca_file:
        path = Path(ca_file).expanduser()
        try:
            context.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError, ValueError) as err:
            raise ConfigError(
                f"cannot load {path} as a PEM CA bundle ({type(err).__name__})",
                key="client.ca_file",
            ) from None
    return context
