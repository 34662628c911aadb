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

from envs.base import Environment, Example, MultiTurnEnvironment
from node.model.backends import Backend, FinishReason, Generation, Sampling
from protocol.leases import Lease
from protocol.rollouts import ComputeProfile, EnvTurn, RolloutPayload, Sample
from verification.episodes import Episode, turn_seed
from verification.rollouts import (
    completion_text,
    lease_examples,
    prompt_ids,
    sample_seeds,
    sample_tokens,
)


class Producer:
    def __init__(self, backend: Backend, tokenizer: Any) -> None:
        self.backend = backend
        self.tokenizer = tokenizer

    def produce(self, env: Environment, lease: Lease, adapter: str | None = None) -> RolloutPayload:
        """Every group of the lease, generated in one batch (an episode's turns: one batch per
        turn of the episodes still going), as a payload."""
        examples = lease_examples(env, lease)
        seeds = self.seeds(lease)
        sampling = self.sampling(lease)
        if isinstance(env, MultiTurnEnvironment):
            samples = self.episodes(env, examples, lease.group_size, seeds, sampling, adapter)
        else:
            per_example = [prompt_ids(self.tokenizer, ex.prompt) for ex in examples]
            prompts = [ids for ids in per_example for _ in range(lease.group_size)]
            generations = self.generate(prompts, seeds, sampling, adapter)
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

    def episodes(
        self,
        env: MultiTurnEnvironment,
        examples: list[Example],
        group_size: int,
        seeds: list[int],
        sampling: Sampling,
        adapter: str | None,
    ) -> list[Sample]:
        """Every sample's episode (``verification.episodes``): turn ``t`` of every episode
        still going is generated in one batch, on its stream so far, with ``turn_seed``."""
        n = len(examples) * group_size
        prompts = [prompt_ids(self.tokenizer, examples[k // group_size].prompt) for k in range(n)]
        runs = [Episode.start(env, examples[k // group_size], self.tokenizer) for k in range(n)]
        streams: list[list[int]] = [[] for _ in range(n)]
        model: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        turns: list[list[EnvTurn]] = [[] for _ in range(n)]
        reasons: list[FinishReason] = ["length"] * n
        active, turn = list(range(n)), 0
        while active:
            gens = self.generate([prompts[k] + streams[k] for k in active],
                                 [turn_seed(seeds[k], turn) for k in active],
                                 sampling, adapter)  # fmt: skip
            going = []
            for k, g in zip(active, gens, strict=True):
                model[k] += g.token_ids
                logprobs[k] += g.logprobs
                streams[k] += g.token_ids
                inserted = runs[k].after_model_turn(g.token_ids, g.finish_reason == "stop")
                if inserted is None:
                    reasons[k] = g.finish_reason
                    continue
                turns[k].append(EnvTurn(after=len(model[k]), token_ids=_u32(inserted)))
                streams[k] += inserted
                going.append(k)
            active, turn = going, turn + 1
        generations = [Generation(model[k], logprobs[k], reasons[k]) for k in range(n)]
        rewards = [run.score().reward for run in runs]
        return [
            self.sample(env, ex, k, seeds[k], generations[k], turns[k], rewards[k])
            for k, ex in ((k, examples[k // group_size]) for k in range(n))
        ]

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
        self,
        env: Environment,
        example: Example,
        k: int,
        seed: int,
        g: Generation,
        env_turns: list[EnvTurn] | None = None,
        reward: float | None = None,
    ) -> Sample:
        """Sample ``k`` of the payload: its model tokens ``g``, and for an episode its
        environment turns and reward (else scored here)."""
        if reward is None:
            reward = env.score(example, completion_text(self.tokenizer, g.token_ids)).reward
        return Sample(
            example_index=example.index,
            sample_index=k,
            seed=seed,
            token_ids=_u32(g.token_ids),
            logprobs=np.asarray(g.logprobs, dtype="<f4").tobytes(),
            finish_reason=g.finish_reason,
            reward=reward,
            env_turns=env_turns or [],
        )


def _u32(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def generate_rollouts(
    backend: Backend, tokenizer: Any, env: Environment, lease: Lease, adapter: str | None = None
) -> RolloutPayload:
    """An honest producer's payload for the lease."""
    return Producer(backend, tokenizer).produce(env, lease, adapter)


class _Exact(Producer):
    """An honest producer generating on another profile's thread count (``generate_as``)."""

    def __init__(self, backend: Any, profile: ComputeProfile) -> None:
        super().__init__(backend, backend.tokenizer)
        self.exact: Any = backend  # a TorchBackend: ``generate_as``
        self.profile = profile

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        return list(self.exact.generate_as(self.profile, prompts, seeds, sampling, adapter))


def regenerator(
    backend: Any,
    env: Environment,
    lease: Lease,
    profile: ComputeProfile | None,
    adapter: str | None = None,
) -> Callable[[], list[tuple[list[int], list[float]]]] | None:
    """The lease generated again exactly as a producer of ``profile`` generates it, episodes
    included (a verifier's ``verification.checks.Regenerate``), or None where this backend
    cannot reproduce its bits."""
    if profile is None or not getattr(backend, "reproduces", lambda _: False)(profile):
        return None
    exact = profile

    def regenerate() -> list[tuple[list[int], list[float]]]:
        payload = _Exact(backend, exact).produce(env, lease, adapter)
        return [(ids.tolist(), lps.tolist()) for ids, lps in map(sample_tokens, payload.samples)]

    return regenerate


def completion_tokens(payload: RolloutPayload) -> int:
    return sum(len(s.token_ids) // 4 for s in payload.samples)
