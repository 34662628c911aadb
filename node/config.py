"""A node's config (``bazaar node start``), loadable from TOML."""

from __future__ import annotations

from pydantic import Field, field_validator

from protocol.config import ConfigModel
from protocol.membership import ROLES


class NodeConfig(ConfigModel):
    name: str = ""
    """Display name in ``bazaar network status``; empty means the host name."""
    roles: list[str] = ["inference"]
    """Roles this node takes: any of inference, trainer, verifier."""
    coordinator: str = ""
    """Coordinator multiaddr (``/ip4/.../tcp/.../p2p/...``); empty means the one a local
    coordinator wrote to the data directory."""
    listen: str = "/ip4/0.0.0.0/tcp/0"
    """py-libp2p listen multiaddr; port 0 picks a free one."""
    metrics_listen: str = ""
    """HOST:PORT for this node's Prometheus ``/metrics``; empty disables it."""
    peers_refresh_s: float = Field(10.0, gt=0)
    """How often to ask the coordinator for peers to keep the gossip mesh full."""
    reconnect_max_backoff_s: float = Field(5.0, gt=0)
    """Longest wait between attempts to reach a lost coordinator (backoff doubles up to it)."""
    log_json: bool = False
    """Log JSON lines instead of human-readable lines."""

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; choose from {list(ROLES)}")
        if not roles:
            raise ValueError(f"give at least one role from {list(ROLES)}")
        return sorted(set(roles), key=ROLES.index)
