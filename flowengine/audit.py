"""The audit of token hand-outs: who got which provider's access token, when, from where.

Every access token the daemon hands to another machine (``GET /v1/tokens/<provider>``) is
recorded in the ledger's ``token_handouts`` table before the answer leaves: the caller's
identity as the policy names it (a login, or the device's tags), its node's MagicDNS
name and tailnet address, the provider, and the token as the first 8 hex digits of its
SHA-256 (the ledger's ``*_sha`` rule: enough to match a token seen in a log, useless to
an attacker). An identity's first hand-out of a provider also queues one notification
for the owner (kind ``first_handout``), in the same transaction.

The table is pruned as it grows (``Retention``): rows older than ``days`` and beyond the
newest ``max_rows`` go, on insert (every few hundred hand-outs or once a minute) and when
the daemon starts. The first-hand-out memory (``token_recipients``) is kept: it is one row
per identity and provider.

The values here are pure; the SQL is in ledger.py and the Broker records (``hand_out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .models import public_fields
from .vault import token_hash

__all__ = [
    "FIRST_HANDOUT",
    "Caller",
    "HandOutRecord",
    "Retention",
    "token_sha",
]

#: the notification kind of an identity's first hand-out of a provider
FIRST_HANDOUT = "first_handout"
#: hex digits of the SHA-256 prefix recorded per hand-out
SHA_DIGITS = 8


def token_sha(access: str) -> str:
    """The short name of an access token in the audit: 8 hex digits of its SHA-256."""
    return token_hash(access, SHA_DIGITS)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, as the tailnet named it."""

    #: the identity the policy and the audit name: a login, or the device's tags
    who: str
    #: the caller's node (MagicDNS name, "" when unknown)
    node: str
    #: its tailnet address
    address: str

    def describe(self) -> str:
        """``tag:ci on ci-runner.tailnet.ts.net (100.64.0.4)``: no secret, for log lines."""
        where = f"{self.node} ({self.address})" if self.node else self.address
        return f"{self.who} on {where}"

    def public(self) -> dict[str, str]:
        """As a notification's data carries it (the bot words it)."""
        return {"who": self.who, "node": self.node, "address": self.address}


@dataclass(frozen=True, slots=True)
class HandOutRecord:
    """One row of the audit."""

    id: int
    at: int  # epoch ms
    who: str
    node: str
    provider: str
    token_sha: str
    address: str
    flow_id: str | None = None

    def public(self) -> dict[str, Any]:
        """As ``agentd audit --json`` prints it."""
        return public_fields(self)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long and how many hand-out records are kept."""

    days: float = 90.0
    max_rows: int = 100_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.days) and self.days > 0):
            raise ValueError("days must be a positive number")
        if self.max_rows < 1:
            raise ValueError("max_rows must be at least 1")

    def cutoff_ms(self, now_ms: int) -> int:
        """Records at or before this (epoch ms) are past retention."""
        return now_ms - int(self.days * 86_400_000)
