"""Lease messages: the coordinator hands rollout work to inference nodes.

An inference node asks with ``LeaseRequest``; the coordinator answers with a ``Lease`` naming the
prompts (environment examples), the group size, the policy version to sample with, the sampling
parameters and a deadline. ``lease_seed`` is coordinator randomness: every sample's seed is derived
from it, the sample index and the policy version, so the node cannot choose its own noise.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from protocol.codec import KiB, Message, Name, NonNegInt

MAX_TURNS = 65
"""Model turns an episode may hold: one more than the environment turns a sample carries."""


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    temperature: Annotated[float, msgspec.Meta(ge=0, le=10)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 256
    """Per model turn."""
    max_turns: Annotated[int, msgspec.Meta(ge=1, le=MAX_TURNS)] = 1
    """Model turns per sample at most: a multi-turn environment's, 1 for a single turn. A
    sample's tokens are at most ``max_tokens × max_turns`` (what a receipt may claim)."""


class LeaseRequest(Message):
    """Inference node → coordinator (lease protocol): I can take this much work."""

    TYPE: ClassVar[str] = "leases.request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    max_prompts: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    """The base model this node generates with (``--model``): only runs on it are leased."""
    adapter_versions: Annotated[dict[Name, NonNegInt], msgspec.Meta(max_length=256)] = {}
    """Adapter versions this node holds, by run id, so leases can avoid a fetch."""


class Lease(Message):
    """Coordinator → inference node: generate these samples by this deadline."""

    TYPE: ClassVar[str] = "leases.lease"
    MAX_BYTES: ClassVar[int] = 64 * KiB
    lease_id: Name
    run_id: Name
    env_id: Name
    env_version: Annotated[str, msgspec.Meta(max_length=32)]
    env_seed: int
    example_indices: Annotated[list[NonNegInt], msgspec.Meta(min_length=1, max_length=4096)]
    group_size: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    policy_version: NonNegInt
    sampling: SamplingParams
    lease_seed: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    deadline_ms: NonNegInt


class NoLease(Message):
    """Coordinator → inference node: no work now; ask again after ``retry_after_s``."""

    TYPE: ClassVar[str] = "leases.none"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
