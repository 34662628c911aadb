"""Audits: which receipts are checked, by whom, and what a confirmed failure costs.

Pure logic over an injected clock and random source (the coordinator wraps it with the network
and the database).

- **Sampling.** Whether a counted receipt is audited is drawn *after* it arrived, from the
  coordinator's randomness, so a producer cannot know which of its rollouts will be checked.
  A producer is audited every time until it has ``trusted_after`` clean audits in a row, then at
  the floor rate (adaptive replication, as BOINC does it); a failure starts the count again.
  The whole lease — every group in it — is one audit.
- **Assignment.** An audit goes to a verifier that is not its producer; the second look at a
  failure goes to a verifier that has not seen it. An audit not answered by its deadline goes
  back to the queue for another verifier.
- **Confirmation.** A verifier that could not run the checks (``verifier_error``) passes the
  audit on to another verifier. A failed verdict is not a penalty: a second, independent
  verifier checks the same payload. Two failures confirm it; a pass from the second clears the
  producer.
- **Penalties** (returned as a ``Penalty`` for the caller to apply to leases and credits): the
  rollout is rejected; every unaudited receipt of the producer within the quarantine window is
  quarantined; its credits in that window are forfeited; its reputation drops; after
  ``max_strikes`` confirmed failures it is banned.
"""

from __future__ import annotations

import random
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.config import AuditConfig
from protocol.verification import Verdict, VerdictOutcome


@dataclass
class Trust:
    """A producer's record."""

    clean_streak: int = 0
    passed: int = 0
    failed: int = 0
    strikes: int = 0
    banned: bool = False
    credited_tokens: int = 0
    """Completion tokens of its counted rollouts: what it is credited for."""
    forfeited_tokens: int = 0

    @property
    def reputation(self) -> float:
        """In (0, 1]: 1 for a producer never caught; each confirmed failure weighs five passes."""
        return (self.passed + 1) / (self.passed + 1 + 5 * self.failed)


@dataclass
class VerdictRecord:
    verifier: str
    passed: bool
    failed_check: str
    detail: str
    frame: bytes
    """The verdict exactly as the verifier signed it: the evidence."""
    at: float


@dataclass
class Audit:
    audit_id: str
    lease_id: str
    run_id: str
    producer: str
    payload_hash: bytes
    created_at: float
    stage: str = "first"  # first | confirm
    status: str = "pending"  # pending | assigned | passed | failed | cleared | cancelled
    verifier: str = ""
    deadline: float = 0.0
    verdicts: list[VerdictRecord] = field(default_factory=list)

    def seen_by(self) -> set[str]:
        return {v.verifier for v in self.verdicts}


@dataclass(frozen=True)
class Penalty:
    producer: str
    lease_id: str
    failed_check: str
    banned: bool


class AuditBook:
    def __init__(
        self,
        config: AuditConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or secrets.SystemRandom()
        self.trust: dict[str, Trust] = {}
        self.audits: dict[str, Audit] = {}

    def trust_of(self, node: str) -> Trust:
        return self.trust.setdefault(node, Trust())

    def rate(self, producer: str, floor: float | None = None) -> float:
        """Audit rate of the producer's next receipt: every one until it is trusted, then the
        floor (a run's own, or the coordinator's)."""
        trust = self.trust_of(producer)
        if trust.clean_streak < self.config.trusted_after:
            return 1.0
        return self.config.floor_rate if floor is None else floor

    def on_counted(
        self,
        lease_id: str,
        run_id: str,
        producer: str,
        payload_hash: bytes,
        floor: float | None = None,
    ) -> Audit | None:
        """Decide, with fresh randomness, whether this receipt is audited; the audit if so."""
        if self.rng.random() >= self.rate(producer, floor):
            return None
        audit = Audit(uuid.uuid4().hex, lease_id, run_id, producer, payload_hash, self.clock())
        self.audits[audit.audit_id] = audit
        return audit

    def expire(self) -> list[Audit]:
        """Assigned audits past their deadline go back to the queue."""
        now, back = self.clock(), []
        for audit in self.audits.values():
            if audit.status == "assigned" and now > audit.deadline:
                audit.status, audit.verifier = "pending", ""
                back.append(audit)
        return back

    def assign(
        self, verifier: str, can_check: Callable[[Audit], bool] = lambda a: True
    ) -> Audit | None:
        """The oldest audit this verifier may take: not its own work, not one it has judged,
        and one it can check (``can_check``: it runs the run's base model)."""
        self.expire()
        for audit in self.audits.values():
            if (
                audit.status == "pending"
                and audit.producer != verifier
                and verifier not in audit.seen_by()
                and can_check(audit)
            ):
                audit.status, audit.verifier = "assigned", verifier
                audit.deadline = self.clock() + self.config.deadline_s
                return audit
        return None

    def verdict(
        self, verifier: str, verdict: Verdict, frame: bytes
    ) -> tuple[VerdictOutcome, Penalty | None]:
        """Record a verifier's verdict: ``(outcome, penalty or None)``."""
        audit = self.audits.get(verdict.audit_id)
        if audit is None or audit.lease_id != verdict.lease_id:
            return "unknown_audit", None
        if audit.status != "assigned" or audit.verifier != verifier:
            return "wrong_verifier", None
        audit.verdicts.append(
            VerdictRecord(
                verifier, verdict.passed, verdict.failed_check, verdict.detail, frame, self.clock()
            )
        )
        if not verdict.passed and verdict.failed_check == "verifier_error":
            # the verifier could not check (its own fault, not the producer's): someone else will
            audit.status, audit.verifier = "pending", ""
            return "reassigned", None
        trust = self.trust_of(audit.producer)
        if verdict.passed:
            if audit.stage == "first":
                audit.status = "passed"
                trust.passed += 1
                trust.clean_streak += 1
                return "recorded", None
            audit.status = "cleared"  # the second verifier disagrees with the first
            return "cleared", None
        if audit.stage == "first":
            audit.stage, audit.status, audit.verifier = "confirm", "pending", ""
            return "confirming", None
        audit.status = "failed"
        trust.failed += 1
        trust.strikes += 1
        trust.clean_streak = 0
        trust.banned = trust.banned or trust.strikes >= self.config.max_strikes
        return "confirmed_failure", Penalty(
            audit.producer, audit.lease_id, verdict.failed_check, trust.banned
        )

    def cancel_for(self, lease_ids: set[str]) -> None:
        """Drop open audits of quarantined leases: their work is redone anyway."""
        for audit in self.audits.values():
            if audit.lease_id in lease_ids and audit.status in ("pending", "assigned"):
                audit.status = "cancelled"

    def audited_leases(self, producer: str) -> set[str]:
        return {a.lease_id for a in self.audits.values() if a.producer == producer}
