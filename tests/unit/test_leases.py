"""Lease bookkeeping on a controlled clock: issue, expire, re-issue, idempotent receipts."""

from __future__ import annotations

import dataclasses
import hashlib

import msgspec
import pytest

from coordinator.db import RunState
from coordinator.leases import LeaseBook, ReceiptOutcome
from protocol.leases import Lease
from protocol.rollouts import RolloutReceipt
from protocol.runs import BudgetSpec, DilocoSpec, EnvSpec, RLSpec, RunPlan, RunSpec


def plan(
    run_id: str = "r1",
    base_model: str = "tiny",
    max_staleness: int = 2,
    budget: int | None = None,
    **rl: float | int | None,
) -> RunPlan:
    """A run's plan as ``plan_run`` makes it, without loading the environment."""
    rl = {"group_size": 4, "temperature": 1.0, "max_tokens": 32, "lease_ttl_s": 60.0,
          "max_examples": 10, **rl}  # fmt: skip
    spec = RunSpec(name=run_id, base_model=base_model, env=EnvSpec(args={"digits": 2}, seed=7),
                   rl=RLSpec(**rl), diloco=DilocoSpec(max_staleness=max_staleness),
                   budget=BudgetSpec(max_tokens=budget))  # type: ignore[arg-type]  # fmt: skip
    return RunPlan(spec=spec, run_id=run_id, env='arith {"digits":2}', env_version="1",
                   env_seed=7)  # fmt: skip


PLAN = plan()


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


def test_issue_for_matches_base_model_caps_active_leases_and_rotates_runs() -> None:
    b, _ = book()
    b.add_run(plan("r2"))
    b.add_run(plan("big", base_model="big-model"))
    assert b.issue_for("a", "other-model", 4) is None
    first = b.issue_for("a", "tiny", 4, max_active=2)
    second = b.issue_for("a", "tiny", 4, max_active=2)
    assert first is not None and second is not None
    assert {first.run_id, second.run_id} == {"r1", "r2"}  # round robin over the runs it can serve
    assert b.issue_for("a", "tiny", 4, max_active=2) is None  # holds two already
    big = b.issue_for("c", "big-model", 4)
    assert big is not None and big.run_id == "big"


def test_runs_past_version_zero_need_the_adapter_and_complete_when_delivered() -> None:
    b, _ = book()
    b.set_policy_version("r1", 2)
    assert b.issue_for("a", "tiny", 10) is None  # does not hold the run's adapter
    lease = b.issue_for("a", "tiny", 10, adapter_versions={"r1": 2})
    assert lease is not None and lease.policy_version == 2 and len(lease.example_indices) == 8
    assert b.receipt("a", receipt_for(lease)) is ReceiptOutcome.COUNTED
    rest = b.issue_for("a", "tiny", 10, adapter_versions={"r1": 2})
    assert rest is not None and rest.example_indices == [8, 9]  # prompts_per_lease is 8
    assert b.runs["r1"].state == "running"
    assert b.receipt("a", receipt_for(rest)) is ReceiptOutcome.COUNTED
    assert b.runs["r1"].state == "completed" and b.runs["r1"].completion_tokens == 200
    assert b.issue("r1", "a", 1) is None


def test_restore_rebuilds_delivered_and_requeued_examples() -> None:
    b, clock = book()
    done = b.issue("r1", "a", 2)
    lost = b.issue("r1", "b", 2)
    held = b.issue("r1", "c", 2)
    assert done and lost and held
    b.receipt("a", receipt_for(done))
    clock.now += 30
    b.leases[lost.lease_id].lease = msgspec.structs.replace(lost, deadline_ms=0)
    b.expire()
    # what the database keeps: a run's plan and counters, each lease's state
    stored = RunState(b.runs["r1"].plan, cursor=b.runs["r1"].cursor)
    copy = LeaseBook(clock)
    copy.restore([stored], [dataclasses.replace(s) for s in b.leases.values()])
    assert set(copy.done["r1"]) == {0, 1} and list(copy.returned["r1"]) == [2, 3]
    assert set(copy.active) == {held.lease_id}
    again = copy.issue("r1", "d", 4)
    assert again is not None and again.example_indices == [2, 3, 6, 7]


def test_a_payload_handed_in_for_one_lease_is_refused_for_another() -> None:
    b, _ = book()
    mine = b.issue("r1", "a", 2)
    theirs = b.issue("r1", "b", 2)
    assert mine is not None and theirs is not None
    assert b.receipt("a", receipt_for(mine)) is ReceiptOutcome.COUNTED
    copied = msgspec.structs.replace(
        receipt_for(theirs), payload_hash=receipt_for(mine).payload_hash
    )
    assert b.receipt("b", copied) is ReceiptOutcome.DUPLICATE_PAYLOAD
    assert b.delivered("r1") == 2 and b.leases[theirs.lease_id].status == "active"


def test_a_penalized_leases_receipt_sent_again_does_not_count_again() -> None:
    b, _ = book()
    lease = b.issue("r1", "a", 2)
    assert lease is not None
    assert b.receipt("a", receipt_for(lease)) is ReceiptOutcome.COUNTED
    assert b.uncount(lease.lease_id, "quarantined") == lease.example_indices
    # the producer's retry of the same receipt (its ack lost, say) is a duplicate, not a count
    assert b.receipt("a", receipt_for(lease)) is ReceiptOutcome.DUPLICATE
    assert b.delivered("r1") == 0 and b.runs["r1"].completion_tokens == 0
    assert b.leases[lease.lease_id].status == "quarantined"


def test_a_receipt_claiming_more_tokens_than_its_lease_allows_is_refused() -> None:
    b, _ = book()
    lease = b.issue("r1", "a", 2)
    assert lease is not None  # 2 examples x 4 samples x 32 max tokens: at most 256
    too_many = msgspec.structs.replace(receipt_for(lease), completion_tokens=257)
    assert b.receipt("a", too_many) is ReceiptOutcome.TOO_MANY_TOKENS
    assert b.delivered("r1") == 0 and b.leases[lease.lease_id].status == "active"
    at_most = msgspec.structs.replace(receipt_for(lease), completion_tokens=256)
    assert b.receipt("a", at_most) is ReceiptOutcome.COUNTED
