"""Training on episodes: the trainer sees the stream the model saw — its own rebuild of every
environment turn, never the producer's — and only model-sampled tokens carry loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.base import Message, Rubric
from envs.builtin.guess import Guess
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer
from node.training.examples import training_examples
from node.training.lora import LoraTrainer
from protocol.leases import Lease, SamplingParams
from tests.adversarial.cheaters import EditsEnvTurns
from verification.episodes import stream_of
from verification.rollouts import prompt_ids, rebuild_samples, sample_tokens

pytestmark = pytest.mark.timeout(300)


class Wordy(Guess):
    """The guessing game, rewarding the length of the model's replies: the tiny model never
    finds the number, and a group needs spread rewards to be trained on."""

    def __init__(self) -> None:
        super().__init__(high=4, max_turns=4)
        self.rubric = Rubric([self.chars])

    @staticmethod
    def chars(completion: list[Message]) -> float:
        return float(sum(len(m["content"]) for m in completion if m["role"] == "assistant"))


ENV = Wordy()


def _lease(n: int) -> Lease:
    return Lease(
        lease_id=f"train-{n}", run_id="demo", env_id=ENV.name, env_version=ENV.version,
        env_seed=n, example_indices=list(range(4)), group_size=4, policy_version=0,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8, max_turns=4),
        lease_seed=bytes([n + 7]) * 32, deadline_ms=0,
    )  # fmt: skip


def test_only_sampled_tokens_carry_loss_and_environment_turns_are_rebuilt(
    tiny_model: Path,
) -> None:
    backend = TorchBackend.from_pretrained(str(tiny_model))
    tok = backend.tokenizer
    lease = _lease(1)
    payload = Producer(backend, tok).produce(ENV, lease)
    completions = training_examples(ENV, tok, lease, payload)
    assert completions, "no group with reward spread: pick another lease seed"
    episodes = [c for c in completions if c.sampled is not None]
    assert episodes, "every episode ended in one turn"
    prompts = [prompt_ids(tok, ENV.example(lease.env_seed, i).prompt)
               for i in lease.example_indices]  # fmt: skip
    for c in completions:
        assert c.prompt in prompts
        mask = c.sampled if c.sampled is not None else [True] * len(c.tokens)
        assert len(mask) == len(c.tokens) == len(c.behaviour)
        assert all(b == 0.0 for b, m in zip(c.behaviour, mask, strict=True) if not m)
    # the trainer counts exactly the model's tokens (the adapter is fresh: no ratio is extreme)
    trainer = LoraTrainer(str(tiny_model), "demo", inner_lr=1e-3)
    stats = trainer.inner_step(episodes)
    sampled = sum(sum(c.sampled or []) for c in episodes)
    assert stats.tokens == sampled < sum(len(c.tokens) for c in episodes)
    assert stats.masked_fraction == 0.0
    # a producer that edited its environment turns: the trainer trains on the real ones
    forged = EditsEnvTurns(backend, tok).produce(ENV, lease)
    rebuilt = [r.stream for r in rebuild_samples(ENV, tok, lease, forged)]
    claimed = [stream_of(s, sample_tokens(s)[0].tolist())[0] for s in forged.samples]
    edited = [k for k in range(len(claimed)) if claimed[k] != rebuilt[k]]
    assert edited
    trained = [c.tokens for c in training_examples(ENV, tok, lease, forged)]
    assert trained and all(t in rebuilt for t in trained)
    assert not any(claimed[k] in trained for k in edited)
