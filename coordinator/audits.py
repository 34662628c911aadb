"""Audits: which receipts are checked, by whom, and what a confirmed failure costs.

Pure logic over an injected clock and random source (``coordinator/auditing.py`` wraps it with
the network, ``coordinator/state.py`` with the database). Audits still open are indexed apart
(``open``, and ``assigned`` among them), so assigning and expiring audits never walks the
history.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.config import AuditConfig
from coordinator.db import Audit, Trust, VerdictRecord
from protocol.verification import Verdict, VerdictOutcome


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
        keep: Callable[[object], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or secrets.SystemRandom()
        self.keep = keep or (lambda entity: None)
        self.trust: dict[str, Trust] = {}
        self.audits: dict[str, Audit] = {}
        self.open: dict[str, Audit] = {}
        """Audits pending or assigned, oldest first."""
        self.assigned: dict[str, Audit] = {}
        """The open audits a verifier holds now."""

    def restore(self, trust: Iterable[Trust], audits: Iterable[Audit]) -> None:
        """Rebuild from stored records; an audit assigned when the coordinator stopped goes
        back to the queue (its verifier's deadline is gone with the process)."""
        for t in trust:
            self.trust[t.peer_id] = t
        for a in audits:
            if a.status == "assigned":
                a.status, a.verifier = "pending", ""
            self.audits[a.audit_id] = a
            if a.status == "pending":
                self.open[a.audit_id] = a

    def trust_of(self, node: str) -> Trust:
        trust = self.trust.get(node)
        if trust is None:
            trust = self.trust[node] = Trust(node)
            self.keep(trust)
        return trust

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
        self.audits[audit.audit_id] = self.open[audit.audit_id] = audit
        self.keep(audit)
        return audit

    def expire(self) -> list[Audit]:
        """Assigned audits past their deadline go back to the queue."""
        now, back = self.clock(), []
        for audit in list(self.assigned.values()):
            if now > audit.deadline:
                audit.status, audit.verifier = "pending", ""
                del self.assigned[audit.audit_id]
                back.append(audit)
        return back

    def assign(
        self, verifier: str, can_check: Callable[[Audit], bool] = lambda a: True
    ) -> Audit | None:
        """The oldest audit this verifier may take: not its own work, not one it has judged,
        and one it can check (``can_check``: it runs the run's base model)."""
        self.expire()
        for audit in self.open.values():
            if (
                audit.status == "pending"
                and audit.producer != verifier
                and verifier not in audit.seen_by()
                and can_check(audit)
            ):
                audit.status, audit.verifier = "assigned", verifier
                self.assigned[audit.audit_id] = audit
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
        del self.assigned[audit.audit_id]
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
        del self.open[audit.audit_id]  # decided, unless the first failure asks for a second look
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
            self.open[audit.audit_id] = audit
            return "confirming", None
        audit.status = "failed"
        return "confirmed_failure", self._strike(audit, verdict.failed_check)

    def convict(
        self,
        lease_id: str,
        run_id: str,
        producer: str,
        payload_hash: bytes,
        judge: str,
        check: str,
        detail: str,
        evidence: bytes,
    ) -> Penalty:
        """A failure the coordinator saw itself (``judge``, its peer id): the producer's own
        signed payload contradicts its receipt, so no verifier needs to confirm it. Recorded as
        a failed audit, with the payload as evidence; open audits of the lease are dropped."""
        self.cancel_for({lease_id})
        now = self.clock()
        audit = Audit(uuid.uuid4().hex, lease_id, run_id, producer, payload_hash, now,
                      stage="confirm", status="failed", verifier=judge)  # fmt: skip
        audit.verdicts.append(VerdictRecord(judge, False, check, detail, evidence, now))
        self.audits[audit.audit_id] = audit
        self.keep(audit)
        return self._strike(audit, check)

    def _strike(self, audit: Audit, check: str) -> Penalty:
        trust = self.trust_of(audit.producer)
        trust.failed += 1
        trust.clean_streak = 0
        return Penalty(audit.producer, audit.lease_id, check, self.strike(audit.producer))

    def strike(self, node: str) -> bool:
        """A strike against a node caught lying (a producer's failed audit, a trainer's false
        report); True if that bans it (``max_strikes``)."""
        trust = self.trust_of(node)
        trust.strikes += 1
        trust.banned = trust.banned or trust.strikes >= self.config.max_strikes
        return trust.banned

    def cancel_for(self, lease_ids: set[str]) -> None:
        """Drop open audits of quarantined leases: their work is redone anyway."""
        for audit in [a for a in self.open.values() if a.lease_id in lease_ids]:
            audit.status = "cancelled"
            del self.open[audit.audit_id]
            self.assigned.pop(audit.audit_id, None)
