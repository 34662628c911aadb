"""Seeded Gumbel-max sampling: deterministic, correctly distributed, truncated, replayable."""

from __future__ import annotations

import math

import torch

from verification.sampling import (
    derive_seed,
    gumbel_noise,
    honest_logprobs,
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


def test_top_p_keeps_or_drops_equally_probable_tokens_together() -> None:
    """bf16 logits are often exactly equal: which of two tied tokens top-p keeps must not depend
    on the order a sort leaves them in, or producer and verifier disagree on the set."""
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.25, 0.1]]))
    kept = torch.isfinite(sampling_logprobs(logits, 1.0, 0.5))
    assert kept.tolist() == [[True, True, True, False]]
    swapped = torch.isfinite(sampling_logprobs(logits[:, [0, 2, 1, 3]], 1.0, 0.5))
    assert swapped.tolist() == kept.tolist()


def test_honest_logprobs_allow_one_flip_at_the_top_p_boundary_and_nothing_else() -> None:
    """A token whose mass above it lies within the slack of top_p may be in the producer's set
    or not: the sampled token's logprob under either set is honest; a value between is not."""
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.06, 0.04]])
    logits, token = torch.log(probs), torch.tensor([0])
    here, more, fewer = honest_logprobs(logits, token, 1.0, 0.87, 0.05)[0].exp().tolist()
    assert math.isclose(here, 0.4 / 0.9, rel_tol=1e-6)
    assert math.isclose(more, 0.4 / 0.96, rel_tol=1e-6)
    assert math.isnan(fewer)  # the last kept token sits 0.07 inside the boundary: it stays
    _, more, fewer = honest_logprobs(logits, token, 1.0, 0.82, 0.05)[0].exp().tolist()
    assert math.isclose(fewer, 0.4 / 0.8, rel_tol=1e-6) and math.isnan(more)
    exact = honest_logprobs(logits, token, 1.0, 0.87, 0.0)[0]
    assert exact[1:].isnan().all()  # no slack: one honest value
    margins = replay_margins(logits, token, 3, 1.0, 0.87)
    assert margins.shape == (1,)
