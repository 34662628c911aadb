"""The GRPO-family loss: advantages, importance ratios with clipping and masking, normalization
and the optional KL term, checked against their definitions (values and gradients)."""

from __future__ import annotations

import math

import torch

from node.training.grpo import group_advantages, grpo_loss
from protocol.runs import LossSpec


def test_advantages_center_groups_and_skip_the_uninformative() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv, keep = group_advantages(rewards)
    assert keep.tolist() == [True, False, True]
    assert torch.allclose(adv.sum(dim=1), torch.zeros(3), atol=1e-6)
    assert adv[1].abs().sum() == 0
    scaled, _ = group_advantages(rewards, std_normalize=True)
    assert torch.allclose(scaled[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # std 0.5


def _batch(delta: float, adv: float, length: int = 4) -> tuple[torch.Tensor, ...]:
    behaviour = torch.full((1, length), -1.0)
    logp = (behaviour + delta).clone().requires_grad_(True)
    return logp, behaviour, torch.ones(1, length), torch.tensor([adv])


def test_on_policy_it_is_the_plain_policy_gradient() -> None:
    logp, behaviour, valid, adv = _batch(0.0, 0.7)
    loss, stats = grpo_loss(logp, behaviour, valid, adv, LossSpec())
    loss.backward()
    assert logp.grad is not None
    # d/dlogp of -(exp(logp - b) * A) at logp = b is -A, then the mean over 4 tokens
    assert torch.allclose(logp.grad, torch.full((1, 4), -0.7 / 4))
    assert stats.tokens == 4 and stats.mean_ratio == 1.0 and stats.clipped_fraction == 0.0


def test_ratios_beyond_the_clip_stop_the_gradient_in_the_advantage_direction() -> None:
    logp, behaviour, valid, adv = _batch(0.5, 1.0)  # ratio e^0.5 = 1.65 > 1.2, positive advantage
    loss, stats = grpo_loss(logp, behaviour, valid, adv, LossSpec(clip_eps=0.2))
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() == 0
    assert stats.clipped_fraction == 1.0
    assert abs(stats.loss + 1.2) < 1e-6  # -clip(r) * A
    logp, behaviour, valid, adv = _batch(0.5, -1.0)  # negative advantage: unclipped side wins
    loss, _ = grpo_loss(logp, behaviour, valid, adv, LossSpec(clip_eps=0.2))
    loss.backward()
    assert logp.grad is not None and (logp.grad > 0).all()


def test_an_infinite_clip_turns_clipping_off() -> None:
    logp, behaviour, valid, adv = _batch(0.5, 1.0)
    loss, stats = grpo_loss(logp, behaviour, valid, adv, LossSpec(clip_eps=0.0))
    loss.backward()
    assert stats.clipped_fraction == 0.0
    assert logp.grad is not None and (logp.grad < 0).all()  # still pushed up: r * A
    assert abs(stats.loss + math.exp(0.5)) < 1e-5


def test_extreme_ratios_are_masked_out() -> None:
    behaviour = torch.full((1, 4), -1.0)
    logp = torch.tensor([[-1.0, -1.0, -4.0, 2.0]], requires_grad=True)  # ratios 1, 1, e^-3, e^3
    valid = torch.ones(1, 4)
    loss, stats = grpo_loss(logp, behaviour, valid, torch.tensor([1.0]), LossSpec())
    loss.backward()
    assert stats.tokens == 2 and stats.masked_fraction == 0.5
    assert logp.grad is not None and logp.grad[0, 2:].abs().sum() == 0


def test_padding_never_counts_and_normalization_is_configurable() -> None:
    behaviour = torch.full((2, 3), -1.0)
    logp = behaviour.clone().requires_grad_(True)
    valid = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 1.0])
    per_token, stats = grpo_loss(logp, behaviour, valid, adv, LossSpec())
    assert stats.tokens == 4 and abs(per_token.item() + 1.0) < 1e-6  # mean of 4 tokens of -1
    constant, _ = grpo_loss(logp, behaviour, valid, adv,
                            LossSpec(normalize="constant", constant=8.0))  # fmt: skip
    assert abs(constant.item() + 4 / 8) < 1e-6  # the sum (-4) over the constant


def test_kl_is_off_by_default_and_penalizes_distance_from_the_reference() -> None:
    logp, behaviour, valid, adv = _batch(0.0, 0.0)
    ref = behaviour - 0.3
    off, _ = grpo_loss(logp, behaviour, valid, adv, LossSpec(), ref_logp_B_T=ref)
    on, stats = grpo_loss(logp, behaviour, valid, adv, LossSpec(kl_coef=0.1), ref_logp_B_T=ref)
    d = -0.3
    expected = 0.1 * (torch.exp(torch.tensor(d)) - d - 1)
    assert off.item() == 0.0 and abs(on.item() - float(expected)) < 1e-6 and stats.kl > 0
    same, _ = grpo_loss(logp, behaviour, valid, adv, LossSpec(kl_coef=0.1),
                        ref_logp_B_T=logp.detach())  # fmt: skip
    assert same.item() == 0.0
