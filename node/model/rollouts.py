"""From a lease to a rollout payload: the producer's side.

Every group of the lease is generated in one batch from the canonical prompts with the seeds the
lease dictates (``verification/rollouts.py``, the same functions a verifier replays with). Token
ids are packed as little-endian uint32, logprobs as float32. Each sample also carries its seed
and the producer's own reward: the seed lets an audit fail fast and by name when it is not the
derived one, and the reward is early progress for the run's dashboard, checked at audit and never
trained on — trainers recompute rewards themselves.

``Producer`` is what a node's model process runs; each step is a method, so the adversarial tests
build cheating nodes by subclassing it (another model, other seeds, tampered logprobs, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from envs.base import Environment, Example
from node.model.backends import Backend, Generation, Sampling
from protocol.leases import Lease
from protocol.rollouts import ComputeProfile, RolloutPayload, Sample
from verification.rollouts import completion_text, lease_examples, prompt_ids, sample_seeds


class Producer:
    def __init__(self, backend: Backend, tokenizer: Any) -> None:
        self.backend = backend
        self.tokenizer = tokenizer

    def produce(self, env: Environment, lease: Lease, adapter: str | None = None) -> RolloutPayload:
        """Every group of the lease, generated in one batch, as a payload."""
        examples = lease_examples(env, lease)
        per_example = [prompt_ids(self.tokenizer, ex.prompt) for ex in examples]
        prompts = [ids for ids in per_example for _ in range(lease.group_size)]
        seeds = self.seeds(lease)
        generations = self.generate(prompts, seeds, self.sampling(lease), adapter)
        samples = [
            self.sample(env, examples[k // lease.group_size], k, seeds[k], g)
            for k, g in enumerate(generations)
        ]
        return RolloutPayload(
            lease_id=lease.lease_id,
            run_id=lease.run_id,
            policy_version=lease.policy_version,
            samples=samples,
            profile=self.backend.profile,
        )

    def seeds(self, lease: Lease) -> list[int]:
        return sample_seeds(lease)

    def sampling(self, lease: Lease) -> Sampling:
        s = lease.sampling
        return Sampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        return self.backend.generate(prompts, seeds, sampling, adapter)

    def sample(
        self, env: Environment, example: Example, k: int, seed: int, g: Generation
    ) -> Sample:
        return Sample(
            example_index=example.index,
            sample_index=k,
            seed=seed,
            token_ids=np.asarray(g.token_ids, dtype="<u4").tobytes(),
            logprobs=np.asarray(g.logprobs, dtype="<f4").tobytes(),
            finish_reason=g.finish_reason,
            reward=env.score(example, completion_text(self.tokenizer, g.token_ids)).reward,
        )


def generate_rollouts(
    backend: Backend, tokenizer: Any, env: Environment, lease: Lease, adapter: str | None = None
) -> RolloutPayload:
    """An honest producer's payload for the lease."""
    return Producer(backend, tokenizer).produce(env, lease, adapter)


def regenerator(
    backend: Any, lease: Lease, profile: ComputeProfile | None, adapter: str | None = None
) -> Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float]]]] | None:
    """The lease's generation exactly as a producer of ``profile`` ran it (a verifier's
    ``verification.checks.Regenerate``), or None where this backend cannot reproduce its bits."""
    if profile is None or not getattr(backend, "reproduces", lambda _: False)(profile):
        return None
    sampling = Producer(backend, backend.tokenizer).sampling(lease)

    def regenerate(
        prompts: list[list[int]], seeds: list[int]
    ) -> list[tuple[list[int], list[float]]]:
        runs = backend.generate_as(profile, prompts, seeds, sampling, adapter)
        return [(g.token_ids, g.logprobs) for g in runs]

    return regenerate


def completion_tokens(payload: RolloutPayload) -> int:
    return sum(len(s.token_ids) // 4 for s in payload.samples)
