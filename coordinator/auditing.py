"""The audit protocol's handlers (``/bazaar/audits/1.0.0``): ``AuditRequest`` →
``AuditAssignment`` or ``NoAudit``, ``Verdict`` → ``VerdictAck``, and what a decision costs or
earns: a producer's penalty, a verifier's pay, a verifier's strike.

Which audits exist and what a verdict decides is the audit book's (``coordinator/audits.py``,
where the rules are written down); this applies its rulings to leases, credits and the
payload store. A failure decided against a producer rejects the rollout, quarantines the
producer's unaudited work in the window, and forfeits its credit for them (back to the run's
payer). A verifier is credited the tokens of an audit once it is decided, if its verdict agrees;
a verifier's strike forfeits its credit for the window's checks to the network. The payloads of
known answers are pinned in the coordinator's payload store, which serves them; one it lacks
(a cheat rejected before the coordinator's own count fetched it) is fetched from its producer
(``keep_references``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from coordinator.audits import Penalty, Ruling, VerifierPenalty
from coordinator.db import Audit, LeaseState
from coordinator.state import State
from protocol.errors import ProtocolError
from protocol.payload_store import PayloadStore
from protocol.verification import AuditAssignment, AuditRequest, NoAudit, Verdict, VerdictAck

log = logging.getLogger(__name__)

Fetch = Callable[[LeaseState], Awaitable[bytes]]
"""Fetch a rollout's payload frame from its producer, checked (raises on failure)."""


