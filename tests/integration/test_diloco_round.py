"""A DiLoCo round on the tiny model with real LoRA and real hivemind peers: two trainers, each
with its own producers' rollouts, run inner GRPO steps, average their quantized pseudo-gradients
and take the outer Nesterov step — and end with the same adapter, bit for bit, round after round."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from envs import load_environment
from node.adapters import read_files
from node.backends.torch_backend import TorchBackend
from node.rollouts import Producer
from node.training.collective import Collective, CollectiveSpec
from node.training.diloco import OuterOptimizer, Quantizer, levels_for
from node.training.trainer import Completion, LoraTrainer, diloco_round, training_examples
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
