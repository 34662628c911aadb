"""The audit protocol's handlers (``/bazaar/audits/1.0.0``): ``AuditRequest`` →
``AuditAssignment`` or ``NoAudit``, ``Verdict`` → ``VerdictAck``, and the penalty a confirmed
failure costs its producer.

Which audits exist and what a verdict decides is the audit book's (``coordinator/audits.py``).
A confirmed failure rejects the rollout, quarantines the producer's unaudited work in the
window, and forfeits its credit for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator.audits import Penalty
from coordinator.db import LeaseState
from coordinator.state import State
from protocol.verification import AuditAssignment, AuditRequest, NoAudit, Verdict, VerdictAck

log = logging.getLogger(__name__)


class Auditing:
    def __init__(self, state: State) -> None:
        self.state = state

    async def request(
        self, peer: str, req: AuditRequest, addrs_of: Callable[[str], list[str]]
    ) -> AuditAssignment | NoAudit:
        state = self.state
        runs = state.book.runs
        audit = state.audits.assign(
            peer, lambda a: runs[a.run_id].plan.spec.base_model == req.base_model
        )
        if audit is None:
            return NoAudit(retry_after_s=state.config.retry_after_s)
        state.commit()
        run = runs[audit.run_id]
        counted = state.book.leases[audit.lease_id]
        lease = counted.lease
        return AuditAssignment(
            audit_id=audit.audit_id,
            lease=lease,
            producer=audit.producer,
            producer_addrs=addrs_of(audit.producer)[:16],
            payload_hash=audit.payload_hash,
            completion_tokens=counted.completion_tokens,
            current_version=run.policy_version,
            # the lease fixed the version: the run moving on since is not the producer's doing
            max_staleness=max(0, run.policy_version - lease.policy_version),
            deadline_ms=int(audit.deadline * 1000),
        )

    async def verdict(self, peer: str, verdict: Verdict, frame: bytes) -> VerdictAck:
        state = self.state
        outcome, penalty = state.audits.verdict(peer, verdict, frame)
        audit = state.audits.audits.get(verdict.audit_id)
        state.metrics.verdicts.labels(outcome).inc()
        if audit is None or outcome in ("unknown_audit", "wrong_verifier"):
            log.warning("verdict from %s refused: %s", peer, outcome)
            return VerdictAck(audit_id=verdict.audit_id, outcome=outcome)
        lease = state.book.leases[audit.lease_id]
        if outcome != "reassigned":  # a verifier that could not check hands it on, unpaid
            state.billing.credit_verified(audit.run_id, audit.audit_id, peer,
                                          lease.completion_tokens)  # fmt: skip
        if outcome in ("recorded", "cleared"):
            lease.audit = "passed"
        if penalty is not None:
            await self.penalize(penalty)
        elif outcome == "confirming":
            log.warning(
                "audit %s of %s failed %s (%s); asking a second verifier",
                audit.audit_id, audit.producer, verdict.failed_check, verdict.detail,
            )  # fmt: skip
        state.commit()
        return VerdictAck(audit_id=verdict.audit_id, outcome=outcome)

    async def convict(self, lease: LeaseState, judge: str, check: str, detail: str,
                      evidence: bytes) -> Penalty:  # fmt: skip
        """Penalize a producer whose own signed payload (``evidence``) contradicts its receipt,
        as the coordinator found it (``judge``): no verifier needed."""
        penalty = self.state.audits.convict(
            lease.lease_id, lease.run_id, lease.node, lease.payload_hash or b"", judge, check,
            detail, evidence,
        )  # fmt: skip
        await self.penalize(penalty)
        self.state.commit()
        return penalty

    async def penalize(self, penalty: Penalty) -> None:
        """Apply a confirmed failure: reject, quarantine, forfeit (back to the run's payer)."""
        state = self.state
        leases = self._penalize(penalty)
        state.book.leases[penalty.lease_id].audit = "failed"
        run = state.book.runs[state.book.leases[penalty.lease_id].run_id]
        await state.billing.forfeit(run, penalty.producer, [s.lease_id for s in leases])

    def _penalize(self, penalty: Penalty) -> list[LeaseState]:
        """Reject the rollout, quarantine the producer's unaudited work in the window, forfeit
        its credits there; returns the leases changed."""
        state, book = self.state, self.state.book
        now = state.clock()
        window = state.audits.config.quarantine_window_s
        passed = {a.lease_id for a in state.audits.audits.values()
                  if a.producer == penalty.producer and a.status == "passed"}  # fmt: skip
        rejected = book.leases[penalty.lease_id]
        quarantined = [
            s
            for s in book.of_node.get(penalty.producer, [])
            if s.status == "completed"
            and s.counted
            and s.lease_id not in passed
            and s.lease_id != penalty.lease_id
            and (s.completed_at or 0.0) >= now - window
        ]
        forfeited = rejected.completion_tokens if rejected.counted else 0
        book.uncount(penalty.lease_id, "rejected")
        for s in quarantined:
            forfeited += s.completion_tokens
            book.uncount(s.lease_id, "quarantined")
        state.audits.cancel_for({s.lease_id for s in quarantined})
        trust = state.audits.trust_of(penalty.producer)
        trust.credited_tokens -= forfeited
        trust.forfeited_tokens += forfeited
        state.metrics.penalties.inc()
        log.warning(
            "confirmed %s failure by %s on lease %s: rollout rejected, %d receipts quarantined, "
            "%d tokens of credit forfeited, strike %d%s",
            penalty.failed_check, penalty.producer, penalty.lease_id, len(quarantined),
            forfeited, trust.strikes, "; banned" if penalty.banned else "",
            extra={"peer": penalty.producer, "lease_id": penalty.lease_id},
        )  # fmt: skip
        return [rejected, *quarantined]
