"""A DiLoCo round on the tiny model with real LoRA and real hivemind peers: two trainers, each
with its own producers' rollouts, run inner GRPO steps, average their quantized pseudo-gradients
and take the outer Nesterov step — and end with the same adapter, bit for bit, round after round.
A trainer that joins later downloads the state from a peer and matches from then on."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from envs import load_environment
from node.model.backends.torch_backend import TorchBackend
from node.model.rollouts import Producer
from node.training.collective import Collective, CollectiveSpec
from node.training.diloco import OuterOptimizer, Quantizer, levels_for
from node.training.examples import Completion, inner_batches, training_examples
from node.training.lora import LoraTrainer
from node.training.trainer import Trained, Trainer
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


def _trainer(tiny_model: Path, levels: int) -> Trainer:
    model = LoraTrainer(str(tiny_model), "demo", inner_lr=LR)
    quantizer = Quantizer(model.sizes, levels, initial_scale=LR * H / levels)
    return Trainer(model, quantizer, OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True))


def _round_all(trainers: list[Trainer], data: list[list[Completion]]) -> list[Trained]:
    """One round of every trainer at once (each in a thread, as in the trainer role), each on
    its own completions, H batches of 8."""
    results: list[Trained | None] = [None] * len(trainers)

    def run(i: int) -> None:
        results[i] = trainers[i].round(data[i][: 8 * H], H)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trainers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert all(r is not None for r in results), results
    return [r for r in results if r is not None]


@contextmanager
def _collectives(trainers: list[Trainer], prefix: str) -> Iterator[list[Collective]]:
    """A collective per trainer, the first starting the DHT and the others joining it; every
    collective (those the test adds too) closed at the end."""
    size = sum(trainers[0].model.sizes)
    collectives: list[Collective] = []
    try:
        for trainer in trainers:
            peers = collectives[0].visible_addrs if collectives else []
            collective = Collective(CollectiveSpec(peers, prefix, size, round_timeout_s=60))
            collective.start()
            collectives.append(collective)
            trainer.collective = collective
        yield collectives
    finally:
        for c in collectives:
            c.close()


def test_two_trainers_end_each_round_with_the_same_adapter_bytes(tiny_model: Path) -> None:
    data = _completions(tiny_model)
    assert all(len(d) >= 8 for d in data), [len(d) for d in data]  # groups with reward spread
    trainers = [_trainer(tiny_model, levels_for(2)) for _ in range(2)]
    assert torch.equal(trainers[0].v0, trainers[1].v0)  # version 0, without a message
    with _collectives(trainers, "demo"):
        for _ in range(2):
            results = _round_all(trainers, data)
            assert [r.group_size for r in results] == [2, 2]  # both in the group
            assert torch.equal(results[0].weights, results[1].weights)
            digests = [hashlib.sha256(b"".join(t.export().values())).hexdigest() for t in trainers]
            assert digests[0] == digests[1]  # the same adapter bytes on both trainers
        assert not torch.equal(trainers[0].model.flat(), trainers[0].v0)  # and it moved


def test_a_late_trainer_downloads_the_state_and_matches_from_then_on(tiny_model: Path) -> None:
    data = _completions(tiny_model)
    levels = levels_for(4)  # exact for groups of up to 4
    early = [_trainer(tiny_model, levels) for _ in range(2)]
    with _collectives(early, "late") as collectives:
        results = _round_all(early, data)
        assert [r.group_size for r in results] == [2, 2]
        for trainer in early:
            trainer.share_state()
        late = _trainer(tiny_model, levels)
        size, first = sum(late.model.sizes), collectives[0]
        third = Collective(CollectiveSpec(first.visible_addrs, "late", size, round_timeout_s=60))
        third.start()
        collectives.append(third)
        late.collective = third
        state = third.load_state(timeout_s=30)
        assert state is not None
        assert late.load_state(state) == 1
        assert torch.equal(late.model.flat(), early[0].model.flat())  # the same bits as the others
        assert late.outer.buffer is not None and early[0].outer.buffer is not None
        assert torch.equal(late.outer.buffer, early[0].outer.buffer)
        assert late.quantizer.scales == early[0].quantizer.scales
        results = _round_all([*early, late], [data[0], data[1], data[1][::-1]])
        assert [r.group_size for r in results] == [3, 3, 3]
        assert all(torch.equal(r.weights, results[0].weights) for r in results)


def test_inner_steps_take_batches_drawn_one_at_a_time(tiny_model: Path) -> None:
    """``inner_on`` draws each batch after the steps before it (what a trainer sampling with
    its own weights relies on: ``bench_diloco --sampling local``), and on the same batches it
    computes ``inner``'s part exactly."""
    data = _completions(tiny_model)[0][: 8 * H]
    whole, drawn = _trainer(tiny_model, levels_for(2)), _trainer(tiny_model, levels_for(2))
    expected, _ = whole.inner(data, H)
    weights_when_drawn = []

    def batches() -> Iterator[list[Completion]]:
        for batch in inner_batches(data, H):
            weights_when_drawn.append(drawn.model.flat().clone())
            yield batch

    part, stats = drawn.inner_on(batches())
    assert len(stats) == H
    assert torch.equal(part, expected)
    assert not torch.equal(weights_when_drawn[0], weights_when_drawn[1])  # a step came between
