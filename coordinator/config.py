"""The coordinator's config (``bazaar coordinator start``), loadable from TOML."""

from __future__ import annotations

from pydantic import Field

from protocol.config import ConfigModel


class MembershipConfig(ConfigModel):
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60)
    """How often nodes heartbeat; sent to every node when it joins, so all agree on it."""
    suspect_after_missed: float = Field(1.5, gt=0)
    """A node is *suspect* once this many intervals pass without a heartbeat."""
    dead_after_missed: float = Field(3.0, gt=0)
    """A node is *dead* once this many intervals pass without a heartbeat."""
    peers_per_reply: int = Field(16, ge=1, le=1024)
    """How many live peers a joining node is told to dial, to keep a gossip mesh."""


class LeaseConfig(ConfigModel):
    max_active_per_node: int = Field(3, ge=1, le=64)
    """Unexpired leases one node may hold at once, so no node hoards a run's examples. A node
    pipelines three: one generating, one fetched ahead, one whose receipt is on its way."""
    retry_after_s: float = Field(1.0, gt=0, le=60)
    """How long a node told "no work" waits before asking again."""


class CoordinatorConfig(ConfigModel):
    listen: str = "/ip4/0.0.0.0/tcp/4001"
    """py-libp2p listen multiaddr (``/ip4/HOST/tcp/PORT``; port 0 picks a free one)."""
    http: str = "127.0.0.1:8700"
    """HOST:PORT of the REST API (``/health``, ``/metrics``, ``/v1/...``); port 0 picks one."""
    db: str = ""
    """SQLAlchemy database URL; empty means SQLite (WAL) at ``<data dir>/coordinator.db``.
    ``postgresql://user:pass@host/db`` for PostgreSQL."""
    membership: MembershipConfig = MembershipConfig()
    """Liveness rules."""
    leases: LeaseConfig = LeaseConfig()
    """How rollout work is handed out."""
    log_json: bool = False
    """Log JSON lines instead of human-readable lines."""
