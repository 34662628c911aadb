"""Lease bookkeeping on a controlled clock: issue, expire, re-issue, idempotent receipts."""

from __future__ import annotations

import hashlib

import pytest

from coordinator.leases import LeaseBook, ReceiptOutcome, RunPlan
from protocol.leases import Lease, SamplingParams
from protocol.rollouts import RolloutReceipt

PLAN = RunPlan(
    run_id="r1", env='arith {"digits":2}', env_version="1", env_seed=7, group_size=4,
    sampling=SamplingParams(temperature=1.0, max_tokens=8), lease_ttl_s=60.0, total_examples=10,
)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def receipt_for(
    lease: Lease, version: int | None = None, samples: int | None = None
) -> RolloutReceipt:
    return RolloutReceipt(
        lease_id=lease.lease_id,
        run_id=lease.run_id,
        policy_version=lease.policy_version if version is None else version,
        payload_hash=hashlib.sha256(lease.lease_id.encode()).digest(),
        num_samples=len(lease.example_indices) * lease.group_size if samples is None else samples,
        completion_tokens=100,
    )


def book() -> tuple[LeaseBook, Clock]:
    clock = Clock()
    b = LeaseBook(clock)
    b.add_run(PLAN)
    return b, clock


def test_leases_hand_out_examples_in_order_with_fresh_randomness() -> None:
    b, _ = book()
    first = b.issue("r1", "node-a", 4)
    second = b.issue("r1", "node-b", 4)
    assert first is not None and second is not None
    assert first.example_indices == [0, 1, 2, 3] and second.example_indices == [4, 5, 6, 7]
    assert first.lease_seed != second.lease_seed and len(first.lease_seed) == 32
    assert first.env_id == PLAN.env and first.group_size == 4 and first.deadline_ms == 1_060_000
    last = b.issue("r1", "node-a", 4)
    assert last is not None and last.example_indices == [8, 9]
    assert b.issue("r1", "node-a", 4) is None  # the run's examples are all out


def test_an_expired_lease_is_reissued_to_another_node_and_counted_once() -> None:
    b, clock = book()
    lost = b.issue("r1", "dead-node", 3)
    assert lost is not None
    clock.now += 61
    again = b.issue("r1", "live-node", 3)
    assert again is not None and again.example_indices == lost.example_indices
    assert b.leases[lost.lease_id].status == "expired"
    assert b.receipt("live-node", receipt_for(again)) is ReceiptOutcome.COUNTED
    assert b.delivered("r1") == 3
    # the dead node comes back late: its work is already delivered by the other
    assert b.receipt("dead-node", receipt_for(lost)) is ReceiptOutcome.DUPLICATE
    assert b.delivered("r1") == 3


def test_a_late_receipt_counts_if_nobody_delivered_first() -> None:
    b, clock = book()
    slow = b.issue("r1", "slow", 2)
    assert slow is not None
    clock.now += 61
    retry = b.issue("r1", "fast", 2)
    assert retry is not None
    assert b.receipt("slow", receipt_for(slow)) is ReceiptOutcome.COUNTED  # real work, first in
    assert b.receipt("fast", receipt_for(retry)) is ReceiptOutcome.DUPLICATE
    assert b.delivered("r1") == 2


def test_duplicate_and_bad_receipts_are_outcomes_not_errors() -> None:
    b, _ = book()
    lease = b.issue("r1", "a", 2)
    assert lease is not None
    assert b.receipt("b", receipt_for(lease)) is ReceiptOutcome.WRONG_NODE
    assert b.receipt("a", receipt_for(lease, version=5)) is ReceiptOutcome.WRONG_VERSION
    assert b.receipt("a", receipt_for(lease, samples=1)) is ReceiptOutcome.WRONG_SIZE
    assert b.receipt("a", receipt_for(lease)) is ReceiptOutcome.COUNTED
    assert b.receipt("a", receipt_for(lease)) is ReceiptOutcome.DUPLICATE
    assert b.delivered("r1") == 2
    unknown = RolloutReceipt(
        lease_id="nope", run_id="r1", policy_version=0, payload_hash=bytes(32),
        num_samples=8, completion_tokens=1,
    )  # fmt: skip
    assert b.receipt("a", unknown) is ReceiptOutcome.UNKNOWN_LEASE


def test_policy_version_is_leased_and_runs_are_checked() -> None:
    b, _ = book()
    b.set_policy_version("r1", 3)
    lease = b.issue("r1", "a", 1)
    assert lease is not None and lease.policy_version == 3
    with pytest.raises(ValueError, match="already exists"):
        b.add_run(PLAN)
