"""Run messages: the coordinator tells the network which runs exist and where they stand.

``RunStatus`` goes out on gossip whenever a run changes state or policy version, so inference
nodes know which versions are current and trainers know which runs to train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import msgspec

from protocol.adapters import TrainSettings
from protocol.codec import KiB, Message, Name, NonNegInt
from protocol.leases import SamplingParams

RunState = Literal["queued", "running", "completed", "failed", "cancelled"]


class RunStatus(Message):
    """Coordinator → gossip: a run's state and current policy version."""

    TYPE: ClassVar[str] = "runs.status"
    MAX_BYTES: ClassVar[int] = 4 * KiB
    run_id: Name
    state: RunState
    policy_version: NonNegInt
    max_staleness: NonNegInt
    base_model: Annotated[str, msgspec.Meta(max_length=512)]


@dataclass(frozen=True)
class RunPlan:
    """What to lease for one run."""

    run_id: str
    env: str
    """Canonical environment name (with arguments), as ``load_environment`` takes it."""
    env_version: str
    env_seed: int
    group_size: int
    sampling: SamplingParams
    base_model: str = "tiny"
    """Only nodes generating with this base model (their ``--model``) get this run's leases."""
    lease_ttl_s: float = 120.0
    total_examples: int | None = None
    """Stop issuing after this many examples (None: as many as trainers consume)."""
    prompts_per_lease: int = 8
    max_staleness: int = 2
    """Trainers of version ``v`` consume rollouts sampled at versions ``v - max_staleness`` to
    ``v``; older ones are never trained on."""
    training: TrainSettings = field(default_factory=TrainSettings)
    """What the run's trainers are told to train with."""
    audit_floor: float | None = None
    """Audit rate of trusted producers' rollouts of this run (None: the coordinator's)."""
    max_tokens: int | None = None
    """Most tokens the run may be billed (None: the owner's key budget alone)."""
    max_rounds: int | None = None
    """The run completes at this version."""
    target_reward: float | None = None
    """The run completes once a version's completions reach this mean reward..."""
    min_samples: int = 64
    """...measured on at least this many of them."""
