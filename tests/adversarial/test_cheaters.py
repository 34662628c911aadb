"""Cheating inference nodes, each a subclass of the node's real ``Producer``, audited by the real
checks: every cheat is caught, by the check built for it. Honest producers are never refused.

The verifier replays with the tiny model in fp32 and the calibrated thresholds; every lease has a
fixed seed, so each run of the suite audits the very same payloads.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from envs import Environment, load_environment
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer, regenerator
from protocol.leases import Lease, SamplingParams
from protocol.rollouts import ComputeProfile, RolloutPayload
from tests.adversarial.cheaters import (
    ClaimsEosOnTruncation,
    FabricatedRewards,
    InflatedLogprobs,
    NoisyWeights,
    OtherBaseModel,
    OtherTemperature,
    ReplaysOldRollout,
    ResubmitsOthersRollout,
    SlightlyInflatedLogprobs,
    SmallerModelHonestLogprobs,
    SplicedTokens,
    TakesCloseRunnerUps,
    WrongAdapter,
)
from verification.checks import (
    Outcome,
    UncalibratedPair,
    load_thresholds,
    replaced_limit,
    thresholds_for,
    verify_payload,
)
from verification.rollouts import count_tokens

ENV = load_environment("arith", digits=2)


def lease(n: int = 0, lease_id: str = "lease-a", **sampling: float) -> Lease:
    return Lease(
        lease_id=lease_id, run_id="run", env_id=ENV.name, env_version=ENV.version, env_seed=5,
        example_indices=list(range(8)), group_size=4, policy_version=0,
        sampling=SamplingParams(**{"temperature": 1.0, "top_p": 1.0, "max_tokens": 16,
                                   **sampling}),  # type: ignore[arg-type]
        lease_seed=bytes([n + 1]) * 32, deadline_ms=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def real(tiny_model: Path) -> TorchBackend:
    return TorchBackend.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def other(tiny_model: Path) -> TorchBackend:
    """Another base model: the same architecture and tokenizer, other weights."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_model)).eval()
    return TorchBackend(model, AutoTokenizer.from_pretrained(tiny_model))


def audit(
    real: TorchBackend,
    lease_: Lease,
    payload: RolloutPayload,
    profile: str = "fp32",
    env: Environment = ENV,
) -> Outcome:
    return verify_payload(
        lease_, payload, env, real.tokenizer, real.eos_ids, real.base.config.vocab_size,
        real.prefill_batch, load_thresholds(profile),
    )  # fmt: skip


def noisy_copy(real: TorchBackend, scale: float) -> TorchBackend:
    model = copy.deepcopy(real.base)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean() * scale)
    return TorchBackend(model, real.tokenizer)


