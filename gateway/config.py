"""The gateway's config (``bazaar gateway start``, ``bazaar keys ...``), loadable from TOML."""

from __future__ import annotations

from protocol.config import ConfigModel


class GatewayConfig(ConfigModel):
    listen: str = "127.0.0.1:8800"
    """HOST:PORT of the OpenAI-compatible API."""
    coordinator_url: str = ""
    """The coordinator's REST URL; empty means the local coordinator's (``coordinator.json``)."""
    db: str = ""
    """SQLAlchemy database URL for keys and usage; empty means SQLite (WAL) at
    ``<data dir>/gateway.db``. ``postgresql://user:pass@host/db`` for PostgreSQL."""
    log_json: bool = False
    """Log JSON lines instead of human-readable lines."""
