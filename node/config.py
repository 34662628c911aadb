"""A node's config (``bazaar node start``), loadable from TOML."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from protocol.membership import ROLES
from protocol.peer_limits import TransportLimits
from protocol.service.config import ConfigModel


class NodeConfig(ConfigModel):
    name: str = ""
    """Display name in ``bazaar network status``; empty means the host name."""
    roles: list[str] = ["inference"]
    """Roles this node takes: any of inference, trainer, verifier."""
    coordinator: str = ""
    """Coordinator multiaddr (``/ip4/.../tcp/.../p2p/...``), or its REST URL
    (``http://HOST:8700``, whose ``/health`` gives the multiaddrs; waited for up to a minute);
    empty means the one a local coordinator wrote to the data directory."""
    listen: str = "/ip4/0.0.0.0/tcp/0"
    """py-libp2p listen multiaddr; port 0 picks a free one."""
    metrics_listen: str = ""
    """HOST:PORT for this node's Prometheus ``/metrics``; empty disables it."""
    peers_refresh_s: float = Field(10.0, gt=0)
    """How often to ask the coordinator for peers to keep the gossip mesh full."""
    reconnect_max_backoff_s: float = Field(5.0, gt=0)
    """Longest wait between attempts to reach a lost coordinator (backoff doubles up to it)."""
    model: str = "tiny"
    """Base model: ``tiny`` (built here if missing), ``smollm2``, a Hugging Face id, a local
    directory, or a ``.gguf`` file. Runs name the same string; only theirs are leased to us."""
    model_cache: str = ""
    """Data directory whose ``models/`` holds built models; empty means this node's own. Nodes of
    one machine can share it so the tiny model is built once."""
    backend: Literal["torch", "vllm"] = "torch"
    """Generation backend: ``torch`` (transformers + peft, CPU or CUDA) or ``vllm`` (CUDA)."""
    device: str = "auto"
    """Torch device for the model: ``cpu``, ``cuda``, ``cuda:N``; ``auto`` picks CUDA if present."""
    torch_threads: int = Field(0, ge=0, le=256)
    """CPU threads torch may use; 0 keeps torch's default (all cores)."""
    preload: bool = False
    """Load the model when the node starts, not when the first lease reaches it, so the first
    lease's time is generation alone (the verifier and serving roles always load at start).
    ``bazaar up`` turns it on."""
    max_prompts_per_lease: int = Field(64, ge=1, le=4096)
    """Most examples to ask for in one lease (each is generated ``group_size`` times); the run's
    ``rl.prompts_per_lease`` decides below this. Lower it on a node whose memory cannot hold
    that many sequences at once."""
    payload_max_bytes: int = Field(1 << 30, gt=0)
    """Size cap of the local rollout payload store; the oldest payloads leave first."""
    payload_retention_s: float = Field(6 * 3600.0, gt=0)
    """How long rollout payloads are kept for verifiers and trainers to fetch."""
    serve: bool = False
    """Serve the base model (and loaded adapters) over an OpenAI-compatible HTTP endpoint, for
    the gateway to route requests to."""
    serve_listen: str = "127.0.0.1:0"
    """HOST:PORT of that endpoint; port 0 picks a free one (reported to the coordinator)."""
    serve_url: str = ""
    """The URL the gateway reaches that endpoint at, when it is not ``http://<serve_listen>``
    (listening on 0.0.0.0 in a container: ``http://node-1:8900``)."""
    serve_token_skew_s: float = Field(30.0, ge=0, le=3600)
    """How far the coordinator's clock may be off this node's: a serving token (what admitted
    gateways send, ``node/roles/serving_auth.py``) is accepted this long before it was issued
    and after it expired."""
    transport: TransportLimits = TransportLimits()
    """What one peer may hold of this process: deadlines, stream and byte budgets."""
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
