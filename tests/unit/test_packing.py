"""The int8 wire format of the trainers' all-reduce: lossless, and as narrow as promised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.training.diloco import exact_sum, levels_for
from node.training.packing import pack, unpack

HEADER = 10


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_parts_and_deltas_travel_exactly_in_8_bits(k: int) -> None:
    rng = np.random.default_rng(k)
    q = levels_for(k, "int8")
    parts = rng.integers(-q, q + 1, size=(k, 10_000)).astype(np.float32)
    parts[0, :2] = [q, -q]  # the extremes occur
    total = parts.sum(axis=0)
    average = total / np.float32(k)  # as hivemind's reducer computes it, in float32
    for own in parts:
        wire = pack(own)
        assert len(wire) - HEADER <= own.size * 7 / 8 + 1  # a part: 7 bits or fewer a value
        delta = average - own
        back = pack(delta)
        assert len(back) - HEADER <= own.size + 1  # a delta: 8 bits or fewer a value
        received = unpack(wire)
        assert np.array_equal(received, own)
        y = own + unpack(back)
        assert torch.equal(exact_sum(torch.from_numpy(y), k), torch.from_numpy(total))


def test_anything_else_goes_as_float32_unchanged() -> None:
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    wire = pack(x)
    assert len(wire) == HEADER + 4 * x.size
    assert np.array_equal(unpack(wire), x)
    assert unpack(pack(np.zeros(0, dtype=np.float32))).size == 0
