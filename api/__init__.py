"""agentd-oauth's HTTP API: the OAuth callback, the pending long-poll and flow inspection.

Served by Hypercorn in-process, reachable only from the tailnet (see api/guard.py)::

    from api import ApiSettings, create_app, plan_serving, serve

Modules: app (create_app, error mapping), oauth (callback + pending), inspection (flows,
diagrams), tokens (``/v1/tokens``: access tokens for other machines by tailnet identity),
guard (source guard, Funnel refusal, owner check, naming token callers), auth (bearer), tailscale
(LocalAPI client, CLI fallback), tls (reloading SSLContext, certificate fetch),
serve (bind/redirect planning, Hypercorn), settings (ApiSettings, API token file).
"""

from __future__ import annotations

from .app import create_app
from .serve import ServePlan, plan_serving, serve
from .settings import ApiSettings, load_api_token
from .tailscale import LocalAPI, TailscaleCLI, TailscaleError

__all__ = [
    "ApiSettings",
    "LocalAPI",
    "ServePlan",
    "TailscaleCLI",
    "TailscaleError",
    "create_app",
    "load_api_token",
    "plan_serving",
    "serve",
]
