"""Rollouts into training completions: the prompt rebuilt from the lease (never taken from the
producer), rewards recomputed with the environment (``verification.rollouts``), the group's
advantages, and the logprobs the producer committed, the behaviour policy of the importance
ratio. An episode is trained on as the stream the model saw, its environment turns rebuilt here
(never the producer's) and masked out of the loss. A round's completions are then cut into one
batch per inner step.

>>> [len(b) for b in inner_batches(list(range(10)), 3)]
[3, 3, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from node.training.grpo import group_advantages
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload
from verification.rollouts import (
    lease_examples,
    prompt_ids,
    rebuild_samples,
    sample_tokens,
    score_rollouts,
)


@dataclass(frozen=True)
class Completion:
    prompt: list[int]
    tokens: list[int]
    """Every completion token, an episode's environment turns included."""
    behaviour: list[float]
    """Per token, the producer's logprob (0 for an environment's token)."""
    advantage: float
    reward: float
    sampled: list[bool] | None = None
    """Per token, whether the model sampled it: only those are trained on (None: all)."""


def training_examples(
    env: Any,
    tokenizer: Any,
    lease: Lease,
    payload: RolloutPayload,
    std_normalize: bool = False,
    scores: Any = None,
    rebuilt: Any = None,
) -> list[Completion]:
    """A leased payload as training completions (groups without reward spread left out);
    ``scores`` (``score_rollouts``'s) and ``rebuilt`` (``rebuild_samples``'s) if already made."""
    rebuilt = rebuilt if rebuilt is not None else rebuild_samples(env, tokenizer, lease, payload)
    if scores is None:
        scores = score_rollouts(env, tokenizer, lease, payload, rebuilt)
    rewards_G_S = torch.tensor([[s.reward for s in group] for group in scores])
    adv_G_S, keep_G = group_advantages(rewards_G_S, std_normalize)
    out = []
    for g, example in enumerate(lease_examples(env, lease)):
        if not keep_G[g]:
            continue
        prompt = prompt_ids(tokenizer, example.prompt)
        for s in range(lease.group_size):
            k = g * lease.group_size + s
            episode = rebuilt[k]
            logprobs = iter(sample_tokens(payload.samples[k])[1].tolist())
            behaviour = [next(logprobs) if m else 0.0 for m in episode.sampled]
            out.append(Completion(
                prompt, episode.stream, behaviour, float(adv_G_S[g, s]),
                float(rewards_G_S[g, s]), None if all(episode.sampled) else episode.sampled,
            ))  # fmt: skip
    return out


def inner_batches(examples: Sequence[Completion], h: int) -> list[Sequence[Completion]]:
    """A round's completions cut into ``h`` equal batches, one per inner step (the remainder
    left out; fewer batches when there are fewer completions than steps, none without any)."""
    size = max(1, len(examples) // h)
    return [b for b in (examples[i * size : (i + 1) * size] for i in range(h)) if b]
