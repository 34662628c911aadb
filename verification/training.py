"""Training checks: a trainer's committed part of a round against a replay of the round, and a
version against the parts that made it.

A round is a function of what anyone can fetch: the starting version's weights, the scales
every trainer derives from the versions (``Quantizer``), the completions rebuilt from the
rollouts the coordinator dealt, and the run's settings (every round starts AdamW afresh). A
replay computes the pseudo-gradient ``g`` again; the trainer's part ``q`` (integers in
``[-Q, Q]``) must sit within one level of ``g / s`` — honest error feedback carries at most half
a level in and half a level out (``node/training/diloco.py``) — on all but a sliver of the
weights (last-bit float differences between machines move a few of them further: a gradient
near zero that changes sign moves AdamW's first step by ``2 lr``). A clipped weight
(``|q| = Q``) must have ``g / s`` at least ``Q - 1`` on its side.

Calibration (tiny model, four inner steps, six rounds, replays on 1 and 2 threads with every
starting weight moved by one ulp): at most 1.4e-4 of the weights fell outside the band, and the
mean distance was 0.25–0.36 levels (``scripts/bench_replay.py`` measures it again, and what
each trainer attack scores); the limit leaves 7× of room. What it lets through: a trainer that
chooses, on every weight, the rounding that suits it (one level either way), or that changes
fewer than ``OUT_OF_BAND_LIMIT`` of the weights by more. No statistic of the distances can
tell the first from honest work: the residual carried in is the trainer's own, anywhere in
half a level either way — when the scale shrinks from one round to the next, every carried
residual sits at that bound, and an honest part's mean distance nears half a level (seen in a
real run: 0.49). So the freedom is bounded, not detected: one level of the scale per weight per
round, the scale being twice the previous step's largest move over ``Q``.

The sum check: the new version's weights must be exactly the outer step from the starting
weights with the mean of the committed parts (momentum-free outer SGD, the default: with
momentum the step depends on a buffer no part commits to, and only the replay applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BAND = 1.0 + 1e-3
"""How far from ``g / s`` (in levels) an honest weight's part lies."""
OUT_OF_BAND_LIMIT = 1e-3
"""Share of the weights a replay on another machine may find outside ``BAND``."""
SUM_TOLERANCE = 1e-5
"""How far (in levels of the scale) a version may lie from the step its parts make: the same
float operations on the same numbers give the same bits; this is room for nothing else."""


@dataclass(frozen=True)
class TrainingCheck:
    passed: bool
    check: str = ""
    """The first check that failed: ``part_shape``, ``part_range``, ``part_replay``,
    ``version_sum``."""
    detail: str = ""
    stats: dict[str, float] = field(default_factory=dict)


def check_part(
    part: torch.Tensor, pseudo_grad: torch.Tensor, scale: torch.Tensor, levels: int
) -> TrainingCheck:
    """A trainer's committed part against the pseudo-gradient a replay of its round computed
    (``scale``: each weight's scale that round, ``levels``: Q)."""
    if part.shape != pseudo_grad.shape:
        detail = f"{part.numel()} weights, the model has {pseudo_grad.numel()}"
        return TrainingCheck(False, "part_shape", detail)
    if (
        not bool(torch.isfinite(part).all())
        or bool((part.abs() > levels).any())
        or not bool((part == torch.round(part)).all())
    ):
        return TrainingCheck(False, "part_range", f"a part holds integers in [-{levels}, {levels}]")
    z = pseudo_grad.double() / scale.double()
    d = (part.double() - z).abs()
    clipped = part.abs() == levels
    out_of_band = (d > BAND) & ~clipped
    under_clip = clipped & (z * part.sign() < levels - BAND)
    n = part.numel()
    outside = float((out_of_band | under_clip).sum()) / max(1, n)
    inside = d[~clipped]
    mean = float(inside.mean()) if inside.numel() else 0.0
    stats = {"outside_band": outside, "mean_distance": mean, "max_distance": float(d.max()),
             "clipped": float(clipped.sum()) / max(1, n)}  # fmt: skip
    if outside > OUT_OF_BAND_LIMIT:
        return TrainingCheck(False, "part_replay",
                             f"{outside:.2%} of the part is more than a level from the replay "
                             f"(limit {OUT_OF_BAND_LIMIT:.2%})", stats)  # fmt: skip
    return TrainingCheck(True, stats=stats)


def check_sum(
    start: torch.Tensor,
    parts: list[torch.Tensor],
    scale: torch.Tensor,
    outer_lr: float,
    made: torch.Tensor,
) -> TrainingCheck:
    """The version a round made (``made``) against the outer step from ``start`` with the mean
    of the round's committed parts, as every trainer computes it (``Quantizer.decode_mean``,
    ``OuterOptimizer.step`` without momentum)."""
    if not parts or any(p.shape != start.shape for p in parts) or made.shape != start.shape:
        return TrainingCheck(False, "version_sum", "the parts do not fit the version")
    integer_sum = torch.stack(parts).sum(dim=0)
    mean = integer_sum / len(parts) * scale
    expected = start - outer_lr * mean
    off = ((made - expected).abs() / scale).max()
    stats = {"sum_distance": float(off), "group_size": float(len(parts))}
    if float(off) > SUM_TOLERANCE:
        return TrainingCheck(False, "version_sum",
                             f"the version is {float(off):.3g} levels from the step its "
                             f"{len(parts)} committed part(s) make", stats)  # fmt: skip
    return TrainingCheck(True, stats=stats)
