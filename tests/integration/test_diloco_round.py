"""A DiLoCo round on the tiny model with real LoRA and real hivemind peers: two trainers, each
with its own producers' rollouts, run inner GRPO steps, average their quantized pseudo-gradients
and take the outer Nesterov step — and end with the same adapter, bit for bit, round after round.
A trainer that joins later downloads the state from a peer and matches from then on."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from envs import load_environment
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer
from node.store.adapters import read_files
from node.training.collective import Collective, CollectiveSpec
from node.training.diloco import OuterOptimizer, Quantizer, levels_for
from node.training.trainer import (
    Completion,
    LoraTrainer,
    diloco_round,
    export_state,
    import_state,
    training_examples,
)
from protocol.leases import Lease, SamplingParams

pytestmark = pytest.mark.timeout(300)
ENV = load_environment("arith", digits=2)
H, LR = 2, 1e-3


def _lease(n: int) -> Lease:
    return Lease(
        lease_id=f"lease-{n}", run_id="demo", env_id=ENV.name, env_version=ENV.version,
        env_seed=n, example_indices=list(range(8)), group_size=4, policy_version=0,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8),
        lease_seed=bytes([n + 1]) * 32, deadline_ms=0,
    )  # fmt: skip


def _completions(tiny_model: Path) -> list[list[Completion]]:
    backend = TorchBackend.from_pretrained(str(tiny_model))
    producer = Producer(backend, backend.tokenizer)
    out = []
    for n in (1, 2):
        lease = _lease(n)
        out.append(training_examples(ENV, backend.tokenizer, lease, producer.produce(ENV, lease)))
    return out


def test_two_trainers_end_each_round_with_the_same_adapter_bytes(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = _completions(tiny_model)
    assert all(len(d) >= 8 for d in data), [len(d) for d in data]  # groups with reward spread
    trainers = [LoraTrainer(str(tiny_model), "demo", inner_lr=LR) for _ in range(2)]
    assert torch.equal(trainers[0].flat(), trainers[1].flat())  # version 0, without a message
    levels = levels_for(2)
    quantizers = [Quantizer(t.sizes, levels, initial_scale=LR * H / levels) for t in trainers]
    outers = [OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True) for _ in trainers]
    first = Collective(CollectiveSpec([], "demo", sum(trainers[0].sizes), round_timeout_s=60))
    first.start()
    second = Collective(CollectiveSpec(first.visible_addrs, "demo", sum(trainers[0].sizes),
                                       round_timeout_s=60))  # fmt: skip
    second.start()
    collectives = [first, second]
    try:
        v0 = trainers[0].flat()
        for round_ in range(2):
            results: list[Any] = [None, None]

            def run(i: int, results: list[Any] = results) -> None:
                def average(q: np.ndarray) -> tuple[np.ndarray, int]:
                    result = collectives[i].average(q)
                    return result.integer_sum, result.group_size

                batches = [data[i][b * 8 : (b + 1) * 8] for b in range(H)]
                batches = [b for b in batches if b] or [data[i][:8]]
                results[i] = diloco_round(trainers[i], batches, quantizers[i], outers[i], average)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(240)
            assert [r[2] for r in results] == [2, 2]  # both in the group
            assert torch.equal(results[0][0], results[1][0])
            digests = []
            for i, trainer in enumerate(trainers):
                files = read_files(trainer.save(tmp_path / f"r{round_}-t{i}"))
                digests.append(hashlib.sha256(b"".join(files.values())).hexdigest())
            assert digests[0] == digests[1]  # the same adapter bytes on both trainers
        assert not torch.equal(trainers[0].flat(), v0)  # and it moved
    finally:
        for c in collectives:
            c.close()


def _round_all(
    trainers: list[LoraTrainer], quantizers: list[Quantizer], outers: list[OuterOptimizer],
    collectives: list[Collective], data: list[list[Completion]],
) -> list[Any]:  # fmt: skip
    results: list[Any] = [None] * len(trainers)

    def run(i: int) -> None:
        def average(q: np.ndarray) -> tuple[np.ndarray, int]:
            result = collectives[i].average(q)
            return result.integer_sum, result.group_size

        batches = [data[i][b * 8 : (b + 1) * 8] for b in range(H)]
        results[i] = diloco_round(trainers[i], [b for b in batches if b], quantizers[i],
                                  outers[i], average)  # fmt: skip

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trainers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    return results


def test_a_late_trainer_downloads_the_state_and_matches_from_then_on(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = _completions(tiny_model)
    levels = levels_for(4)  # exact for groups of up to 4

    def parts() -> tuple[LoraTrainer, Quantizer, OuterOptimizer]:
        t = LoraTrainer(str(tiny_model), "demo", inner_lr=LR)
        return t, Quantizer(t.sizes, levels, LR * H / levels), OuterOptimizer(0.7, 0.9, True)

    early = [parts() for _ in range(2)]
    size = sum(early[0][0].sizes)
    first = Collective(CollectiveSpec([], "late", size, round_timeout_s=60))
    first.start()
    collectives = [first]
    try:
        second = Collective(CollectiveSpec(first.visible_addrs, "late", size, round_timeout_s=60))
        second.start()
        collectives.append(second)
        results = _round_all([p[0] for p in early], [p[1] for p in early],
                             [p[2] for p in early], collectives, data)  # fmt: skip
        assert [r[2] for r in results] == [2, 2]
        for (t, q, o), c in zip(early, collectives, strict=True):
            c.share_state(*export_state(1, t, q, o))
        late = parts()
        third = Collective(CollectiveSpec(first.visible_addrs, "late", size, round_timeout_s=60))
        third.start()
        collectives.append(third)
        state = third.load_state(timeout_s=30)
        assert state is not None
        assert import_state(state, *late) == 1
        assert torch.equal(late[0].flat(), early[0][0].flat())  # the same bits as the others
        assert late[2].buffer is not None and early[0][2].buffer is not None
        assert torch.equal(late[2].buffer, early[0][2].buffer)
        assert late[1].scales == early[0][1].scales
        everyone = [*early, late]
        results = _round_all([p[0] for p in everyone], [p[1] for p in everyone],
                             [p[2] for p in everyone], collectives,
                             [data[0], data[1], data[1][::-1]])  # fmt: skip
        assert [r[2] for r in results] == [3, 3, 3]
        assert all(torch.equal(r[0], results[0][0]) for r in results)
    finally:
        for c in collectives:
            c.close()
