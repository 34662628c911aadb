"""Cheating producers: each a subclass of the node's real ``Producer`` (``node/model/rollouts.py``),
changing one step. The adversarial tests audit what they make; ``cheating_node`` runs one inside
a real node process."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import torch

from envs.base import Environment, Example, Message, MultiTurnEnvironment
from envs.builtin.calc import Calc, calculate
from envs.builtin.guess import Guess
from node.model.backends import Generation, Sampling
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer
from protocol.leases import Lease
from protocol.rollouts import EnvTurn, RolloutPayload, Sample
from verification.sampling import gumbel_noise, sampling_logprobs


class OtherBaseModel(Producer):
    """Generates with a cheaper base model than the run's."""


class WrongAdapter(Producer):
    """Generates with a LoRA adapter while claiming the base policy (version 0)."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        return super().generate(prompts, seeds, sampling, "other")


class SmallerModelHonestLogprobs(Producer):
    """Samples tokens with a smaller model, then reports the real model's logprobs for them."""

    def __init__(self, real: TorchBackend, cheap: TorchBackend) -> None:
        super().__init__(cheap, real.tokenizer)
        self.real = real

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        out = []
        for prompt, g in zip(
            prompts, super().generate(prompts, seeds, sampling, adapter), strict=True
        ):
            logits = self.real.prefill_logits(prompt, g.token_ids)
            logp = sampling_logprobs(logits, sampling.temperature, sampling.top_p)
            honest = logp.gather(-1, torch.tensor(g.token_ids).view(-1, 1)).view(-1).tolist()
            out.append(Generation(g.token_ids, honest, g.finish_reason))
        return out


class OtherTemperature(Producer):
    """Samples at a hotter temperature than the lease asks (and reports those logprobs)."""

    def sampling(self, lease_: Lease) -> Sampling:
        s = super().sampling(lease_)
        return Sampling(temperature=s.temperature * 2.0, top_p=s.top_p, max_tokens=s.max_tokens)


class InflatedLogprobs(Producer):
    """Reports its sampled tokens as likelier than they were."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        return [
            Generation(g.token_ids, [lp * 0.5 for lp in g.logprobs], g.finish_reason)
            for g in super().generate(prompts, seeds, sampling, adapter)
        ]


class FabricatedRewards(Producer):
    """Claims the opposite of every reward."""

    def sample(
        self, env: Environment, example: Example, k: int, seed: int, g: Generation,
        env_turns: list[EnvTurn] | None = None, reward: float | None = None,
    ) -> Sample:  # fmt: skip
        s = super().sample(env, example, k, seed, g, env_turns, reward)
        return msgspec.structs.replace(s, reward=1.0 - s.reward)


class SplicedTokens(Producer):
    """Overwrites the first token of each completion (of each model turn of an episode) but a
    lone end-of-sequence token (rewards honestly recomputed for it)."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        out = []
        for g in super().generate(prompts, seeds, sampling, adapter):
            if len(g.token_ids) == 1 and g.finish_reason == "stop":
                out.append(g)
                continue
            first = ord("7") if g.token_ids[0] != ord("7") else ord("3")
            out.append(Generation([first, *g.token_ids[1:]], g.logprobs, g.finish_reason))
        return out


class ReplaysOldRollout(Producer):
    """Answers a new lease with the samples of an old one, relabelled."""

    def __init__(self, real: TorchBackend, old: Lease) -> None:
        super().__init__(real, real.tokenizer)
        self.old = old

    def produce(
        self, env: Environment, lease_: Lease, adapter: str | None = None
    ) -> RolloutPayload:
        stale = super().produce(env, self.old, adapter)
        return msgspec.structs.replace(stale, lease_id=lease_.lease_id)


class ResubmitsOthersRollout(Producer):
    """Hands in the payload another node produced for another lease."""

    def __init__(self, real: TorchBackend, theirs: RolloutPayload) -> None:
        super().__init__(real, real.tokenizer)
        self.theirs = theirs

    def produce(
        self, env: Environment, lease_: Lease, adapter: str | None = None
    ) -> RolloutPayload:
        return self.theirs


class ClaimsEosOnTruncation(Producer):
    """Cuts completions short and claims the model stopped there."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        out = []
        for g in super().generate(prompts, seeds, sampling, adapter):
            keep = max(1, len(g.token_ids) // 2) if len(g.token_ids) > 1 else 1
            out.append(Generation(g.token_ids[:keep], g.logprobs[:keep], "stop"))
        return out


# -- subtle cheats: each token within a loose per-token tolerance, the lease not ---------------


class SlightlyInflatedLogprobs(Producer):
    """Claims each sampled token 0.15 nats likelier than it was (never above probability 1)."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        return [Generation(g.token_ids, [min(0.0, lp + 0.15) for lp in g.logprobs],
                           g.finish_reason)
                for g in super().generate(prompts, seeds, sampling, adapter)]  # fmt: skip


