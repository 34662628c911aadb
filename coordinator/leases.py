"""Lease bookkeeping: which examples of which run each inference node is generating.

Pure logic over an injected clock (the network and the database wrap it). A run's examples are
handed out in order; every lease gets fresh coordinator randomness (``lease_seed``) from which
the node's sampling seeds are derived, so the node cannot pick its own noise. A lease that misses
its deadline expires and its examples go back to the front of the queue for another node.

Receipts are idempotent and never double-counted: an example counts once, for the first valid
receipt that covers it. A late receipt for an expired lease still counts for the examples no one
has delivered yet (the work is real), and the re-issued lease's receipt is then a duplicate for
those. Every outcome is a typed ``ReceiptOutcome``, never an exception: a bad receipt is data.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from protocol.leases import Lease, SamplingParams
from protocol.rollouts import RolloutReceipt


@dataclass(frozen=True)
class RunPlan:
    """What to lease for one run."""

    run_id: str
    env: str
    """Canonical environment name (with arguments), as ``load_environment`` takes it."""
    env_version: str
    env_seed: int
    group_size: int
    sampling: SamplingParams
    lease_ttl_s: float = 120.0
    total_examples: int | None = None
    """Stop issuing after this many examples (None: as many as trainers consume)."""


class ReceiptOutcome(Enum):
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    UNKNOWN_LEASE = "unknown_lease"
    WRONG_NODE = "wrong_node"
    WRONG_VERSION = "wrong_version"
    WRONG_SIZE = "wrong_size"


@dataclass
class LeaseState:
    lease: Lease
    node: str
    issued_at: float
    status: str = "active"  # active | completed | expired
    counted: list[int] = field(default_factory=list)


@dataclass
class _RunState:
    plan: RunPlan
    policy_version: int = 0
    cursor: int = 0
    returned: deque[int] = field(default_factory=deque)
    done: dict[int, str] = field(default_factory=dict)  # example index -> lease that counted


class LeaseBook:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.runs: dict[str, _RunState] = {}
        self.leases: dict[str, LeaseState] = {}

    def add_run(self, plan: RunPlan) -> None:
        if plan.run_id in self.runs:
            raise ValueError(f"run {plan.run_id!r} already exists")
        if plan.group_size < 1 or plan.lease_ttl_s <= 0:
            raise ValueError("group_size must be >= 1 and lease_ttl_s > 0")
        self.runs[plan.run_id] = _RunState(plan)

    def set_policy_version(self, run_id: str, version: int) -> None:
        self.runs[run_id].policy_version = version

    def issue(self, run_id: str, node: str, max_prompts: int) -> Lease | None:
        """A lease of up to ``max_prompts`` examples for ``node``, or None when none are left."""
        self.expire()
        run = self.runs[run_id]
        indices: list[int] = []
        while run.returned and len(indices) < max_prompts:
            index = run.returned.popleft()
            if index not in run.done:
                indices.append(index)
        total = run.plan.total_examples
        while len(indices) < max_prompts and (total is None or run.cursor < total):
            indices.append(run.cursor)
            run.cursor += 1
        if not indices:
            return None
        now = self.clock()
        plan = run.plan
        lease = Lease(
            lease_id=uuid.uuid4().hex,
            run_id=run_id,
            env_id=plan.env,
            env_version=plan.env_version,
            env_seed=plan.env_seed,
            example_indices=indices,
            group_size=plan.group_size,
            policy_version=run.policy_version,
            sampling=plan.sampling,
            lease_seed=os.urandom(32),
            deadline_ms=int((now + plan.lease_ttl_s) * 1000),
        )
        self.leases[lease.lease_id] = LeaseState(lease, node, now)
        return lease

    def expire(self) -> list[LeaseState]:
        """Expire active leases past their deadline; their undelivered examples are re-queued."""
        now_ms = self.clock() * 1000
        expired = []
        for state in self.leases.values():
            if state.status == "active" and now_ms > state.lease.deadline_ms:
                state.status = "expired"
                run = self.runs[state.lease.run_id]
                for index in reversed(state.lease.example_indices):
                    if index not in run.done:
                        run.returned.appendleft(index)
                expired.append(state)
        return expired

    def receipt(self, node: str, receipt: RolloutReceipt) -> ReceiptOutcome:
        """Record a producer's receipt; every outcome is a value, not an exception."""
        state = self.leases.get(receipt.lease_id)
        if state is None or state.lease.run_id != receipt.run_id:
            return ReceiptOutcome.UNKNOWN_LEASE
        if state.node != node:
            return ReceiptOutcome.WRONG_NODE
        lease = state.lease
        if receipt.policy_version != lease.policy_version:
            return ReceiptOutcome.WRONG_VERSION
        if receipt.num_samples != len(lease.example_indices) * lease.group_size:
            return ReceiptOutcome.WRONG_SIZE
        if state.status == "completed":
            return ReceiptOutcome.DUPLICATE
        run = self.runs[lease.run_id]
        fresh = [i for i in lease.example_indices if i not in run.done]
        state.status = "completed"
        if not fresh:
            return ReceiptOutcome.DUPLICATE
        for index in fresh:
            run.done[index] = lease.lease_id
        state.counted = fresh
        return ReceiptOutcome.COUNTED

    def delivered(self, run_id: str) -> int:
        """How many examples of the run have counted."""
        return len(self.runs[run_id].done)
