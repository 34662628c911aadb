"""Verification messages: audits handed to verifiers and the signed verdicts they return.

A verifier asks for work with ``AuditRequest`` (audit protocol); the coordinator answers with an
``AuditAssignment`` (never the producer's own work, never a verifier's second look at the same
audit) or ``NoAudit``. The verifier fetches the payload from the sources the assignment lists,
recomputes, and answers with a ``Verdict`` that names the first check that failed;
``VerdictAck`` says what the coordinator made of it. Verdicts are stored with their signatures
as evidence. Some assignments re-send a payload whose verdict is already settled, to check the
verifier (``coordinator/audits.py``): nothing in the message says which.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from protocol.adapters import RolloutRef
from protocol.codec import Hash32, KiB, Message, MiB, Name, NonNegInt, PeerIdStr, Text
from protocol.leases import Lease
from protocol.membership import PeerRecord
from protocol.rollouts import Dtype
from protocol.runs import TrainSettings

VerdictOutcome = Literal[
    "recorded",
    "confirming",
    "confirmed_failure",
    "cleared",
    "reassigned",
    "unknown_audit",
    "wrong_verifier",
]


class AuditRequest(Message):
    """Verifier → coordinator (audit protocol): I can check a payload made with this model."""

    TYPE: ClassVar[str] = "verification.request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0
    """How long the coordinator may hold the request for an audit to open before it answers
    ``NoAudit`` (a long poll, capped by the coordinator's ``audits.max_wait_s``): an idle
    verifier is handed an audit the moment one opens, and asks a few times a minute."""
    dtypes: Annotated[list[Dtype], msgspec.Meta(max_length=8)] = msgspec.field(default_factory=list)
    """The dtypes it can replay with calibrated thresholds (empty: any): it is handed only
    audits of payloads made in one of them."""
    device: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """The device class on which it generates again bit for bit (``ComputeProfile.device``;
    empty: none): audits of payloads made there wait for such verifiers while one is asking
    (``AuditConfig.exact_hold_s``) — they replay suspicious leases exactly."""


class AuditAssignment(Message):
    """Coordinator → verifier: check this producer's payload for this lease by this deadline."""

    TYPE: ClassVar[str] = "verification.assignment"
    MAX_BYTES: ClassVar[int] = 80 * KiB
    audit_id: Name
    lease: Lease
    """The lease as it was issued: prompts, seeds and sampling are rebuilt from it."""
    producer: PeerIdStr
    producer_addrs: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]],
                              msgspec.Meta(max_length=16)]  # fmt: skip
    """Where the payload may be fetched, first to last: the producer's multiaddrs (while it is
    up), then the coordinator's (it keeps a copy of every payload it recounted); each ends in
    ``/p2p/<peer id>``. Whoever serves it, the payload must be signed by ``producer``."""
    payload_hash: Hash32
    completion_tokens: NonNegInt
    """The completion tokens the producer's receipt claimed: the verifier counts them again."""
    current_version: NonNegInt
    max_staleness: NonNegInt
    deadline_ms: NonNegInt


class NoAudit(Message):
    """Coordinator → verifier: nothing to check now; ask again after ``retry_after_s``."""

    TYPE: ClassVar[str] = "verification.none"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0


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


class VerdictAck(Message):
    """Coordinator → verifier: what became of a verdict."""

    TYPE: ClassVar[str] = "verification.verdict_ack"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    audit_id: Name
    outcome: VerdictOutcome


class PartRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A trainer's committed part of a round, and where it is served."""

    trainer: PeerIdStr
    addrs: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]],
                     msgspec.Meta(max_length=16)]  # fmt: skip
    part_hash: Hash32


class ReplayAssignment(Message):
    """Coordinator → verifier (audit protocol, in answer to ``AuditRequest``): replay
    ``trainer``'s round of a run from version ``version`` — the dealt ``rollouts``, the run's
    ``settings``, a fresh AdamW, the scales of the step ``parent`` → ``version`` — and check its
    committed part against it; then check that the adapter ``manifest`` (the version the round
    made, as one of its group signed it, or the one the trainer proposed) is the outer step
    with the mean of the round's committed ``parts``."""

    TYPE: ClassVar[str] = "verification.replay"
    MAX_BYTES: ClassVar[int] = 8 * MiB
    audit_id: Name
    run_id: Name
    version: NonNegInt
    parent: Annotated[int, msgspec.Meta(ge=-1)]
    """The version ``version`` was trained from (-1: ``version`` is 0)."""
    trainer: PeerIdStr
    parts: Annotated[list[PartRef], msgspec.Meta(min_length=1, max_length=64)]
    """Every committed part the version averaged, ``trainer``'s first."""
    manifest: Annotated[bytes, msgspec.Meta(max_length=80 * KiB)]
    holders: Annotated[list[PeerRecord], msgspec.Meta(max_length=16)]
    """Who serves the manifest's shards."""
    rollouts: Annotated[list[RolloutRef], msgspec.Meta(min_length=1, max_length=4096)]
    settings: TrainSettings
    deadline_ms: NonNegInt


class ReplayVerdict(Message):
    """Verifier → coordinator: the trainer's round replayed as committed, or which check failed."""

    TYPE: ClassVar[str] = "verification.replay_verdict"
    MAX_BYTES: ClassVar[int] = 16 * KiB
    audit_id: Name
    trainer: PeerIdStr
    passed: bool
    failed_check: Annotated[str, msgspec.Meta(max_length=64)] = ""
    detail: Text = ""
    stats: Annotated[dict[Name, float], msgspec.Meta(max_length=64)] = {}
