"""Verification messages: audits handed to verifiers and the signed verdicts they return.

The coordinator sends a verifier an ``AuditAssignment`` (never the producer's own work); the
verifier fetches the payload from the producer, recomputes, and answers with a ``Verdict`` that
names the first check that failed. Verdicts are stored with their signatures as evidence.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from protocol.codec import Hash32, KiB, Message, Name, NonNegInt, PeerIdStr, Text


class AuditAssignment(Message):
    """Coordinator → verifier: check this producer's payload by this deadline."""

    TYPE: ClassVar[str] = "verification.assignment"
    MAX_BYTES: ClassVar[int] = 4 * KiB
    audit_id: Name
    lease_id: Name
    producer: PeerIdStr
    payload_hash: Hash32
    deadline_ms: NonNegInt


class Verdict(Message):
    """Verifier → coordinator: the payload passed, or which check failed and how."""

    TYPE: ClassVar[str] = "verification.verdict"
    MAX_BYTES: ClassVar[int] = 16 * KiB
    audit_id: Name
    lease_id: Name
    producer: PeerIdStr
    payload_hash: Hash32
    passed: bool
    failed_check: Annotated[str, msgspec.Meta(max_length=64)] = ""
    detail: Text = ""
    stats: Annotated[dict[Name, float], msgspec.Meta(max_length=64)] = {}
