"""What the trainers' all-reduce puts on the wire, and how many bytes it sends (hivemind side).

Imported only in the collective's child process (it imports hivemind; see ``collective.py``).

hivemind's butterfly all-reduce sends each peer's part of the vector to the peer reducing it,
and that peer sends back ``average - part`` (the "delta"), both through a compression chosen by
name. Our vectors are integers (the quantized pseudo-gradients, ``diloco.Quantizer``), and the
deltas are integers over the group size ``k``, so both legs can travel as small integers,
**losslessly**:

- ``fp16`` (the default): hivemind's own float16 codec; exact for |values| up to 2048, which
  ``diloco.levels_for`` keeps within for the deltas' rounding (2 bytes a value).
- ``int8``: ``PackedIntegers`` (``packing.py``) — the smallest multiplier ``m`` ≤ 16 that makes
  every value an integer (1 for parts, ``k`` for deltas), and those integers bit-packed at the
  width their range needs; anything else (never the case here) goes as float32. With the levels of
  ``levels_for(k, "int8")`` both legs fit in 8 bits a value (the parts in 7).

hivemind picks codecs from a registry keyed by its protobuf enum, which has no slot for a codec
of ours, so ``install`` puts ``PackedIntegers`` in the ``UNIFORM_8BIT`` slot — in this process
only, where every peer of the round runs this same code. Every codec here counts the bytes it
serializes into a counter shared with the forked averager process (``SENT``), so a round reports
what it actually sent.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch
from hivemind.compression import serialization
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.compression.floating import Float16Compression
from hivemind.proto import runtime_pb2

from node.training.packing import pack, unpack

SENT: Any = multiprocessing.Value("Q", 0)  # created before hivemind forks its averager


def _count(message: runtime_pb2.Tensor) -> runtime_pb2.Tensor:
    with SENT.get_lock():
        SENT.value += len(message.buffer)
    return message


class CountedFloat16(Float16Compression):
    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        return _count(super().compress(tensor, info, allow_inplace))


class PackedIntegers(CompressionBase):
    compression_type = runtime_pb2.CompressionType.UNIFORM_8BIT  # the registry slot it takes

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        array = tensor.detach().cpu().float().numpy().reshape(-1)
        message = runtime_pb2.Tensor(
            compression=self.compression_type, buffer=pack(array), size=tensor.shape,
            dtype="float32", requires_grad=False,
        )  # fmt: skip
        return _count(message)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        array = unpack(serialized_tensor.buffer)
        return torch.from_numpy(array).reshape(tuple(serialized_tensor.size))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return 8.0 / 32.0


def install(wire: str) -> CompressionBase:
    """Register the counting codecs; the one to average with."""
    registry = serialization._BASE_COMPRESSION_TYPES
    registry["FLOAT16"] = CountedFloat16()
    registry["UNIFORM_8BIT"] = PackedIntegers()
    if wire not in ("fp16", "int8"):
        raise ValueError(f"wire format must be fp16 or int8, got {wire!r}")
    return registry["FLOAT16" if wire == "fp16" else "UNIFORM_8BIT"]
