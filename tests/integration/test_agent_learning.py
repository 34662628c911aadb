"""Learning on episodes, fast: the tiny model plays the guessing game (three guesses at a number
from 1 to 4, told higher or lower) and GRPO on its episodes — environment turns masked, the
same producer, rebuild and LoRA trainer the network runs — raises its reward by a clear margin
within a minute. It starts out answering with letters; it learns to guess in range, then to
win."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from envs import load_environment
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer
from node.training.examples import Completion, training_examples
from node.training.lora import LoraTrainer
from protocol.leases import Lease, SamplingParams
from verification.rollouts import score_rollouts

pytestmark = pytest.mark.timeout(300)
ENV = load_environment("guess", high=4, max_turns=3)


class Loop:
    """On-policy GRPO in one process: sample with the trainer's current adapter, train."""

    def __init__(self, tiny_model: Path, tmp: Path) -> None:
        self.backend = TorchBackend.from_pretrained(str(tiny_model))
        self.producer = Producer(self.backend, self.backend.tokenizer)
        self.trainer = LoraTrainer(str(tiny_model), "guess", inner_lr=3e-3)
        self.tmp, self.count = tmp, 0

    def play(self, seed: int, prompts: int, group: int) -> tuple[list[Completion], float]:
        self.count += 1
        name = f"v{self.count}"
        self.backend.load_adapter(name, str(self.trainer.save(self.tmp / name)))
        lease = Lease(
            lease_id=f"learn-{seed}", run_id="learn", env_id=ENV.name, env_version=ENV.version,
            env_seed=seed, example_indices=list(range(prompts)), group_size=group,
            policy_version=0, lease_seed=seed.to_bytes(32, "little"), deadline_ms=0,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=6, max_turns=3),
        )  # fmt: skip
        payload = self.producer.produce(ENV, lease, adapter=name)
        self.backend.unload_adapter(name)
        tok = self.backend.tokenizer
        rewards = [s.reward for g in score_rollouts(ENV, tok, lease, payload) for s in g]
        return training_examples(ENV, tok, lease, payload), sum(rewards) / len(rewards)


def test_grpo_on_episodes_raises_the_reward_of_a_multi_turn_game(tiny_model: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop(tiny_model, Path(tmp))
        _, before = loop.play(7_777, 32, 4)  # fixed evaluation episodes and seeds
        trained_on_episodes = 0
        for step in range(50):
            examples, _ = loop.play(1_000 + step, 8, 8)
            trained_on_episodes += sum(c.sampled is not None for c in examples)
            if examples:
                loop.trainer.inner_step(examples)
        _, after = loop.play(7_777, 32, 4)
    assert trained_on_episodes > 0  # episodes of several turns, not single replies
    assert before < 0.1, before
    assert after > before + 0.2, (before, after)
