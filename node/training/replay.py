"""A verifier's replay of a trainer's round (blocking; the verifier role calls it in a thread).

The round is rebuilt from what anyone can fetch — the starting version's weights and the one
before it (the quantizer's scales), the dealt payloads (completions and rewards recomputed
here, as the trainer had to), the run's settings — and trained again with a fresh AdamW
(``Trainer.pseudo_gradient``). The trainer's committed part is checked against it, and the
adapter the trainer signed against the outer step the round's committed parts make
(``verification/training.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.training.trainer import Trainer
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload
from protocol.runs import TrainSettings
from verification.training import TrainingCheck, check_part, check_sum


def part_tensor(part: bytes) -> torch.Tensor:
    """A ``TrainingPart``'s integers, as the all-reduce carried them (float32)."""
    return torch.from_numpy(np.frombuffer(part, dtype=np.int8).astype(np.float32))


class Replayer:
    def __init__(self, base: str) -> None:
        self.base = base
        self._trainer: tuple[tuple[str, TrainSettings], Trainer] | None = None

    def trainer(self, run_id: str, settings: TrainSettings) -> Trainer:
        """The run's trainer at version 0 (built once per run and settings)."""
        if self._trainer is None or self._trainer[0] != (run_id, settings):
            self._trainer = ((run_id, settings), Trainer.build(self.base, run_id, settings))
        return self._trainer[1]

    def replay(
        self,
        run_id: str,
        settings: TrainSettings,
        start: Path | None,
        parent: Path | None,
        payloads: Sequence[tuple[Lease, RolloutPayload]],
        parts: Sequence[bytes],
        levels: int,
        made: dict[str, bytes],
    ) -> TrainingCheck:
        """``start``/``parent``: the adapter directories of the round's starting version and the
        one it was trained from (None: version 0; ``parent`` None with a ``start``: there is
        none before); ``parts``: the round's committed parts, the audited trainer's first;
        ``made``: the adapter files the trainer signed."""
        from envs import load_environment

        trainer = self.trainer(run_id, settings)
        if levels != trainer.quantizer.levels:
            wanted = trainer.quantizer.levels
            return TrainingCheck(False, "part_range", f"{levels} levels, the run's {wanted}")
        weights = trainer.model.adapter_weights
        w_start = trainer.v0 if start is None else weights(start)
        w_parent = None if start is None else trainer.v0 if parent is None else weights(parent)
        trainer.model.load_flat(w_start)
        trainer.scales_at(w_start, w_parent)
        examples = []
        for lease, payload in payloads:
            env: Any = load_environment(lease.env_id)
            examples += trainer.examples(env, lease, payload, settings.loss.std_normalize)[1]
        pseudo_grad = trainer.pseudo_gradient(examples, settings.diloco.inner_steps)
        scale = trainer.quantizer.scale_vector()
        tensors = [part_tensor(p) for p in parts]
        result = check_part(tensors[0], pseudo_grad, scale, levels)
        if not result.passed:
            return result
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in made.items():
                (Path(tmp) / name).write_bytes(data)
            made_w = weights(Path(tmp))
        if settings.diloco.outer_momentum:  # the step also holds a buffer no part commits to
            return result
        summed = check_sum(w_start, tensors, scale, settings.diloco.outer_lr, made_w)
        return TrainingCheck(summed.passed, summed.check, summed.detail,
                             {**result.stats, **summed.stats})  # fmt: skip
