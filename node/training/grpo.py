"""The GRPO-family policy-gradient loss the trainer role optimizes on the LoRA weights.

For a group of ``S`` samples of one prompt, the advantage of a sample is its reward minus the
group's mean reward (optionally divided by the group's standard deviation); a group whose rewards
are all equal teaches nothing and is skipped. Each completion token contributes

    -min(r * A, clip(r, 1 - eps, 1 + eps) * A),   r = exp(logp_now - logp_behaviour)

where ``logp_behaviour`` is the logprob the producer committed when it sampled the token (the
behaviour policy is a few adapter versions old, so ``r`` is rarely 1), and tokens whose ratio is
extreme (outside ``[mask_low, mask_high]``) are masked out altogether: a token that improbable
under one of the two policies says more about the version gap than about the action. The sum is
normalized per token (mean over the batch's valid tokens) or divided by a constant (the same
for every batch, so long completions are not down-weighted). An optional KL penalty toward the
base model (adapters off) uses the k3 estimator ``exp(d) - d - 1``, ``d = logp_ref - logp_now``.
The settings are the run spec's ``rl.loss`` section (``protocol.runs.LossSpec``), as they are;
``clip_eps = 0`` turns the clip off.

>>> import torch
>>> adv, keep = group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
>>> adv.tolist(), keep.tolist()
([[0.5, -0.5], [0.0, 0.0]], [True, False])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.runs import LossSpec


def group_advantages(
    rewards_G_S: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [G, S], keep [G])``: reward minus the group mean (over std if asked); groups
    with no variance get advantage 0 and ``keep`` False."""
    centered_G_S = rewards_G_S - rewards_G_S.mean(dim=1, keepdim=True)
    std_G_1 = rewards_G_S.std(dim=1, keepdim=True, unbiased=False)
    keep_G = std_G_1.squeeze(1) > eps
    if std_normalize:
        centered_G_S = centered_G_S / std_G_1.clamp_min(eps)
    return centered_G_S * keep_G.unsqueeze(1), keep_G


@dataclass(frozen=True)
class LossStats:
    loss: float
    tokens: int
    """Completion tokens that counted (valid, not masked)."""
    masked_fraction: float
    """Of the valid tokens, the share masked for an extreme ratio."""
    clipped_fraction: float
    mean_ratio: float
    kl: float


def grpo_loss(
    logp_B_T: torch.Tensor,
    behaviour_B_T: torch.Tensor,
    valid_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    settings: LossSpec,
    ref_logp_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The loss over a batch of ``B`` completions of up to ``T`` tokens.

    ``logp_B_T``: the current policy's logprob of each completion token (with grad);
    ``behaviour_B_T``: the logprobs committed by the producer; ``valid_B_T``: 1 for completion
    tokens, 0 for padding; ``advantages_B``: one per completion (its group's, see above).
    """
    valid_B_T = valid_B_T.to(logp_B_T.dtype)
    log_ratio_B_T = (logp_B_T - behaviour_B_T).clamp(-20.0, 20.0)
    ratio_B_T = torch.exp(log_ratio_B_T)
    r_B_T = ratio_B_T.detach()
    extreme_B_T = (r_B_T < settings.mask_low) | (r_B_T > settings.mask_high)
    counted_B_T = valid_B_T * (~extreme_B_T).to(valid_B_T.dtype)
    adv_B_1 = advantages_B.to(logp_B_T.dtype).unsqueeze(1)
    eps = settings.clip_eps or float("inf")  # 0 turns the clip off; the mask above stays
    unclipped_B_T = ratio_B_T * adv_B_1
    clipped_B_T = ratio_B_T.clamp(1 - eps, 1 + eps) * adv_B_1
    per_token_B_T = -torch.minimum(unclipped_B_T, clipped_B_T)
    kl = torch.zeros((), dtype=logp_B_T.dtype)
    if settings.kl_coef and ref_logp_B_T is not None:
        d_B_T = ref_logp_B_T - logp_B_T
        kl_B_T = torch.exp(d_B_T) - d_B_T - 1
        per_token_B_T = per_token_B_T + settings.kl_coef * kl_B_T
        kl = (kl_B_T * counted_B_T).sum() / counted_B_T.sum().clamp_min(1)
    total = (per_token_B_T * counted_B_T).sum()
    if settings.normalize == "token":
        loss = total / counted_B_T.sum().clamp_min(1)
    else:
        loss = total / settings.constant
    n_valid = float(valid_B_T.sum())
    n_counted = float(counted_B_T.sum())
    clipped = (clipped_B_T.detach() < unclipped_B_T.detach()).to(valid_B_T.dtype) * counted_B_T
    stats = LossStats(
        loss=float(loss.detach()),
        tokens=int(n_counted),
        masked_fraction=(n_valid - n_counted) / max(n_valid, 1.0),
        clipped_fraction=float(clipped.sum()) / max(n_counted, 1.0),
        mean_ratio=float((r_B_T * counted_B_T).sum()) / max(n_counted, 1.0),
        kl=float(kl.detach()),
    )
    return loss, stats
