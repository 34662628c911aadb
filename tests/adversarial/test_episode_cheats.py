"""Cheats on multi-turn episodes, audited by the real checks: an edited environment turn, a forged
tool result, a model turn sampled by another model, a turn after the episode ended, environment
turns left out — each caught by its check; honest episodes of every agent environment pass.

(The eleven cheats on single-turn payloads are run on episodes too: ``test_cheaters.py``.)
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from envs import Environment, load_environment
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer
from protocol.leases import Lease, SamplingParams
from protocol.rollouts import EnvTurn, RolloutPayload
from tests.adversarial.cheaters import EditsEnvTurns, ForgesToolResults, OtherModelLaterTurns
from verification.checks import Outcome, load_thresholds, verify_payload
from verification.episodes import env_turn_tokens, stream_of
from verification.rollouts import sample_tokens


@pytest.fixture(scope="module")
def real(tiny_model: Path) -> TorchBackend:
    return TorchBackend.from_pretrained(str(tiny_model))


def lease(env: Environment, n: int = 0, max_tokens: int = 16) -> Lease:
    return Lease(
        lease_id=f"episodes-{n}", run_id="run", env_id=env.name, env_version=env.version,
        env_seed=n, example_indices=list(range(4)), group_size=4, policy_version=0,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                max_turns=getattr(env, "max_turns", 1)),
        lease_seed=bytes([n + 1]) * 32, deadline_ms=0,
    )  # fmt: skip


def audit(real: TorchBackend, env: Environment, lease_: Lease, payload: RolloutPayload) -> Outcome:
    return verify_payload(
        lease_, payload, env, real.tokenizer, real.eos_ids, real.base.config.vocab_size,
        real.prefill_batch, load_thresholds("fp32"),
    )  # fmt: skip


@pytest.mark.parametrize("name", ["guess", "calc", "code"])
def test_honest_episodes_pass_and_carry_the_environments_turns(
    real: TorchBackend, name: str
) -> None:
    env = load_environment(name)
    lease_ = lease(env, max_tokens=12)
    payload = Producer(real, real.tokenizer).produce(env, lease_)
    outcome = audit(real, env, lease_, payload)
    assert outcome.passed, outcome
    if name == "guess":  # the tiny model's replies get answers: episodes of several turns
        sample = max(payload.samples, key=lambda s: len(s.env_turns))
        assert len(sample.env_turns) >= 2
        ids = sample_tokens(sample)[0].tolist()
        stream, sampled = stream_of(sample, ids)
        assert sum(sampled) == len(ids) and len(stream) > len(ids)
        first = real.tokenizer.decode(env_turn_tokens(sample.env_turns[0]))
        assert first.startswith("<|user|>") and first.endswith("<|end|><|assistant|>")


def test_an_edited_environment_turn_fails_env_turns(real: TorchBackend) -> None:
    env = load_environment("guess")
    lease_ = lease(env, 1)
    payload = EditsEnvTurns(real, real.tokenizer).produce(env, lease_)
    outcome = audit(real, env, lease_, payload)
    assert (outcome.passed, outcome.failed_check) == (False, "env_turns"), outcome
    assert "not what the environment answers" in outcome.detail


def test_a_forged_tool_result_fails_env_turns(real: TorchBackend) -> None:
    env = load_environment("calc")
    lease_ = lease(env, 2, max_tokens=96)
    payload = ForgesToolResults(real, real.tokenizer).produce(env, lease_)
    forged = real.tokenizer.decode(env_turn_tokens(payload.samples[0].env_turns[0]))
    assert "<|tool|>7<|end|>" in forged  # 2 * 3, plus one
    outcome = audit(real, env, lease_, payload)
    assert (outcome.passed, outcome.failed_check) == (False, "env_turns"), outcome
    assert "'7<|end|>" in outcome.detail and "'6<|end|>" in outcome.detail


def test_a_model_turn_from_another_model_fails_the_replay(
    real: TorchBackend, tiny_model: Path
) -> None:
    """The first turn is the claimed model's; later turns come from a copy with 5 % weight
    noise: the replay of those turns fails, whichever of its two checks meets it first."""
    cheap = TorchBackend.from_pretrained(str(tiny_model))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in cheap.base.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean() * 0.05)
    env = load_environment("guess")
    lease_ = lease(env, 3)
    payload = OtherModelLaterTurns(real, cheap).produce(env, lease_)
    assert any(len(s.env_turns) >= 1 for s in payload.samples)
    outcome = audit(real, env, lease_, payload)
    assert not outcome.passed and outcome.failed_check in ("sampling_replay", "logprobs")
    assert " turn " in outcome.detail and " turn 0 " not in outcome.detail, outcome.detail


def _longest(payload: RolloutPayload) -> int:
    return max(range(len(payload.samples)), key=lambda k: len(payload.samples[k].env_turns))


def test_a_turn_after_the_episode_ended_or_a_left_out_environment_turn_fails(
    real: TorchBackend,
) -> None:
    env = load_environment("guess")
    lease_ = lease(env, 4)
    payload = Producer(real, real.tokenizer).produce(env, lease_)
    k = _longest(payload)
    sample = payload.samples[k]
    ids, logprobs = (a.tolist() for a in sample_tokens(sample))
    eos = real.tokenizer.eos_token_id

    def with_sample(**changes: object) -> RolloutPayload:
        samples = list(payload.samples)
        samples[k] = msgspec.structs.replace(sample, **changes)  # type: ignore[arg-type]
        return msgspec.structs.replace(payload, samples=samples)

    last_turn = EnvTurn(after=len(ids), token_ids=sample.env_turns[-1].token_ids)
    longer = with_sample(
        token_ids=np.asarray([*ids, ids[0], eos], dtype="<u4").tobytes(),
        logprobs=np.asarray([*logprobs, -1.0, -1.0], dtype="<f4").tobytes(),
        env_turns=[*sample.env_turns, last_turn],
    )
    # (a lease that allowed more turns than the game has: the episode itself refuses the turn)
    roomy = msgspec.structs.replace(
        lease_, sampling=msgspec.structs.replace(lease_.sampling, max_turns=env.max_turns + 1)
    )
    outcome = audit(real, env, roomy, longer)
    assert (outcome.passed, outcome.failed_check) == (False, "env_turns"), outcome
    assert "follows the end of the episode" in outcome.detail
    dropped = with_sample(env_turns=sample.env_turns[:-1])
    outcome = audit(real, env, lease_, dropped)
    assert (outcome.passed, outcome.failed_check) == (False, "env_turns"), outcome
    assert "carries" in outcome.detail
    moved = with_sample(
        env_turns=[msgspec.structs.replace(sample.env_turns[0], after=1), *sample.env_turns[1:]]
    )
    outcome = audit(real, env, lease_, moved)
    assert (outcome.passed, outcome.failed_check) == (False, "env_turns"), outcome


def test_more_model_turns_than_the_lease_allows_fail_termination(real: TorchBackend) -> None:
    env = load_environment("guess")
    lease_ = lease(env, 5)
    payload = Producer(real, real.tokenizer).produce(env, lease_)
    assert audit(real, env, lease_, payload).passed
    short = msgspec.structs.replace(
        lease_, sampling=msgspec.structs.replace(lease_.sampling, max_turns=2)
    )
    outcome = audit(real, env, short, payload)
    assert (outcome.passed, outcome.failed_check) == (False, "termination"), outcome
    assert "the lease allows 2" in outcome.detail
