"""The gateway's config (``bazaar gateway start``, ``bazaar keys ...``), loadable from TOML."""

from __future__ import annotations

from pydantic import Field

from protocol.service.config import ConfigModel


class GatewayConfig(ConfigModel):
    listen: str = "127.0.0.1:8800"
    """HOST:PORT of the OpenAI-compatible API."""
    coordinator_url: str = ""
    """The coordinator's REST URL; empty means the local coordinator's (``coordinator.json``)."""
    secret_file: str = ""
    """File holding this gateway's secret, as ``bazaar gateway admit NAME`` printed it on the
    coordinator's machine (the coordinator tells only the gateways it admits where serving nodes
    are, and gives them the tokens nodes require). ``BAZAAR_GATEWAY_SECRET``, when set, is used
    instead. The secret is never a plain config value, so a config file can be shared."""
    db: str = ""
    """SQLAlchemy database URL for keys and usage; empty means SQLite (WAL) at
    ``<data dir>/gateway.db``. ``postgresql://user:pass@host/db`` for PostgreSQL."""
    tokenizers: dict[str, str] = {}
    """Tokenizer to count each model's tokens with, by model name (a directory or hub id); a
    model not listed uses its own name. The gateway bills by its own count, never a node's."""
    refresh_s: float = 2.0
    """How often to re-read the serving nodes from the coordinator."""
    request_timeout_s: float = 300.0
    """Longest a forwarded request may take."""
    key_cache_s: float = 1.0
    """How long an authenticated key is trusted without asking the database again (so a revoked
    key stops working within this time)."""
    name: str = "gateway"
    """This gateway's name in the database: the budget it holds is recorded under it, and given
    back when a gateway of that name starts again. Gateways sharing a database need distinct
    names."""
    budget_hold_tokens: int = Field(8192, gt=0)
    """How much of a key's budget the gateway takes at a time to reserve requests against in
    memory (less when less is left); 0 database writes per request until it is used up."""
    budget_idle_s: float = Field(30.0, gt=0)
    """A key idle this long gets the unused part of its hold back."""
    settle_interval_s: float = Field(0.05, ge=0)
    """Bills are written this long after the first one waiting, together, in one transaction
    (their tokens stay counted in the gateway's hold until then)."""
    log_json: bool = False
    """Log JSON lines instead of human-readable lines."""
