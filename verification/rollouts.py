"""What any peer can rebuild from a lease alone: the canonical prompts, every sample's seed, and
the rewards of a completion.

Nothing here trusts the producer. The prompts are the environment's examples at the leased
indices, rendered with the model's chat template; the seed of sample ``k`` (its place in the lease:
example position × group size + slot) is ``derive_seed(lease_seed, k, policy_version)``; a reward
is the environment's score of the decoded completion. Producers, verifiers and trainers all call
these same functions, so "the canonical prompt" has exactly one definition.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.base import Environment, Example, Score
from protocol.errors import DecodeError
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload, Sample
from verification.sampling import derive_seed


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of a chat prompt, ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; older releases a plain list
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


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


def sample_tokens(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """``(token ids, logprobs)`` of a sample; ``DecodeError`` if the arrays do not pair up."""
    if len(sample.token_ids) % 4 or len(sample.token_ids) != len(sample.logprobs):
        raise DecodeError(f"sample {sample.sample_index}: token and logprob arrays do not match")
    return (
        np.frombuffer(sample.token_ids, dtype="<u4"),
        np.frombuffer(sample.logprobs, dtype="<f4"),
    )


def count_tokens(payload: RolloutPayload) -> int:
    """Completion tokens in a payload; ``DecodeError`` if a sample's arrays do not pair up."""
    return sum(int(sample_tokens(s)[0].size) for s in payload.samples)


def completion_text(tokenizer: Any, token_ids: list[int]) -> str:
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))


def check_shape(lease: Lease, payload: RolloutPayload) -> None:
    """The payload holds exactly the lease's samples, in order; ``DecodeError`` otherwise."""
    if (payload.lease_id, payload.run_id) != (lease.lease_id, lease.run_id):
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
    groups: list[list[Score]] = []
    for i, example in enumerate(lease_examples(env, lease)):
        group = payload.samples[i * lease.group_size : (i + 1) * lease.group_size]
        texts = [completion_text(tokenizer, sample_tokens(s)[0].tolist()) for s in group]
        groups.append(env.score_group(example, texts))
    return groups