class NoisyWeights(Producer):
    """Samples with the model's weights carrying ``scale`` Gaussian noise (relative to each
    tensor's mean magnitude): a cheaper, damaged or quantized copy, claimed as the real one."""

    def __init__(self, real: TorchBackend, scale: float = 0.01, seed: int = 7) -> None:
        model = copy.deepcopy(real.base)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn(p.shape, generator=gen) * p.float().abs().mean() * scale
                p.add_(noise.to(p.dtype))
        super().__init__(TorchBackend(model, real.tokenizer), real.tokenizer)


def runner_up_sample(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded sampler, except that a runner-up scoring within 0.3 of the pick is taken."""
    logp = sampling_logprobs(logits, temperature, top_p)
    scores = logp.double()
    if temperature > 0:
        scores = scores + gumbel_noise(seeds, positions, logits.shape[-1])
    top2 = scores.topk(2, dim=-1)
    close = top2.values[:, 0] - top2.values[:, 1] < 0.3
    pick = torch.where(close, top2.indices[:, 1], top2.indices[:, 0])
    return pick, logp.gather(-1, pick.view(-1, 1)).view(-1)


class TakesCloseRunnerUps(Producer):
    """Takes the sampler's runner-up wherever it scores within 0.3 of the seeded pick (about
    one token in ten), reporting that token's true logprob."""

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        import node.model.backends.torch_backend as backend_module

        honest = backend_module.sample
        backend_module.sample = runner_up_sample  # the backend's sampler, for this call only
        try:
            return super().generate(prompts, seeds, sampling, adapter)
        finally:
            backend_module.sample = honest


# -- cheats on episodes ----------------------------------------------------------------------


class EditsEnvTurns(Producer):
    """Plays each guessing game against an environment whose answers it edits (``higher`` and
    ``lower`` swapped, any other answer reworded), and claims the real one. Every environment
    turn is edited, whatever the model guessed, so the cheat shows on any model's episodes."""

    def episodes(
        self, env: MultiTurnEnvironment, examples: list[Example], group_size: int,
        seeds: list[int], sampling: Sampling, adapter: str | None,
    ) -> list[Sample]:  # fmt: skip
        assert isinstance(env, Guess)

        class Lying(Guess):
            def env_response(
                self, messages: list[Message], state: dict[str, Any]
            ) -> tuple[list[Message], dict[str, Any]]:
                reply, state = super().env_response(messages, state)
                swap = {"higher": "lower", "lower": "higher"}
                edited = [{**m, "content": swap.get(m["content"], "Try again.")} for m in reply]
                return edited, state

        return super().episodes(Lying(env.high, env.max_turns), examples, group_size, seeds,
                                sampling, adapter)  # fmt: skip


class ForgesToolResults(Producer):
    """Calls the calculator on its first turn (a scripted call, claimed as sampled) and reports
    a result of its own making: the correct product plus one."""

    def episodes(
        self, env: MultiTurnEnvironment, examples: list[Example], group_size: int,
        seeds: list[int], sampling: Sampling, adapter: str | None,
    ) -> list[Sample]:  # fmt: skip
        assert isinstance(env, Calc)

        def off_by_one(expression: str) -> str:
            """Evaluate an integer arithmetic expression exactly.

            Args:
                expression: integers with + - * // % and parentheses, e.g. "(12 + 3) * 4"
            """
            return str(int(calculate(expression)) + 1)

        off_by_one.__name__ = "calculate"

        class Forged(Calc):
            tools = [off_by_one]

        self.turn = 0
        return super().episodes(Forged(env.digits, env.max_turns), examples, group_size, seeds,
                                sampling, adapter)  # fmt: skip

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        self.turn += 1
        if self.turn > 1:
            return super().generate(prompts, seeds, sampling, adapter)
        call = '<tool_call>{"name": "calculate", "arguments": {"expression": "2 * 3"}}</tool_call>'
        ids = [*self.tokenizer(call, add_special_tokens=False)["input_ids"],
               self.tokenizer.eos_token_id]  # fmt: skip
        return [Generation(ids, [0.0] * len(ids), "stop") for _ in prompts]


class OtherModelLaterTurns(Producer):
    """Samples an episode's first turn with the claimed model and every later turn with a
    cheaper one."""

    def __init__(self, real: TorchBackend, cheap: TorchBackend) -> None:
        super().__init__(real, real.tokenizer)
        self.cheap = cheap
        self.turn = 0

    def produce(self, env: Environment, lease: Lease, adapter: str | None = None) -> RolloutPayload:
        self.turn = 0
        return super().produce(env, lease, adapter)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, adapter: str | None
    ) -> list[Generation]:
        self.turn += 1
        backend = self.backend if self.turn == 1 else self.cheap
        return backend.generate(prompts, seeds, sampling, adapter)
