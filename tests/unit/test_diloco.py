"""DiLoCo's outer loop: exact recovery of the group's integer sum from hivemind-style fp16 deltas
(every peer the same bits), quantization with error feedback, the outer SGD/Nesterov step."""

from __future__ import annotations

import pytest
import torch

from node.training.diloco import OuterOptimizer, Quantizer, exact_sum, levels_for


def test_every_peer_recovers_the_same_exact_sum_from_fp16_deltas() -> None:
    gen = torch.Generator().manual_seed(0)
    for k in (2, 3, 4, 5, 8):
        levels = levels_for(k)
        q_K_N = torch.randint(-levels, levels + 1, (k, 100_000), generator=gen).float()
        mean_N = q_K_N.mean(dim=0)  # what a reducer computes, in fp32
        truth_N = q_K_N.sum(dim=0)
        for i in range(k):  # what peer i ends up with: its part + the fp16-compressed delta
            y_N = q_K_N[i] + (mean_N - q_K_N[i]).half().float()
            assert torch.equal(exact_sum(y_N, k), truth_N), (k, i)


def test_error_feedback_carries_what_quantization_cut() -> None:
    quantizer = Quantizer(sizes=[3, 2], levels=127, initial_scale=0.01)
    g = torch.tensor([0.004, -0.3, 2.0, 0.0, 0.0049])
    q = quantizer.encode(g)
    assert q.tolist() == [0.0, -30.0, 127.0, 0.0, 0.0]  # rounded, and clipped at Q
    assert quantizer.residual is not None
    assert torch.allclose(q * 0.01 + quantizer.residual, g)  # what was cut is kept
    again = quantizer.encode(torch.tensor([0.004, 0.0, 0.004, 0.0, 0.0]))  # next round
    # 0.004 twice crosses half a step; of the clipped 0.73 only half a level is carried
    # (uncapped, the third would clip at 127 again)
    assert again.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_a_part_is_within_one_level_of_the_pseudo_gradient_whatever_came_before() -> None:
    gen = torch.Generator().manual_seed(3)
    quantizer = Quantizer(sizes=[50_000], levels=63, initial_scale=0.01)
    for _ in range(5):  # rounds of varied size: some clip, and residuals build up
        g = torch.randn(50_000, generator=gen) * 0.3 * float(torch.rand(1, generator=gen))
        q = quantizer.encode(g)
        inside = q.abs() < 63
        assert (q - g / 0.01)[inside].abs().max() <= 1.0 + 1e-4
        assert ((q - g / 0.01)[~inside] * q[~inside].sign()).min() <= 1.0 + 1e-4


def test_the_next_scale_follows_the_version_step() -> None:
    quantizer = Quantizer(sizes=[2, 2], levels=100, initial_scale=0.01)
    mean = quantizer.decode_mean(torch.tensor([100.0, -50.0, 2.0, 0.0]), group_size=2)
    assert torch.allclose(mean, torch.tensor([0.5, -0.25, 0.01, 0.0]))
    assert quantizer.scales == [0.01, 0.01]  # decoding leaves them
    quantizer.rescale(mean)
    assert quantizer.scales == pytest.approx([2 * 0.5 / 100, 2 * 0.01 / 100])
    tiny = Quantizer(sizes=[1], levels=100, initial_scale=0.01)
    tiny.rescale(torch.zeros(1))
    assert tiny.scales == pytest.approx([0.01 * 1e-3])  # never collapses to zero


def test_outer_steps() -> None:
    w = torch.tensor([1.0, 2.0])
    pg = torch.tensor([0.1, -0.2])
    assert torch.allclose(OuterOptimizer().step(w, pg), w - pg)  # plain averaging
    nesterov = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True)
    first = nesterov.step(w, pg)
    assert torch.allclose(first, w - 0.7 * (pg + 0.9 * pg))
    second = nesterov.step(first, pg)
    buffer = 0.9 * pg + pg
    assert torch.allclose(second, first - 0.7 * (pg + 0.9 * buffer))
