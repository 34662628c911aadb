"""A sample's seed, derived from its lease's randomness: pure hashing, no torch, so the
coordinator (which recounts payloads and derives seeds, and samples nothing) starts without
loading torch."""

from __future__ import annotations

import hashlib

SEED_DOMAIN = b"bazaar/sample-seed/v1\x00"
_MASK63 = (1 << 63) - 1


def derive_seed(lease_seed: bytes, sample_index: int, policy_version: int) -> int:
    """A sample's seed: a hash of the lease's randomness, the sample index and the version."""
    digest = hashlib.sha256(
        SEED_DOMAIN
        + lease_seed
        + sample_index.to_bytes(8, "big")
        + policy_version.to_bytes(8, "big")
    ).digest()
    return int.from_bytes(digest[:8], "big") & _MASK63
