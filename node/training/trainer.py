"""One run's trainer, as one object: build, join, round, recover, export.

The trainer role (``node/roles/trainer.py``) does the network side of a round: it asks the
coordinator for it, fetches the rollouts and the published versions, and publishes the new
version. Everything in between touches the model and is here, blocking (torch, and the
collective's pipe; the role calls each method in a worker thread):

- ``build``: a run's trainer as its settings say: the LoRA model at version 0 (the same on every
  trainer of the run), the quantizer of its pseudo-gradients, the outer optimizer, the tokenizer;
- ``join``: the round's other trainers, through the hivemind collective (``collective.py``, a
  process of its own); without it a trainer trains alone;
- ``examples``: a fetched payload as training completions, rewards recomputed;
- ``round``: one DiLoCo round: H inner steps, the group's averaged pseudo-gradient, the outer
  step; every trainer of the group ends with the same weights, bit for bit;
- ``recover``: take a published version instead (a trainer that joined late, missed a round, or
  whose group's result lost to another's);
- ``export``: the weights as PEFT adapter files, byte for byte the same on every trainer holding
  the same weights; ``state``, ``load_state`` and ``share_state`` for trainers that join later.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from node.store.adapters import read_files
from node.training.diloco import OuterOptimizer, Quantizer, levels_for
from node.training.examples import Completion, inner_batches, training_examples
from node.training.grpo import LossStats
from node.training.lora import LoraTrainer
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload
from protocol.runs import TrainSettings
from verification.rollouts import rebuild_samples, score_rollouts

if TYPE_CHECKING:
    from node.training.collective import Collective

log = logging.getLogger(__name__)

State = tuple[dict[str, Any], list[np.ndarray]]
"""A trainer's state as trainers share it: metadata (version, quantizer scales) and arrays
(global weights, outer momentum)."""


@dataclass(frozen=True)
class Sum:
    """The sum of a round's parts, over ``parts`` trainers named ``members`` (empty: alone)."""

    integer_sum: torch.Tensor
    parts: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Trained:
    """What a round did."""

    weights: torch.Tensor
    """The new global weights (loaded)."""
    stats: list[LossStats]
    """Each inner step's loss statistics."""
    group_size: int
    """How many trainers' pseudo-gradients were averaged (1: alone)."""
    members: tuple[str, ...] = ()
    """The group's members, by the names each gave (empty: alone)."""


