"""DiLoCo's outer loop on flat LoRA weights: quantized pseudo-gradients whose average every trainer
recovers bit for bit, and the outer SGD (optionally Nesterov) step.

Why quantize before averaging: hivemind's all-reduce hands each peer ``its own part + the
compressed delta to the average``, so with any compression the peers' results differ in the last
bits, and so would their adapters. Here each trainer first turns its pseudo-gradient into
integers ``q`` in ``[-Q, Q]`` under a scale every trainer shares (``Quantizer``; what rounding
cut off, up to half a level, is kept and added to the next round — error feedback). The
all-reduce then runs on those integers with fp16 on the wire; each peer's result ``y`` is within
a known bound of the true mean ``S / k`` of ``k`` peers, and since ``S`` is an integer,
``round(y * k)`` is ``S`` exactly when ``k`` × the bound is below 1/2 — which ``levels_for(k)``
guarantees. Every
trainer then computes the same mean from the same integers, the same outer step, the same
adapter bytes.

>>> levels_for(2), levels_for(4), levels_for(8)
(255, 127, 63)
>>> levels_for(2, "int8"), levels_for(4, "int8")
(63, 21)
>>> exact_sum(torch.tensor([1.5, -0.4998]), 2).tolist()
[3.0, -1.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def levels_for(max_group_size: int, wire: str = "fp16") -> int:
    """Integer levels ``Q`` such that a group of up to ``max_group_size`` recovers exact sums.

    ``fp16``: float16 keeps 11 significant bits: a delta of magnitude up to ``2Q`` comes back
    within ``2Q * 2**-11``; ``k`` times that must stay below 1/2, so ``Q < 512 / k``.
    ``int8`` (exact integers, ``wire.py``): the delta times ``k`` is at most ``2(k-1)Q`` and
    must fit in 8 bits, so ``Q = 127 // (2(k-1))``; a part (``[-Q, Q]``) then needs 7 or fewer."""
    if wire == "int8":
        return 127 if max_group_size <= 1 else max(1, 127 // (2 * (max_group_size - 1)))
    return max(1, (512 // max_group_size) - 1)


def exact_sum(averaged: torch.Tensor, group_size: int) -> torch.Tensor:
    """The integer sum of the group's quantized tensors, from this peer's (fp16-wire) average."""
    return torch.round(averaged.double() * group_size).float()


@dataclass
class Quantizer:
    """Shared-scale integer quantization with error feedback, one scale per tensor.

    The residual carried into a round is capped at half a level of that round's scale (what
    clipping cut off beyond it is dropped; the next scale grows with the step instead). So an
    honest part ``q`` is always within one level of the pseudo-gradient over the scale,
    ``|q - g / s| <= 1``: the bound a replay of the round checks (``verification/training.py``),
    whatever the trainer's private residual was.

    The scale of round ``t`` must be the same on every trainer without a message: it is derived
    from the previous version step (identical everywhere, and public: two published adapter
    versions), twice its largest magnitude over ``Q``; the first round's comes from the inner
    optimizer's step bound (AdamW moves a weight by at most about ``lr`` per step)."""

    sizes: list[int]
    levels: int
    initial_scale: float
    floor: float = 1e-3
    """A scale never shrinks below this fraction of the initial one."""
    scales: list[float] = field(default_factory=list)
    residual: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.scales:
            self.scales = [self.initial_scale] * len(self.sizes)

    def _scale_vector(self) -> torch.Tensor:
        pairs = zip(self.sizes, self.scales, strict=True)
        return torch.cat([torch.full((n,), s) for n, s in pairs])

    def encode(self, pseudo_grad: torch.Tensor) -> torch.Tensor:
        """Integers (as float32) in ``[-Q, Q]``; what they miss is kept for the next round
        (up to half a level of that round's scale)."""
        scale = self._scale_vector()
        if self.residual is None:
            self.residual = torch.zeros_like(pseudo_grad)
        carried = torch.maximum(torch.minimum(self.residual, scale / 2), -scale / 2)
        wanted = pseudo_grad + carried
        q = torch.clamp(torch.round(wanted / scale), -self.levels, self.levels)
        self.residual = wanted - q * scale
        return q

    def scale_vector(self) -> torch.Tensor:
        """Each weight's scale this round."""
        return self._scale_vector()

    def decode_mean(self, integer_sum: torch.Tensor, group_size: int) -> torch.Tensor:
        """The averaged pseudo-gradient from the exact integer sum."""
        return integer_sum / group_size * self._scale_vector()

    def rescale(self, step: torch.Tensor) -> None:
        """The next round's scales from the version step just taken (old global weights minus
        new, over the outer lr): twice each tensor's largest magnitude over ``Q``. Every trainer
        computes it from the same two versions, so a trainer that recovers from the published
        adapters gets the same scales as those that took the step."""
        start = 0
        for i, n in enumerate(self.sizes):
            peak = float(step[start : start + n].abs().max()) if n else 0.0
            self.scales[i] = max(2 * peak / self.levels, self.floor * self.initial_scale)
            start += n


@dataclass
class OuterOptimizer:
    """SGD on the global weights with the averaged pseudo-gradient (global minus local) as the
    gradient; optional (Nesterov) momentum. lr 1 without momentum is plain averaging."""

    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    buffer: torch.Tensor | None = None

    def step(self, global_weights: torch.Tensor, pseudo_grad: torch.Tensor) -> torch.Tensor:
        update = pseudo_grad
        if self.momentum:
            if self.buffer is None:
                self.buffer = torch.zeros_like(pseudo_grad)
            self.buffer = self.momentum * self.buffer + pseudo_grad
            update = pseudo_grad + self.momentum * self.buffer if self.nesterov else self.buffer
        return global_weights - self.lr * update
