"""What the API's handlers share: :class:`ApiContext` on ``app.extensions["agentd"]``.

A leaf of the api package: the app builds the context, the blueprints read it through
:func:`api_context`; none of them imports another for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from quart import current_app

from flowengine.access import AccessPolicy
from flowengine.broker import Broker
from flowengine.catalog import Catalog
from flowengine.engine import FlowEngine
from flowengine.ratelimit import Rate, TokenBuckets

from .settings import ApiSettings
from .tailscale import TailscaleClient

__all__ = ["ApiContext", "TokenAccess", "api_context", "provider_name"]


@dataclass
class TokenAccess:
    """The policy in force and the callers' token buckets (swapped on SIGHUP)."""

    policy: AccessPolicy = field(default_factory=AccessPolicy)
    buckets: TokenBuckets = field(default_factory=lambda: TokenBuckets(Rate(1.0, 30)))
    #: monotonic seconds (tests drive it)
    now: Callable[[], float] = time.monotonic


@dataclass(slots=True)
class ApiContext:
    """What handlers need, stored on the app as ``app.extensions["agentd"]``."""

    engine: FlowEngine
    settings: ApiSettings
    catalog: Catalog | None = None
    tailscale: TailscaleClient | None = None
    #: completes the flows the daemon owns; None: codes wait for their clients
    broker: Broker | None = None
    #: the redirect URI flows started here use (the serving plan's)
    redirect_uri: str = ""
    #: set when the daemon stops: long-polls answer 503 at once instead of being cut off
    stopping: anyio.Event = field(default_factory=anyio.Event)
    #: token hand-outs: the [[access]] policy and the callers' rate limits
    access: TokenAccess = field(default_factory=TokenAccess)


def api_context() -> ApiContext:
    ctx: ApiContext = current_app.extensions["agentd"]
    return ctx


def provider_name(provider_id: str) -> str:
    """The provider's display name from the catalog, else its id."""
    catalog = api_context().catalog
    if catalog is not None and provider_id in catalog:
        return catalog.get(provider_id).name
    return provider_id
