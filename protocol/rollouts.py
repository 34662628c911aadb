"""Rollout messages: the producer keeps the payload and submits a signed receipt.

An inference node stores ``RolloutPayload`` in its content-addressed store and sends the
coordinator a ``RolloutReceipt`` with the payload's hash and token counts. Verifiers and trainers
fetch the payload from the producer with ``PayloadRequest``. Token ids travel as little-endian
uint32 arrays and logprobs as little-endian float32 arrays (``bytes``), which is compact and
decodes without a per-token Python object. A producer's claimed rewards are checked, never
trusted: consumers recompute them.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from protocol.codec import Hash32, KiB, Message, MiB, Name, NonNegInt

FinishReason = Literal["stop", "length"]
Dtype = Literal["fp32", "bf16", "fp16"]


MAX_THREADS = 256


class ComputeProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a node computes its model's logits: what an audit's thresholds depend on (a replay
    in another dtype, or on another kind of device, differs by more than last-bit noise)."""

    backend: Name
    """``torch`` or ``vllm``."""
    dtype: Dtype
    """The model's parameter and compute dtype."""
    device: Annotated[str, msgspec.Meta(max_length=128)]
    """``cpu:<instruction set torch dispatches to>`` (``cpu:AVX2``), or ``cuda:<device name>``."""
    threads: Annotated[int, msgspec.Meta(ge=0, le=MAX_THREADS)] = 0
    """CPU threads a generation ran on (0: not reproducible, as with vLLM's scheduler). Together
    with the rest of the profile it fixes the arithmetic: a CPU's bf16 matrix products split
    their sums by thread, so the same thread count on the same instruction set generates the
    same bits — what a verifier's exact replay needs (``verification.checks``)."""


MAX_ENV_TURNS = 64


class EnvTurn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Tokens the environment inserted into an episode (tool results, feedback, and the next
    assistant header): never sampled, so neither replayed nor trained on."""

    after: Annotated[int, msgspec.Meta(ge=1)]
    """How many of the sample's model-sampled tokens come before it."""
    token_ids: Annotated[bytes, msgspec.Meta(max_length=1 << 20)]
    """uint32 little-endian."""


class Sample(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """One completion: which example and sample slot, the tokens, their logprobs, why it ended.

    A multi-turn episode's model turns are all in ``token_ids`` (each but the last ends with an
    end-of-sequence token), the environment's turns between them in ``env_turns``; the stream
    the model saw is the two interleaved (``verification.episodes``)."""

    example_index: NonNegInt
    sample_index: NonNegInt
    """The sample's place in the lease (example position × group size + slot in the group);
    its sampling seed is derived from the lease seed, this index and the policy version."""
    seed: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    """The seed the producer sampled with (an audit fails at once if it is not the derived one)."""
    token_ids: Annotated[bytes, msgspec.Meta(max_length=4 << 20)]
    """uint32 little-endian, one per model-sampled completion token."""
    logprobs: Annotated[bytes, msgspec.Meta(max_length=4 << 20)]
    """float32 little-endian, the sampled token's logprob at each position."""
    finish_reason: FinishReason
    """Why the last model turn ended."""
    reward: float
    """The producer's own score: early progress on the run's dashboard, checked at audit, never
    trained on (trainers recompute rewards with the environment)."""
    env_turns: Annotated[list[EnvTurn], msgspec.Meta(max_length=MAX_ENV_TURNS)] = []
    """The environment's turns, in order (empty: a single-turn sample)."""


class RolloutPayload(Message):
    """Producer → verifier/trainer (payload protocol): the full samples of one lease."""

    TYPE: ClassVar[str] = "rollouts.payload"
    MAX_BYTES: ClassVar[int] = 32 * MiB
    lease_id: Name
    run_id: Name
    policy_version: NonNegInt
    samples: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=65536)]
    profile: ComputeProfile | None = None
    """How the producer computed the samples, signed with them: a verifier checks the payload
    with the thresholds calibrated for that profile against its own (``None``: its own)."""


class RolloutReceipt(Message):
    """Producer → coordinator: I produced this payload for this lease; here is its hash."""

    TYPE: ClassVar[str] = "rollouts.receipt"
    MAX_BYTES: ClassVar[int] = 4 * KiB
    lease_id: Name
    run_id: Name
    policy_version: NonNegInt
    payload_hash: Hash32
    num_samples: NonNegInt
    completion_tokens: NonNegInt
    profile: ComputeProfile | None = None
    """The profile the payload declares: the coordinator hands its audit to a verifier that can
    replay that dtype (the payload's own declaration is what the audit judges by)."""


ReceiptOutcomeName = Literal[
    "counted",
    "duplicate",
    "unknown_lease",
    "wrong_node",
    "wrong_version",
    "wrong_size",
    "duplicate_payload",
    "too_many_tokens",
]


class ReceiptAck(Message):
    """Coordinator → producer: what became of a receipt (resending one is harmless)."""

    TYPE: ClassVar[str] = "rollouts.receipt_ack"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    lease_id: Name
    outcome: ReceiptOutcomeName
    counted_examples: NonNegInt
    """How many of the lease's examples this receipt counted for (0 unless ``counted``)."""


class PayloadRequest(Message):
    """Verifier/trainer → producer: send me the payload with this hash."""

    TYPE: ClassVar[str] = "rollouts.payload_request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    payload_hash: Hash32