class Auditing:
    def __init__(self, state: State, payloads: PayloadStore | None = None) -> None:
        self.state = state
        self.payloads = payloads
        """The coordinator's copies of payloads: known answers are served from there."""
        self._missing: deque[str] = deque()
        self._asked: set[str] = set()  # leases whose payload was asked for once already
        self._wake = trio.Event()

    def _can_serve(self, digest: bytes) -> bool:
        return self.payloads is not None and digest in self.payloads

    async def request(
        self, peer: str, req: AuditRequest, sources: Callable[[str], list[str]]
    ) -> AuditAssignment | NoAudit:
        """The next audit for ``peer``; ``sources(producer)``: where its payload may be
        fetched (the producer while it is up, and the coordinator), the same for every audit."""
        state = self.state
        runs = state.book.runs

        def assign() -> Audit | None:
            def can_check(a: Audit) -> bool:  # its model, in a dtype it can replay
                return runs[a.run_id].plan.spec.base_model == req.base_model and (
                    not req.dtypes or not a.dtype or a.dtype in req.dtypes
                )

            return state.audits.assign(peer, can_check, self._can_serve, req.device)

        audit = assign()
        wait_s = min(req.wait_s, state.audits.config.max_wait_s)
        with trio.move_on_after(wait_s):
            while audit is None:  # a long poll: every commit may have opened one
                await state.next_commit()
                audit = assign()
        if audit is None:
            return NoAudit(retry_after_s=0.0 if wait_s else state.config.retry_after_s)
        run = runs[audit.run_id]
        lease = state.book.leases[audit.lease_id]
        if audit.current_version is None:
            # the lease fixed the version: the run moving on since is not the producer's doing
            audit.current_version = run.policy_version
            audit.max_staleness = max(0, run.policy_version - lease.lease.policy_version)
        state.commit()
        return AuditAssignment(
            audit_id=audit.audit_id,
            lease=lease.lease,
            producer=audit.producer,
            producer_addrs=sources(audit.producer)[:16],
            payload_hash=audit.payload_hash,
            completion_tokens=lease.completion_tokens,
            current_version=audit.current_version,
            max_staleness=audit.max_staleness,
            deadline_ms=int(audit.deadline * 1000),
        )

    async def verdict(self, peer: str, verdict: Verdict, frame: bytes) -> VerdictAck:
        state = self.state
        ruling = state.audits.verdict(peer, verdict, frame)
        state.metrics.verdicts.labels(ruling.outcome).inc()
        audit = ruling.audit
        if audit is None or ruling.outcome in ("unknown_audit", "wrong_verifier"):
            log.warning("verdict from %s refused: %s", peer, ruling.outcome)
            state.commit()
            return VerdictAck(audit_id=verdict.audit_id, outcome=ruling.outcome)
        if audit.known_answer and audit.status in ("right", "wrong"):
            state.metrics.known_answers.labels(audit.status).inc()
        elif ruling.outcome == "confirming" and not audit.known_answer:
            log.warning(
                "audit %s of %s failed %s (%s); asking another verifier",
                audit.audit_id, audit.producer, verdict.failed_check, verdict.detail,
            )  # fmt: skip
        await self.apply(ruling)
        for decided in ruling.followups:
            await self.apply(decided)
        state.commit()
        return VerdictAck(audit_id=verdict.audit_id, outcome=ruling.outcome)

    async def convict(self, lease: LeaseState, judge: str, check: str, detail: str,
                      evidence: bytes) -> Penalty:  # fmt: skip
        """Penalize a producer whose own signed payload (``evidence``) contradicts its receipt,
        as the coordinator found it (``judge``): no verifier needed. The payload becomes a
        known cheat."""
        run = self.state.book.runs[lease.run_id]
        ruling = self.state.audits.convict(
            lease.lease_id, lease.run_id, lease.node, lease.payload_hash or b"", judge, check,
            detail, evidence, run.policy_version,
            max(0, run.policy_version - lease.lease.policy_version),
        )  # fmt: skip
        await self.apply(ruling)
        self.state.commit()
        assert ruling.penalty is not None
        return ruling.penalty

    async def apply(self, ruling: Ruling) -> None:
        """Carry out a ruling: pay who was right, set the lease's audit, penalize, strike."""
        state = self.state
        audit = ruling.audit
        assert audit is not None
        lease = state.book.leases[audit.lease_id]
        for verifier in ruling.paid:
            tokens = lease.completion_tokens
            if state.billing.credit_verified(audit.run_id, audit.audit_id, verifier, tokens):
                state.audits.trust_of(verifier).verified_tokens += tokens
        if ruling.decision == "passed":
            lease.audit = "passed"
        for reopened in ruling.reopened:
            s = state.book.leases[reopened.lease_id]
            if s.audit == "passed":
                s.audit = "pending"  # its pass was a banned verifier's word alone
        if ruling.penalty is not None:
            await self.penalize(ruling.penalty)
        for strike in ruling.struck:
            self._strike_verifier(strike)
        self.pin_references()

    def pin_references(self) -> None:
        """Keep the known answers' payloads, whatever the store's cap and retention."""
        if self.payloads is None:
            return
        audits, leases = self.state.audits, self.state.book.leases
        self.payloads.pinned = audits.reference_hashes()
        self._asked &= {a.lease_id for refs in audits.references.values() for a in refs.values()}
        for answer, refs in audits.references.items():
            held = 0
            for a in refs.values():
                lease = leases[a.lease_id]
                if a.payload_hash in self.payloads:
                    held += 1
                elif a.lease_id not in self._asked and not (
                    lease.status == "completed" and lease.recounted_tokens is None
                ):  # a counted one is being fetched by the coordinator's own count
                    self._asked.add(a.lease_id)
                    self._missing.append(a.lease_id)
                    self._wake.set()
            self.state.metrics.known_answers_kept.labels(answer).set(held)

    async def keep_references(self, fetch: Fetch) -> None:
        """Fetch the known answers' payloads the coordinator lacks, once each, and keep them
        (a producer that no longer serves one leaves that known answer unused)."""
        while True:
            while not self._missing:
                self._wake = trio.Event()
                await self._wake.wait()
            lease = self.state.book.leases[self._missing.popleft()]
            try:
                frame = await fetch(lease)
            except (ProtocolError, OSError, trio.TooSlowError) as e:
                log.info("known answer %s: payload not fetched (%s)", lease.lease_id, e)
                continue
            if self.payloads is not None:
                self.payloads.put(frame)
                self.pin_references()

    def _strike_verifier(self, strike: VerifierPenalty) -> None:
        """A verifier's strike: its credit for the window's checks goes back to the network."""
        state = self.state
        since = state.clock() - state.audits.config.quarantine_window_s
        forfeited = sum(r.tokens for r in state.billing.forfeit_verified(strike.verifier, since))
        trust = state.audits.trust_of(strike.verifier)
        trust.verified_tokens -= forfeited
        trust.verified_forfeited_tokens += forfeited
        state.metrics.verifier_strikes.labels(strike.reason).inc()
        log.warning(
            "verifier %s struck (%s, audit %s): strike %d, %d tokens of credit forfeited%s",
            strike.verifier, strike.reason, strike.audit_id, trust.verifier_strikes, forfeited,
            "; banned" if strike.banned else "", extra={"peer": strike.verifier},
        )  # fmt: skip

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
        passed = {a.lease_id for a in state.audits.audits.values() if a.producer == penalty.producer
                  and not a.known_answer and a.status in ("passed", "cleared")}  # fmt: skip
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
        # credit is what the coordinator confirmed (recount.py): only that can be forfeited
        forfeited = rejected.completion_tokens if rejected.counted and rejected.confirmed else 0
        book.uncount(penalty.lease_id, "rejected")
        for s in quarantined:
            forfeited += s.completion_tokens if s.confirmed else 0
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