def with_adapter(real: TorchBackend, tmp: Path) -> TorchBackend:
    from peft import LoraConfig, get_peft_model

    backend = TorchBackend(copy.deepcopy(real.base), real.tokenizer)
    torch.manual_seed(3)
    peft = get_peft_model(
        copy.deepcopy(real.base),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft.save_pretrained(str(tmp / "other"))
    backend.load_adapter("other", str(tmp / "other"))
    return backend


def test_honest_payloads_pass(real: TorchBackend) -> None:
    for n in range(4):
        outcome = audit(real, lease(n), Producer(real, real.tokenizer).produce(ENV, lease(n)))
        assert outcome.passed, outcome
        assert outcome.stats["max_margin"] <= load_thresholds("fp32").max_margin


def test_the_receipts_token_count_is_counted_again(real: TorchBackend) -> None:
    """A receipt that claims more (or fewer) tokens than its payload holds fails
    ``token_count``, before any model check; the true count passes."""
    payload = Producer(real, real.tokenizer).produce(ENV, lease(2))
    tokens = sum(len(s.token_ids) // 4 for s in payload.samples)

    def claimed(n: int) -> Outcome:
        return verify_payload(
            lease(2), payload, ENV, real.tokenizer, real.eos_ids, real.base.config.vocab_size,
            real.prefill_batch, load_thresholds("fp32"), claimed_tokens=n,
        )  # fmt: skip

    assert claimed(tokens).passed
    for lie in (tokens + 1, tokens - 1):
        outcome = claimed(lie)
        assert (outcome.passed, outcome.failed_check) == (False, "token_count")
        assert f"claims {lie}" in outcome.detail and f"holds {tokens}" in outcome.detail
        assert "max_margin" not in outcome.stats  # failed before the replay


# A cheat that samples from another distribution (another model, adapter or weights) is
# caught by whichever of the replay's two checks, seeded pick or logprob, meets it first in
# its first sample; which one depends on the random weights, so either counts.
OTHER_DISTRIBUTION = ("sampling_replay", "logprobs")


SAMPLES_LIKE_THE_MODEL = {"inflated_logprobs", "fabricated_rewards", "spliced_tokens",
                          "replays_old_rollout", "resubmits_others_rollout"}  # fmt: skip
"""Cheats whose episodes go on as the real model's do (a model of random weights, or one cut
short at every turn, ends its episode in one turn)."""


@pytest.mark.parametrize("env_name", ["arith", "guess"])
@pytest.mark.parametrize(
    "cheat, check",
    [
        ("other_base_model", OTHER_DISTRIBUTION),
        ("wrong_adapter", OTHER_DISTRIBUTION),
        ("weight_noise_1pct", OTHER_DISTRIBUTION),
        ("smaller_model_honest_logprobs", "sampling_replay"),
        ("other_temperature", "sampling_replay"),
        ("inflated_logprobs", "logprobs"),
        ("fabricated_rewards", "reward"),
        ("spliced_tokens", "sampling_replay"),
        ("replays_old_rollout", "seed"),
        ("resubmits_others_rollout", "lease"),
        ("claims_eos_on_truncation", "termination"),
    ],
)
def test_each_cheat_is_caught_by_its_check(
    cheat: str, check: str | tuple[str, ...], env_name: str, real: TorchBackend,
    other: TorchBackend, tmp_path: Path,
) -> None:  # fmt: skip
    """Each cheat on single-turn payloads, and on episodes of a multi-turn game (the cheat
    applied to every model turn)."""
    env = ENV if env_name == "arith" else load_environment(env_name)

    def on_env(n: int, lease_id: str = "lease-a") -> Lease:
        base = lease(n, lease_id=lease_id)
        turns = getattr(env, "max_turns", 1)
        return msgspec.structs.replace(
            base, env_id=env.name, env_version=env.version,
            sampling=msgspec.structs.replace(base.sampling, max_turns=turns),
        )  # fmt: skip

    cheaters = {
        "other_base_model": lambda: OtherBaseModel(other, real.tokenizer),
        "wrong_adapter": lambda: WrongAdapter(with_adapter(real, tmp_path), real.tokenizer),
        "weight_noise_1pct": lambda: Producer(noisy_copy(real, 0.01), real.tokenizer),
        "smaller_model_honest_logprobs": lambda: SmallerModelHonestLogprobs(real, other),
        "other_temperature": lambda: OtherTemperature(real, real.tokenizer),
        "inflated_logprobs": lambda: InflatedLogprobs(real, real.tokenizer),
        "fabricated_rewards": lambda: FabricatedRewards(real, real.tokenizer),
        "spliced_tokens": lambda: SplicedTokens(real, real.tokenizer),
        "replays_old_rollout": lambda: ReplaysOldRollout(real, on_env(9)),
        "resubmits_others_rollout": lambda: ResubmitsOthersRollout(
            real, Producer(real, real.tokenizer).produce(env, on_env(5, lease_id="theirs"))
        ),
        "claims_eos_on_truncation": lambda: ClaimsEosOnTruncation(real, real.tokenizer),
    }
    target = on_env(1)
    payload = cheaters[cheat]().produce(env, target)
    if env_name == "guess" and cheat in SAMPLES_LIKE_THE_MODEL:
        assert any(len(s.env_turns) >= 2 for s in payload.samples)  # episodes of several turns
    outcome = audit(real, target, payload, env=env)
    assert not outcome.passed
    assert outcome.failed_check in (check if isinstance(check, tuple) else (check,)), outcome
    assert outcome.detail


def honest_audits(
    backend: TorchBackend, leases: int, verifier: TorchBackend | None = None
) -> list[Outcome]:
    """Audit ``leases`` honest leases (32 samples each) across environments and sampling, made
    by ``backend`` and checked by ``verifier`` (default: the same) with the thresholds of the
    pair of their profiles (the payload declares the producer's)."""
    verifier = verifier or backend
    settings = [("arith", {"digits": 2}, 1.0, 1.0), ("reverse", {}, 0.7, 0.9),
                ("sort", {}, 1.0, 0.95), ("countdown", {}, 0.0, 1.0)]  # fmt: skip
    outcomes = []
    for n in range(leases):
        name, args, t, top_p = settings[n % len(settings)]
        env = load_environment(name, **args)
        lease_ = msgspec.structs.replace(
            lease(n, lease_id=f"honest-{n}"), env_id=env.name, env_version=env.version,
            env_seed=10_000 + n,
            sampling=SamplingParams(temperature=t, top_p=top_p, max_tokens=24),
        )  # fmt: skip
        payload = Producer(backend, backend.tokenizer).produce(env, lease_)
        assert payload.profile == backend.profile  # declared, and signed with the samples
        vocab = verifier.base.config.vocab_size
        thresholds = thresholds_for(payload.profile, verifier.profile)
        audit_ = verify_payload(
            lease_, payload, env, verifier.tokenizer, verifier.eos_ids, vocab,
            verifier.prefill_batch, thresholds,
        )  # fmt: skip
        outcomes.append(audit_)
    return outcomes


def test_no_false_positives_over_1024_honest_fp32_samples(real: TorchBackend) -> None:
    outcomes = honest_audits(real, 32)
    assert sum(int(o.stats["samples"]) for o in outcomes) == 1024
    assert [o for o in outcomes if not o.passed] == []


def test_bf16_honest_work_passes_within_the_calibrated_profile(tiny_model: Path) -> None:
    bf16 = TorchBackend.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    outcomes = honest_audits(bf16, 8)
    assert [o for o in outcomes if not o.passed] == []
    # and the fp32 thresholds would be too tight for bf16: the profiles are not interchangeable
    assert (
        max(o.stats["max_logprob_diff"] for o in outcomes)
        > load_thresholds("fp32").max_logprob_diff
    )


def test_a_verifier_replays_in_the_dtype_the_producer_declared(
    real: TorchBackend, tiny_model: Path
) -> None:
    """An fp32 verifier's model process checks a bf16 producer's payloads in bf16 — it loads
    the model again in the dtype the payload declares (and signs) — with bf16's thresholds:
    honest work passes. Checked in fp32 with fp32's, it would fail (0 of 6 leases passed before
    payloads declared their profile). A dtype nobody calibrated is not judged: the verifier
    hands the audit on. A producer that computes in bf16 and declares nothing is checked as
    fp32 work, and fails."""
    from node.model.worker import ModelSpec, _Child

    child = _Child(ModelSpec(model=str(tiny_model), model_cache=str(tiny_model.parent.parent),
                             device="cpu"))  # fmt: skip
    child.load()
    assert child.backend.profile.dtype == "fp32"
    bf16 = TorchBackend.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    env = load_environment("arith", digits=2)
    outcomes, stripped = [], []
    for n in range(6):
        lease_ = msgspec.structs.replace(lease(n, lease_id=f"bf16-{n}"), env_seed=20_000 + n)
        payload = Producer(bf16, bf16.tokenizer).produce(env, lease_)
        assert payload.profile is not None and payload.profile.dtype == "bf16"
        outcomes.append(child.verify(lease_, payload, 0, 0))
        undeclared = msgspec.structs.replace(payload, profile=None)
        stripped.append(child.verify(lease_, undeclared, 0, 0))
    assert [o for o in outcomes if not o.passed] == [] and "bf16" in child.siblings
    assert any(not o.passed for o in stripped)
    assert {o.failed_check for o in stripped if not o.passed} <= {"logprobs", "sampling_replay"}
    fp16 = ComputeProfile(backend="torch", dtype="fp16", device="cpu")
    odd = child.verify(lease_, msgspec.structs.replace(payload, profile=fp16), 0, 0)
    assert (odd.passed, odd.failed_check) == (False, "verifier_error")
    assert "fp16" not in child.siblings  # nothing loaded for a dtype it cannot judge
    with pytest.raises(UncalibratedPair):
        thresholds_for(fp16, real.profile)


@pytest.mark.parametrize(
    ("cheat", "check", "says"),
    [(SlightlyInflatedLogprobs, "logprobs", "on average"),
     (TakesCloseRunnerUps, "sampling_replay", "not the seeded pick")],
)  # fmt: skip
def test_lease_statistics_catch_cheats_every_token_hides(
    real: TorchBackend, cheat: type[Producer], check: str, says: str
) -> None:
    """Per-token limits as loose as a noisy profile's let each token of a subtle cheat
    through; over the lease, the average logprob gap and the share of tokens that are not the
    seeded pick do not — while honest work of the same lease stays far inside both.

    How often a runner-up is close depends on how sure the model is (a tiny model trained on
    another CPU is surer or less so), so that cheat is judged on the first lease where it
    changed more samples than honest rounding may: each changed sample holds at least one token
    off the seeded pick."""
    loose = dataclasses.replace(load_thresholds("fp32"), max_margin=10.0, max_logprob_diff=10.0)
    env = load_environment("arith", digits=2)

    def verify(lease_: Lease, payload: RolloutPayload) -> Outcome:
        return verify_payload(
            lease_, payload, ENV, real.tokenizer, real.eos_ids, real.base.config.vocab_size,
            real.prefill_batch, loose,
        )  # fmt: skip

    for n in range(20, 28):
        lease_ = msgspec.structs.replace(lease(n, lease_id=f"subtle-{n}"), env_seed=7)
        honest = Producer(real, real.tokenizer).produce(env, lease_)
        outcome = verify(lease_, honest)
        assert outcome.passed, outcome
        assert outcome.stats["mean_logprob_diff"] < 1e-4
        assert outcome.stats["replaced_fraction"] == 0
        payload = cheat(real, real.tokenizer).produce(env, lease_)
        changed = sum(
            a.token_ids != b.token_ids for a, b in zip(honest.samples, payload.samples, strict=True)
        )
        honest_most = replaced_limit(count_tokens(honest), loose.replaced_rate)
        if cheat is TakesCloseRunnerUps and changed <= honest_most:
            continue  # too few close runner-ups on this lease to tell from honest rounding
        outcome = verify(lease_, payload)
        assert (outcome.passed, outcome.failed_check) == (False, check), outcome
        assert says in outcome.detail, outcome.detail
        return
    pytest.fail("on 8 leases the cheat never changed more samples than honest rounding may")


def test_a_producer_sampling_with_noisy_weights_fails_on_its_drift(tiny_model: Path) -> None:
    """1 % noise on the weights moves each logprob less than bf16's per-token tolerance lets
    honest rounding move it, but moves every uncertain token, where honest rounding moves few:
    over the lease, the drift check fails it (the per-token limits and the count of tokens off
    the seeded pick and the lease's mean difference are lifted here, so that only the drift
    judges) — while honest bf16 leases of the same environment stay under the drift limit."""
    bf16 = TorchBackend.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    thresholds = dataclasses.replace(
        load_thresholds("bf16"),
        max_margin=10.0,
        max_logprob_diff=10.0,
        replaced_rate=1.0,
        max_mean_logprob_diff=10.0,
    )
    env = load_environment("sort")
    for producer in (Producer(bf16, bf16.tokenizer), NoisyWeights(bf16, 0.01)):
        outcomes = []
        for n in range(4):
            lease_ = msgspec.structs.replace(
                lease(40 + n, lease_id=f"noisy-{n}", top_p=0.95, max_tokens=24),
                env_id=env.name, env_version=env.version, env_seed=n,
            )  # fmt: skip
            outcomes.append(verify_payload(
                lease_, producer.produce(env, lease_), env, bf16.tokenizer, bf16.eos_ids,
                bf16.base.config.vocab_size, bf16.prefill_batch, thresholds,
            ))  # fmt: skip
        if type(producer) is Producer:
            assert [o for o in outcomes if not o.passed] == []
            assert max(o.stats["drift"] for o in outcomes) < thresholds.max_drift
        else:
            assert [(o.passed, o.failed_check) for o in outcomes] == [(False, "logprobs")] * 4
            assert all("drift" in o.detail for o in outcomes), [o.detail for o in outcomes]


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Generation on one thread, as the profile a payload signs then says."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "cheat",
    [lambda b: TakesCloseRunnerUps(b, b.tokenizer), lambda b: NoisyWeights(b, 0.01),
     lambda b: SlightlyInflatedLogprobs(b, b.tokenizer)],
    ids=["runner_up", "noisy_weights", "slightly_inflated"],
)  # fmt: skip
def test_exact_replay_catches_what_bf16_thresholds_let_through(
    tiny_model: Path, one_thread: None, cheat: Callable[[TorchBackend], Producer]
) -> None:
    """With every statistical limit lifted (as wide as bf16 rounding can make them), a verifier
    that shares the producer's profile generates the lease again: a cheat that changed any
    token or logprob differs in some bit and fails, by name; honest bf16 leases, replayed the
    same way, match to the bit."""
    bf16 = TorchBackend.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    lifted = dataclasses.replace(
        load_thresholds("bf16"), max_margin=10.0, max_logprob_diff=10.0, replaced_rate=1.0,
        max_drift=math.inf, max_mean_logprob_diff=math.inf,
    )  # fmt: skip
    env, caught = load_environment("reverse"), []
    for n in range(4):
        lease_ = msgspec.structs.replace(
            lease(60 + n, lease_id=f"exact-{n}", temperature=0.7, top_p=0.9, max_tokens=24),
            env_id=env.name, env_version=env.version, env_seed=n,
        )  # fmt: skip
        honest = Producer(bf16, bf16.tokenizer).produce(env, lease_)
        payload = cheat(bf16).produce(env, lease_)
        assert payload.profile == bf16.profile and payload.profile.threads == 1
        regenerate = regenerator(bf16, env, lease_, payload.profile)
        assert regenerate is not None

        def check(
            p: RolloutPayload, exact: bool, lease_: Lease = lease_, again: Any = regenerate
        ) -> Outcome:
            return verify_payload(
                lease_, p, env, bf16.tokenizer, bf16.eos_ids, bf16.base.config.vocab_size,
                bf16.prefill_batch, lifted, regenerate=again if exact else None,
                always_exact=True,
            )  # fmt: skip

        kept = check(honest, exact=True)
        assert kept.passed and kept.stats["exact_replay"] == 1.0, kept
        if payload == honest:  # the cheat found nothing to change in this lease
            continue
        assert check(payload, exact=False).passed  # the lifted limits let every cheat through
        outcome = check(payload, exact=True)
        assert not outcome.passed and outcome.detail.startswith("exact replay"), outcome
        assert outcome.failed_check in {"sampling_replay", "logprobs"}
        caught.append(outcome.failed_check)
    assert caught  # four leases gave the cheat something to change


def test_only_a_verifier_of_the_producers_profile_replays_exactly(tiny_model: Path) -> None:
    """Exact replay needs the producer's backend, dtype, instruction set and thread count: any
    other profile (or vLLM's, which signs no thread count) gets the calibrated thresholds
    alone; a replay on another thread count leaves the verifier's own as it was."""
    bf16 = TorchBackend.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    own, lease_ = bf16.profile, lease(70)
    assert own.device.startswith("cpu:") and own.threads == torch.get_num_threads()
    assert regenerator(bf16, ENV, lease_, own) is not None
    for other in (
        msgspec.structs.replace(own, threads=0),
        msgspec.structs.replace(own, dtype="fp32"),
        msgspec.structs.replace(own, device="cpu:AVX512_FAKE"),
        msgspec.structs.replace(own, backend="vllm"),
        None,
    ):
        assert regenerator(bf16, ENV, lease_, other) is None, other
    threads = torch.get_num_threads()
    elsewhere = msgspec.structs.replace(own, threads=threads + 1)
    regenerate = regenerator(bf16, ENV, lease_, elsewhere)
    assert regenerate is not None
    samples = regenerate()
    assert len(samples) == len(lease_.example_indices) * lease_.group_size
    assert all(len(t) == len(lp) > 0 for t, lp in samples)
    assert torch.get_num_threads() == threads
