"""Seeded Gumbel-max sampling: deterministic, correctly distributed, truncated, replayable."""

from __future__ import annotations

import math

import torch

from verification.sampling import (
    derive_seed,
    gumbel_noise,
    replay_margins,
    sample,
    sampling_logprobs,
)


def test_seeds_depend_on_every_input_and_nothing_else() -> None:
    base = derive_seed(b"a" * 32, 0, 1)
    assert base == derive_seed(b"a" * 32, 0, 1)
    assert len({base, derive_seed(b"b" * 32, 0, 1), derive_seed(b"a" * 32, 1, 1),
                derive_seed(b"a" * 32, 0, 2)}) == 4  # fmt: skip
    assert 0 <= base < 2**63


def test_noise_is_a_pure_function_of_seed_position_token() -> None:
    a = gumbel_noise(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 1000)
    b = gumbel_noise(torch.tensor([5]), torch.tensor([1]), 1000)
    assert torch.equal(a[1], b[0])  # the same row, computed alone
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.isfinite(a).all()


def test_gumbel_max_samples_from_the_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    n = 20_000
    counts = torch.zeros(4)
    tokens, _ = sample(logits.expand(n, 4), torch.arange(n), torch.zeros(n), 1.0, 1.0)
    counts += torch.bincount(tokens, minlength=4)
    expected = torch.softmax(logits[0], -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_top_p_truncates_and_renormalizes() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, -5.0]])
    logp = sampling_logprobs(logits, 1.0, 0.8)
    assert math.isinf(float(logp[0, 3])) and math.isinf(float(logp[0, 2]))
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-6
    tokens, lp = sample(logits.expand(500, 4), torch.arange(500), torch.zeros(500), 1.0, 0.8)
    assert set(tokens.tolist()) <= {0, 1}
    assert torch.allclose(lp, logp[0, tokens])


def test_temperature_zero_is_greedy() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    tokens, _ = sample(logits.expand(50, 3), torch.arange(50), torch.zeros(50), 0.0, 1.0)
    assert set(tokens.tolist()) == {1}


def test_replay_finds_the_committed_tokens_and_flags_others() -> None:
    logits_T_V = torch.randn(12, 50)
    seed = derive_seed(b"x" * 32, 3, 0)
    tokens = torch.stack([
        sample(logits_T_V[t : t + 1], torch.tensor([seed]), torch.tensor([t]), 0.9, 0.95)[0][0]
        for t in range(12)
    ])  # fmt: skip
    assert float(replay_margins(logits_T_V, tokens, seed, 0.9, 0.95).max()) == 0.0
    forged = tokens.clone()
    forged[5] = (forged[5] + 1) % 50
    margins = replay_margins(logits_T_V, forged, seed, 0.9, 0.95)
    assert float(margins[5]) > 0 and float(margins.max()) == float(margins[5])
    other_seed = replay_margins(logits_T_V, tokens, seed + 1, 0.9, 0.95)
    assert float(other_seed.max()) > 0  # a different seed does not explain the tokens