class Trainer:
    def __init__(
        self,
        model: LoraTrainer,
        quantizer: Quantizer,
        outer: OuterOptimizer,
        tokenizer: Any = None,
        collective: Collective | None = None,
    ) -> None:
        self.model, self.quantizer, self.outer = model, quantizer, outer
        self.tokenizer = tokenizer
        self.collective = collective
        self.v0 = model.flat()
        """Version 0, the same on every trainer of the run."""
        self.version = 0
        """The version the weights are at; -1 when unknown (the next round recovers)."""
        self.global_w = self.v0
        """The weights the current round started from."""

    @classmethod
    def build(cls, base: str, run_id: str, s: TrainSettings) -> Trainer:
        """A run's trainer on the base model at ``base`` (a directory, a hub id or a GGUF file)
        as its settings say (LoRA, loss, inner lr), with the quantizer of its pseudo-gradients
        (levels for groups of up to 8; AdamW moves a weight about lr a step at most, so H steps
        bound it by lr·H) and its outer optimizer."""
        d = s.diloco
        model = LoraTrainer(base, run_id, lora=s.lora, loss=s.loss, inner_lr=d.inner_lr)
        levels = levels_for(8, d.compression)
        quantizer = Quantizer(model.sizes, levels, d.inner_lr * d.inner_steps / levels)
        outer = OuterOptimizer(d.outer_lr, d.outer_momentum, nesterov=d.outer_momentum > 0)
        return cls(model, quantizer, outer, model.tokenizer)

    def join(self, peers: Sequence[str], prefix: str, wire: str, member: str = "") -> None:
        """Start the collective: join the run's hivemind DHT through ``peers`` (none: start
        one), matchmaking under ``prefix``, ``wire`` the all-reduce's codec, ``member`` this
        trainer's id in the group."""
        from node.training.collective import Collective, CollectiveSpec

        spec = CollectiveSpec(list(peers), prefix, sum(self.model.sizes), target_group_size=8,
                              round_timeout_s=30, wire=wire, member=member)  # fmt: skip
        collective = Collective(spec)
        collective.start()
        self.collective = collective

    def examples(
        self, env: Any, lease: Lease, payload: RolloutPayload, std_normalize: bool
    ) -> tuple[Any, list[Completion]]:
        """A payload's recomputed scores (``score_rollouts``'s, every sample) and its training
        completions (groups without reward spread left out)."""
        rebuilt = rebuild_samples(env, self.tokenizer, lease, payload)
        scores = score_rollouts(env, self.tokenizer, lease, payload, rebuilt)
        completions = training_examples(
            env, self.tokenizer, lease, payload, std_normalize, scores, rebuilt
        )
        return scores, completions

    def round(
        self,
        examples: Sequence[Completion],
        inner_steps: int,
        tag: str = "",
        expected: int = 1,
        next_version: int | None = None,
    ) -> Trained:
        """One DiLoCo round from the global weights (``inner``, then ``finish``): the weights
        move to the next version (``next_version``, default the one after)."""
        part, stats = self.inner(examples, inner_steps)
        return self.finish(part, stats, tag, expected, next_version)

    def inner(
        self, examples: Sequence[Completion], inner_steps: int
    ) -> tuple[torch.Tensor, list[LossStats]]:
        """A round's own work: the completions cut into ``inner_steps`` batches, one inner
        step each from a fresh AdamW, and the pseudo-gradient quantized: this trainer's part,
        which it commits to before the all-reduce. The model is left at the local weights."""
        return self.inner_on(inner_batches(examples, inner_steps))

    def inner_on(
        self, batches: Iterable[Sequence[Completion]]
    ) -> tuple[torch.Tensor, list[LossStats]]:
        """``inner`` on batches drawn one step at a time: a batch may be sampled with the local
        weights the steps before it made (``scripts/bench_diloco.py --sampling local``)."""
        self.global_w = self.model.flat()
        self.model.reset_inner()
        stats = [self.model.inner_step(b) for b in batches]
        return self.quantizer.encode(self.global_w - self.model.flat()), stats

    def pseudo_gradient(self, examples: Sequence[Completion], inner_steps: int) -> torch.Tensor:
        """What ``inner`` computes before quantizing, from the current weights, which it leaves
        as they were: a replay of a round (``verification/training.py`` checks a part
        against it)."""
        start = self.model.flat()
        self.model.reset_inner()
        for b in inner_batches(examples, inner_steps):
            self.model.inner_step(b)
        pseudo_grad = start - self.model.flat()
        self.model.load_flat(start)
        self.model.reset_inner()
        return pseudo_grad

    def finish(
        self,
        part: torch.Tensor,
        stats: list[LossStats],
        tag: str = "",
        expected: int = 1,
        next_version: int | None = None,
        member: str = "",
    ) -> Trained:
        """The part averaged with the group (the collective's round ``tag``, ``expected``
        trainers, ``member`` this one's name there; alone without a collective) and the outer
        step from the global weights."""
        return self.apply(self.reduce(part, tag, expected, member), stats, next_version)

    def reduce(
        self,
        part: torch.Tensor,
        tag: str = "",
        expected: int = 1,
        member: str = "",
        timeout_s: float | None = None,
    ) -> Sum:
        """The sum of the group's parts (``finish``'s arguments), as the all-reduce gave it
        (waiting up to ``timeout_s`` for a group: ``Collective.average``; 0: this part alone,
        without asking)."""
        if self.collective is None or timeout_s == 0:
            return Sum(part.to(torch.int64), 1, ())
        result = self.collective.average(part.numpy(), tag, expected, member, timeout_s)
        integer_sum = torch.from_numpy(np.asarray(result.integer_sum)).to(torch.int64)
        return Sum(integer_sum, result.group_size, tuple(result.members))

    def apply(self, total: Sum, stats: list[LossStats], next_version: int | None = None) -> Trained:
        """The outer step from the global weights with the mean of ``total``'s parts."""
        global_w, members, k = self.global_w, total.members, total.parts
        mean = self.quantizer.decode_mean(total.integer_sum, k)
        new_w = self.outer.step(global_w, mean)
        self.quantizer.rescale((global_w - new_w) / self.outer.lr)
        self.model.load_flat(new_w)
        self.version = self.version + 1 if next_version is None else next_version
        return Trained(new_w, stats, k, members)

    def recover(
        self, version: int, adapter_dir: Callable[[int], Path], parent: int | None = None
    ) -> bool:
        """Take the run's published state at ``version``: load its adapter (``adapter_dir``
        says where each version is held) and derive the quantizer scales from it and the
        version it was trained from (``parent``, default the one before), as every trainer
        did (``scales_at``). With outer momentum, the momentum comes from a
        peer's shared state, accepted only if its weights are the published ones; False (the
        version left as it was) if there is none."""

        def weights(v: int) -> torch.Tensor:
            return self.v0 if v == 0 else self.model.adapter_weights(adapter_dir(v))

        published = weights(version)
        self.model.load_flat(published)
        self.quantizer.residual, self.outer.buffer = None, None
        before = None if version == 0 else weights(version - 1 if parent is None else parent)
        self.scales_at(published, before)
        if self.outer.momentum and version > 0:
            state = self.collective.load_state(30.0) if self.collective is not None else None
            if state is None or state[0].get("version") != version:
                return False
            self.load_state(state)
            if not bool((self.model.flat() == published).all()):
                log.warning("a peer's shared state is not version %d as published", version)
                self.model.load_flat(published)
                return False
        self.version = version
        return True

    def scales_at(self, weights: torch.Tensor, parent: torch.Tensor | None) -> None:
        """The quantizer's scales for a round from ``weights``, as every trainer derives them:
        from the step that made them from ``parent`` (None: version 0, the initial scales)."""
        if parent is None:
            self.quantizer.scales = [self.quantizer.initial_scale] * len(self.quantizer.sizes)
        else:
            self.quantizer.rescale((parent - weights) / self.outer.lr)

    def export(self) -> dict[str, bytes]:
        """The weights as PEFT adapter files (``node/store/adapters.py``'s ``FILES``)."""
        with tempfile.TemporaryDirectory() as tmp:
            return read_files(self.model.save(Path(tmp) / "adapter"))

    def state(self) -> State:
        """What a trainer joining later needs to continue from the same bits: the version, the
        quantizer's scales (metadata); the global weights and the outer momentum (arrays)."""
        weights = self.model.flat()
        buffer = self.outer.buffer
        momentum = buffer if buffer is not None else torch.zeros_like(weights)
        metadata = {"version": self.version, "scales": list(self.quantizer.scales)}
        return metadata, [weights.numpy(), momentum.numpy()]

    def load_state(self, state: State) -> int:
        """Load another trainer's ``state``; returns its version (not taken as this one's:
        ``recover`` checks it first)."""
        metadata, (weights, momentum) = state
        self.model.load_flat(torch.from_numpy(np.array(weights)))
        self.outer.buffer = torch.from_numpy(np.array(momentum)) if self.outer.momentum else None
        self.quantizer.scales = [float(s) for s in metadata["scales"]]
        return int(metadata["version"])

    def share_state(self) -> None:
        """Offer this trainer's state to the run's trainers that join later (in a group)."""
        if self.collective is not None:
            self.collective.share_state(*self.state())

    def close(self) -> None:
        if self.collective is not None:
            self.collective.close()
            self.collective = None
