"""Admitted gateways: the only callers that learn where the serving nodes are, and the serving
tokens that open those nodes to them.

A node's serving endpoint answers nothing without a serving token (``protocol/serving_tokens.py``),
so the gateway, which checks API keys, holds budgets and records usage, is the one way in.

- **Admission** (``bazaar gateway admit NAME``, which writes the coordinator's database as
  ``bazaar keys`` writes the accounts one): a gateway gets a name and a random secret
  (``bzg-`` + 32 url-safe bytes), shown once and stored only as its SHA-256 (table
  ``gateways``). ``bazaar gateway revoke NAME`` ends it; ``admit --replace`` gives an admitted
  gateway a new secret, and the old one stops working at once.
- **Routes** (``GET /v1/network/routes``, the secret as ``Authorization: Bearer``): every live
  serving node's URL and models, each with a token for that node, signed by the coordinator and
  valid ``serving_token_ttl_s``. The secret is looked up in the database on every call, so an
  admission or revocation made by another process counts from the gateway's next refresh.
- **Rotation.** A node's token is issued again once half its life is over; the gateway reads
  the routes every ``refresh_s`` (seconds), so it always carries a token with half a TTL to go.
- **Revocation bound.** A revoked gateway gets no routes and no new tokens; a token it still
  holds opens its node until it expires. So its access ends within one TTL (5 minutes by
  default) plus the nodes' clock skew allowance (``serve_token_skew_s``, 30 s). That bound was
  chosen over telling nodes at once: a revocation is written to the database by another
  process, so the coordinator would have to poll for it and gossip a revocation list that every
  node keeps; the TTL gives the same guarantee, one knob (a shorter TTL costs one more signature
  per node and gateway per half TTL) and no new message. A gateway refused by the coordinator
  drops its routes at once, so an honest one stops at the next refresh.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from coordinator.db import GatewayRow
from coordinator.membership import NodeState
from protocol import serving_tokens
from protocol.identity import Identity

SECRET_PREFIX = "bzg-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class GatewayStore:
    """The ``gateways`` table: admit, revoke, list, authenticate."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def admit(self, name: str, replace: bool = False) -> tuple[str, GatewayRow]:
        """A new secret for gateway ``name``: ``(the secret, shown only now, its record)``.
        ``ValueError`` if the name is admitted already, unless ``replace`` (a new secret for
        it; a revoked name is admitted again)."""
        if not name or len(name) > 128:
            raise ValueError("a gateway name is 1 to 128 characters")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            row = s.get(GatewayRow, name)
            if row is not None and row.revoked_at is None and not replace:
                raise ValueError(
                    f"gateway {name!r} is admitted already; `bazaar gateway admit {name} "
                    f"--replace` gives it a new secret"
                )
            if row is None:
                row = GatewayRow(name=name, secret_hash="", admitted_at=0.0)
                s.add(row)
            row.secret_hash, row.revoked_at = hash_secret(secret), None
            row.admitted_at = time.time()
        return secret, row

    def revoke(self, name: str) -> bool:
        """False if no gateway of that name is admitted."""
        with Session(self.engine) as s, s.begin():
            row = s.get(GatewayRow, name)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = time.time()
            return True

    def all(self) -> list[GatewayRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(GatewayRow).order_by(GatewayRow.admitted_at)))

    def authenticate(self, presented: str) -> str | None:
        """The name of the admitted gateway whose secret this is; None for anything else."""
        if not presented.startswith(SECRET_PREFIX):
            return None
        digest = hash_secret(presented)
        with Session(self.engine) as s:
            row = s.scalar(select(GatewayRow).where(GatewayRow.secret_hash == digest))
            if row is None or row.revoked_at is not None:
                return None
            return row.name if hmac.compare_digest(row.secret_hash, digest) else None


class Gateways:
    """Routes for admitted gateways, each with a serving token, issued again at half-life."""

    def __init__(
        self,
        store: GatewayStore,
        identity: Identity,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.identity, self.ttl_s, self.clock = store, identity, ttl_s, clock
        self._tokens: dict[str, dict[str, tuple[str, float]]] = {}
        """Per gateway, per node: its current token and when it expires. Replaced whole on
        every call, so it holds the nodes serving now and no others."""

    def routes(self, gateway: str, nodes: Iterable[NodeState]) -> list[dict[str, Any]]:
        """Every live serving node, with a token for ``gateway`` at it."""
        now = self.clock()
        held = self._tokens.get(gateway, {})
        fresh: dict[str, tuple[str, float]] = {}
        out = []
        for node in nodes:
            caps = node.capabilities
            if node.status != "alive" or not caps.serving_url or not caps.serving_models:
                continue
            token, expires_at = held.get(node.peer_id, ("", 0.0))
            if expires_at - now < self.ttl_s / 2:
                token = serving_tokens.issue(self.identity, gateway, node.peer_id, now, self.ttl_s)
                expires_at = now + self.ttl_s
            fresh[node.peer_id] = (token, expires_at)
            out.append({"peer_id": node.peer_id, "name": node.name, "url": caps.serving_url,
                        "models": list(caps.serving_models), "token": token,
                        "token_expires_at": expires_at})  # fmt: skip
        self._tokens[gateway] = fresh
        return out
