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

from envs.base import Environment, Example, MultiTurnEnvironment, Score
from protocol.errors import DecodeError
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload, Sample
from verification.episodes import EpisodeMismatch, Rebuilt, rebuild
from verification.seeds import derive_seed


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


def eos_ids_of(tokenizer: Any) -> set[int]:
    """The end-of-sequence ids that end a model turn, as peers without the model know them."""
    return {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()


def rebuild_samples(
    env: Environment,
    tokenizer: Any,
    lease: Lease,
    payload: RolloutPayload,
    eos_ids: set[int] | None = None,
) -> list[Rebuilt]:
    """Every sample's episode rebuilt from its model tokens alone (``verification.episodes``;
    a single-turn sample is its one turn); ``DecodeError`` if the payload is not the lease's or
    a sample's turns fit no episode."""
    check_shape(lease, payload)
    examples = lease_examples(env, lease)
    eos = eos_ids if eos_ids is not None else eos_ids_of(tokenizer)
    out = []
    for k, s in enumerate(payload.samples):
        try:
            ids = sample_tokens(s)[0].tolist()
            out.append(rebuild(env, examples[k // lease.group_size], tokenizer, ids, eos))
        except EpisodeMismatch as e:
            raise DecodeError(f"sample {s.sample_index}: {e}") from None
    return out


def score_rollouts(
    env: Environment,
    tokenizer: Any,
    lease: Lease,
    payload: RolloutPayload,
    rebuilt: list[Rebuilt] | None = None,
) -> list[list[Score]]:
    """Rewards of every group, recomputed with the environment (one list per leased example),
    on the episodes rebuilt from the samples' model tokens (``rebuilt``, if already made)."""
    rebuilt = rebuilt if rebuilt is not None else rebuild_samples(env, tokenizer, lease, payload)
    g, groups = lease.group_size, []
    for i, example in enumerate(lease_examples(env, lease)):
        group = rebuilt[i * g : (i + 1) * g]
        if isinstance(env, MultiTurnEnvironment):  # each episode with its own final state
            groups.append([r.score(env, example) for r in group])
        else:
            groups.append(env.score_group(example, [r.completion for r in group]))
    return groups
