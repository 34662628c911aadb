"""Learning on episodes with the producer, rebuild and LoRA trainer the network runs (GRPO,
environment turns masked), on-policy in one process.

Fast: the tiny model plays the guessing game (three guesses at a number from 1 to 4, told higher
or lower) and its reward rises by a clear margin within a minute — it starts out answering with
letters, learns to guess in range, then to win. Slow: the tiny agent model (warm-started on a
third of ``calc`` episodes, ``node/model/tiny_agent.py``) learns to use its calculator."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from envs import Environment, load_environment
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

    def __init__(
        self, model: Path, tmp: Path, env: Environment = ENV, lr: float = 3e-3, max_tokens: int = 6
    ) -> None:
        self.backend = TorchBackend.from_pretrained(str(model))
        self.producer = Producer(self.backend, self.backend.tokenizer)
        self.trainer = LoraTrainer(str(model), "learn", inner_lr=lr)
        self.env, self.max_tokens = env, max_tokens
        self.tmp, self.count = tmp, 0

    def play(self, seed: int, prompts: int, group: int) -> tuple[list[Completion], float]:
        self.count += 1
        name = f"v{self.count}"
        self.backend.load_adapter(name, str(self.trainer.save(self.tmp / name)))
        env = self.env
        lease = Lease(
            lease_id=f"learn-{seed}", run_id="learn", env_id=env.name, env_version=env.version,
            env_seed=seed, example_indices=list(range(prompts)), group_size=group,
            policy_version=0, lease_seed=seed.to_bytes(32, "little"), deadline_ms=0,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=self.max_tokens,
                                    max_turns=getattr(env, "max_turns", 1)),
        )  # fmt: skip
        payload = self.producer.produce(env, lease, adapter=name)
        self.backend.unload_adapter(name)
        tok = self.backend.tokenizer
        rewards = [s.reward for g in score_rollouts(env, tok, lease, payload) for s in g]
        return training_examples(env, tok, lease, payload), sum(rewards) / len(rewards)


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


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_grpo_teaches_the_agent_model_to_use_its_calculator(tiny_agent_model: Path) -> None:
    """``calc`` with 3-digit numbers: the answer is out of reach without the tool. The warm
    start solves about a third of its episodes greedily (fewer when sampling); GRPO on whole
    episodes — the call, the tool's answer (masked), the final reply — raises the reward."""
    env = load_environment("calc", digits=3)
    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop(tiny_agent_model, Path(tmp), env, lr=1e-3, max_tokens=96)
        _, before = loop.play(7_777, 32, 4)
        for step in range(60):
            examples, _ = loop.play(1_000 + step, 8, 8)
            if examples:
                loop.trainer.inner_step(examples)
        _, after = loop.play(7_777, 32, 4)
    assert after > before + 0.15, (before, after)
