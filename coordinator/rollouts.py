"""The lease protocol's handlers (``/bazaar/leases/1.0.0``, signed both ways): ``LeaseRequest``
→ ``Lease`` or ``NoLease``, ``RolloutReceipt`` → ``ReceiptAck``, and leases that expire.

Who may ask is the server's call (members with the inference role); which leases and which
receipts count is the lease book's (``coordinator/leases.py``). A counted receipt is audited or
not by a draw made after it arrived (``coordinator/auditing.py``'s book), and its payload is
fetched and counted by the coordinator itself (``coordinator/recount.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from coordinator.db import ReceiptRow
from coordinator.leases import ReceiptOutcome
from coordinator.lifecycle import RunLifecycle
from coordinator.state import State
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.rollouts import ReceiptAck, RolloutReceipt

log = logging.getLogger(__name__)


class Rollouts:
    def __init__(
        self,
        state: State,
        runs: RunLifecycle,
        recount: Callable[[str], None] = lambda lease_id: None,
    ) -> None:
        self.state = state
        self.runs = runs
        self.recount = recount
        """Hands a counted lease to the coordinator's own count of its payload."""

    async def lease(self, peer: str, req: LeaseRequest, trainers: int = 0) -> Lease | NoLease:
        """A lease for ``peer``. While ``trainers`` are on the network, a run has at most two
        rounds' worth of leases out or waiting for training (``round_leases`` per trainer, per
        round): one round is sampled while the trainers train the one before, and the rest of
        the run's examples wait for the versions made from them."""
        state, config = self.state, self.state.config
        self.expire()
        state.held[peer] = dict(req.adapter_versions)  # what it can serve to other nodes too
        lease = state.book.issue_for(
            peer,
            req.base_model,
            req.max_prompts,
            dict(req.adapter_versions),
            config.max_active_per_node,
            2 * config.round_leases * trainers if trainers else None,
        )
        if lease is None:
            return NoLease(retry_after_s=config.retry_after_s)
        state.commit()
        state.metrics.leases_issued.inc()
        log.debug("lease %s (%d examples) to %s", lease.lease_id, len(lease.example_indices), peer)
        return lease

    async def receipt(self, peer: str, receipt: RolloutReceipt) -> ReceiptAck:
        state, book = self.state, self.state.book
        run = book.runs.get(receipt.run_id)
        was = run.state if run else ""
        outcome = book.receipt(peer, receipt)
        lease = book.leases.get(receipt.lease_id)
        state.add(ReceiptRow(
            lease_id=receipt.lease_id, run_id=receipt.run_id, node=peer,
            payload_hash=receipt.payload_hash, num_samples=receipt.num_samples,
            completion_tokens=receipt.completion_tokens, outcome=outcome.value,
            received_at=state.clock(),
        ))  # fmt: skip
        state.metrics.receipts.labels(outcome.value).inc()
        if outcome is not ReceiptOutcome.COUNTED or run is None or lease is None:
            state.commit()
            log.info("receipt for lease %s from %s: %s", receipt.lease_id, peer, outcome.value)
            return ReceiptAck(lease_id=receipt.lease_id, outcome=outcome.value, counted_examples=0)
        state.metrics.rollout_tokens.inc(receipt.completion_tokens)
        # drawn now, after the receipt arrived: the producer could not know
        made = receipt.profile
        dtype, device = (made.dtype, made.device if made.threads else "") if made else ("", "")
        if state.audits.on_counted(receipt.lease_id, receipt.run_id, peer, receipt.payload_hash,
                                   run.plan.spec.verification.audit_floor, dtype,
                                   device):  # fmt: skip
            lease.audit = "pending"
        state.commit()
        self.recount(lease.lease_id)
        if was == "running" and run.state != "running":
            await self.runs.ended(run)  # its last example delivered
        return ReceiptAck(
            lease_id=receipt.lease_id, outcome=outcome.value, counted_examples=len(lease.counted)
        )

    def expire(self) -> None:
        """Audits and leases past their deadlines go back to their queues."""
        state = self.state
        audits = state.audits.expire()
        expired = state.book.expire()
        for s in expired:
            log.info("lease %s of %s expired; %d examples go back to the queue",
                     s.lease_id, s.node, len(s.lease.example_indices))  # fmt: skip
        state.metrics.leases_expired.inc(len(expired))
        if expired or audits:
            state.commit()

    async def expire_loop(self, period_s: float = 1.0) -> None:
        while True:
            await trio.sleep(period_s)
            self.expire()
