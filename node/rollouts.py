"""From a lease to a rollout payload, and from a payload back to rewards.

Both directions derive everything they can from the lease alone, never from the producer: the
prompts are the environment's examples at the leased indices, and the seed of sample ``k`` (its
place in the lease: example position × group size + slot) is ``derive_seed(lease_seed, k,
policy_version)``. The producer generates every group of the lease in one batch and packs token
ids as little-endian uint32 and logprobs as float32. A consumer (trainer, verifier) rebuilds the
prompts the same way, checks the payload has exactly the samples the lease asked for, decodes
each completion and scores it with the environment — rewards are never read from a producer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.base import Environment, Example, Score
from node.backends import Backend, Sampling
from node.backends.torch_backend import prompt_ids
from node.sampling import derive_seed
from protocol.errors import DecodeError
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload, Sample


def lease_examples(env: Environment, lease: Lease) -> list[Example]:
    """The leased examples, regenerated from (environment, version, seed, index)."""
    if env.name != lease.env_id or env.version != lease.env_version:
        raise ValueError(
            f"lease wants {lease.env_id} v{lease.env_version}; "
            f"this environment is {env.name} v{env.version}"
        )
    return [env.example(lease.env_seed, i) for i in lease.example_indices]


def sample_seeds(lease: Lease) -> list[int]:
    """Every sample's seed, in lease order: what the node may not choose."""
    n = len(lease.example_indices) * lease.group_size
    return [derive_seed(lease.lease_seed, k, lease.policy_version) for k in range(n)]


def generate_rollouts(
    backend: Backend, tokenizer: Any, env: Environment, lease: Lease, adapter: str | None = None
) -> RolloutPayload:
    """Generate every group of the lease in one batch."""
    per_example = [prompt_ids(tokenizer, ex.prompt) for ex in lease_examples(env, lease)]
    prompts = [ids for ids in per_example for _ in range(lease.group_size)]
    s = lease.sampling
    sampling = Sampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
    generations = backend.generate(prompts, sample_seeds(lease), sampling, adapter)
    samples = [
        Sample(
            example_index=lease.example_indices[k // lease.group_size],
            sample_index=k,
            token_ids=np.asarray(g.token_ids, dtype="<u4").tobytes(),
            logprobs=np.asarray(g.logprobs, dtype="<f4").tobytes(),
            finish_reason=g.finish_reason,
        )
        for k, g in enumerate(generations)
    ]
    return RolloutPayload(
        lease_id=lease.lease_id,
        run_id=lease.run_id,
        policy_version=lease.policy_version,
        samples=samples,
    )


def completion_tokens(payload: RolloutPayload) -> int:
    return sum(len(s.token_ids) // 4 for s in payload.samples)


def sample_tokens(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """``(token ids, logprobs)`` of a sample; ``DecodeError`` if the arrays do not pair up."""
    if len(sample.token_ids) % 4 or len(sample.token_ids) != len(sample.logprobs):
        raise DecodeError(f"sample {sample.sample_index}: token and logprob arrays do not match")
    return (
        np.frombuffer(sample.token_ids, dtype="<u4"),
        np.frombuffer(sample.logprobs, dtype="<f4"),
    )


def check_shape(lease: Lease, payload: RolloutPayload) -> None:
    """The payload holds exactly the lease's samples, in order; ``DecodeError`` otherwise."""
    if (payload.lease_id, payload.run_id, payload.policy_version) != (
        lease.lease_id,
        lease.run_id,
        lease.policy_version,
    ):
        raise DecodeError(f"payload is for lease {payload.lease_id}, not {lease.lease_id}")
    n = len(lease.example_indices) * lease.group_size
    expected = [(lease.example_indices[k // lease.group_size], k) for k in range(n)]
    got = [(s.example_index, s.sample_index) for s in payload.samples]
    if got != expected:
        raise DecodeError(f"payload samples do not match lease {lease.lease_id} ({len(got)}/{n})")


def score_rollouts(
    env: Environment, tokenizer: Any, lease: Lease, payload: RolloutPayload
) -> list[list[Score]]:
    """Rewards of every group, recomputed with the environment (one list per leased example)."""
    check_shape(lease, payload)
    examples = lease_examples(env, lease)
    groups: list[list[Score]] = []
    for i, example in enumerate(examples):
        group = payload.samples[i * lease.group_size : (i + 1) * lease.group_size]
        texts = [
            tokenizer.decode(sample_tokens(s)[0].tolist(), skip_special_tokens=True) for s in group
        ]
        groups.append(env.score_group(example, texts))
    return groups
