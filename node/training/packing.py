"""Lossless bit-packing of integer-valued vectors (the trainers' all-reduce parts and deltas).

A vector whose values are all integers over a small multiplier ``m`` (integers themselves, or
integers over the group size) is sent as those integers at the bit width their range needs,
behind a 10-byte header; a vector that is not (never the case in a round) goes as float32. No
library packs arbitrary bit widths losslessly for us (hivemind's 8-bit codecs are lossy,
quantile or blockwise), so this is numpy's ``packbits`` over the integers' bits.

>>> x = np.array([3.0, -2.0, 0.0, 1.0], dtype=np.float32)
>>> len(pack(x)) - 10, unpack(pack(x)).tolist()
(2, [3.0, -2.0, 0.0, 1.0])
"""

from __future__ import annotations

import struct

import numpy as np

_HEADER = struct.Struct("<BBII")  # multiplier (0: float32), bit width, offset, count


def as_integers(x: np.ndarray, max_multiplier: int = 16) -> tuple[int, np.ndarray]:
    """``(m, round(x * m))`` for the smallest ``m`` that leaves every value within 1e-3 of an
    integer (and small enough for exact float32), or ``(0, x)`` if none does."""
    for m in range(1, max_multiplier + 1):
        y = x.astype(np.float64) * m
        r = np.rint(y)
        if r.size == 0 or (np.abs(y - r).max() <= 1e-3 and np.abs(r).max() < 2**23):
            return m, r.astype(np.int64)
    return 0, x


def pack(x: np.ndarray) -> bytes:
    m, ints = as_integers(x)
    if m == 0:
        return _HEADER.pack(0, 32, 0, x.size) + x.astype(np.float32).tobytes()
    offset = int(np.abs(ints).max()) if ints.size else 0
    width = max(1, (2 * offset).bit_length())
    unsigned = (ints + offset).astype(np.uint32)
    bits = ((unsigned[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return _HEADER.pack(m, width, offset, x.size) + np.packbits(bits.reshape(-1)).tobytes()


def unpack(data: bytes) -> np.ndarray:
    m, width, offset, count = _HEADER.unpack_from(data)
    body = np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size)
    if m == 0:
        return body.view(np.float32)[:count].copy()
    bits = np.unpackbits(body, count=count * width).reshape(count, width).astype(np.int64)
    unsigned = (bits << np.arange(width, dtype=np.int64)).sum(axis=1)
    return ((unsigned - offset) / m).astype(np.float32)
