"""Lease bookkeeping: which examples of which run each inference node is generating.

Pure logic over an injected clock (the coordinator's lease service wraps it with the network and
the database). A run's examples are handed out in order; every lease gets fresh coordinator
randomness (``lease_seed``) from which the node's sampling seeds are derived, so the node cannot
pick its own noise. A lease that misses its deadline expires and its examples go back to the
front of the queue for another node.

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

from protocol.adapters import TrainSettings
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
    base_model: str = "tiny"
    """Only nodes generating with this base model (their ``--model``) get this run's leases."""
    lease_ttl_s: float = 120.0
    total_examples: int | None = None
    """Stop issuing after this many examples (None: as many as trainers consume)."""
    prompts_per_lease: int = 8
    max_staleness: int = 2
    """Trainers of version ``v`` consume rollouts sampled at versions ``v - max_staleness`` to
    ``v``; older ones are never trained on."""
    training: TrainSettings = field(default_factory=TrainSettings)
    """What the run's trainers are told to train with."""
    audit_floor: float | None = None
    """Audit rate of trusted producers' rollouts of this run (None: the coordinator's)."""
    max_tokens: int | None = None
    """Most tokens the run may be billed (None: the owner's key budget alone)."""
    max_rounds: int | None = None
    """The run completes at this version."""
    target_reward: float | None = None
    """The run completes once a version's completions reach this mean reward..."""
    min_samples: int = 64
    """...measured on at least this many of them."""


class ReceiptOutcome(Enum):
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    UNKNOWN_LEASE = "unknown_lease"
    WRONG_NODE = "wrong_node"
    WRONG_VERSION = "wrong_version"
    WRONG_SIZE = "wrong_size"
    DUPLICATE_PAYLOAD = "duplicate_payload"
    """The payload was already handed in for another lease (a payload names its lease, so an
    honest one never repeats): a node resubmitting someone's work."""


@dataclass
class LeaseState:
    lease: Lease
    node: str
    issued_at: float
    status: str = "active"  # active | completed | expired | rejected | quarantined
    counted: list[int] = field(default_factory=list)
    """The examples this lease's receipt delivered first (what the run counts)."""
    payload_hash: bytes | None = None
    completion_tokens: int = 0
    completed_at: float | None = None
    trained_in: int | None = None
    """The round (the version trained from) whose trainers were dealt this rollout."""
    trained_by: str | None = None
    """The trainer whose share of that round it was."""


@dataclass
class RunState:
    plan: RunPlan
    policy_version: int = 0
    cursor: int = 0
    """The next never-leased example index."""
    state: str = "running"
    """queued → running → completed | failed | cancelled."""
    stop_reason: str = ""
    """Why it is no longer running: ``max_examples``, ``max_rounds``, ``target_reward``,
    ``budget``, ``cancelled``, or what made it fail."""
    owner: str = ""
    """The name of the API key that submitted it (billed for it); empty on an open network."""
    owner_key_id: int | None = None
    completion_tokens: int = 0
    """Tokens of counted rollouts: what the run is billed for on the rollout side."""
    created_at: float = 0.0
    deployed: int | None = None
    """The adapter version served as model ``<run>`` (``bazaar run deploy``)."""
    returned: deque[int] = field(default_factory=deque)
    done: dict[int, str] = field(default_factory=dict)  # example index -> lease that counted


class LeaseBook:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.runs: dict[str, RunState] = {}
        self.leases: dict[str, LeaseState] = {}
        self.active: dict[str, LeaseState] = {}
        self.payloads: dict[bytes, str] = {}  # payload hash -> the lease it was handed in for
        self._next_run = 0  # round robin over runs

    def add_run(self, plan: RunPlan, state: str = "running") -> RunState:
        if plan.run_id in self.runs:
            raise ValueError(f"run {plan.run_id!r} already exists")
        if plan.group_size < 1 or plan.lease_ttl_s <= 0 or plan.prompts_per_lease < 1:
            raise ValueError("group_size and prompts_per_lease must be >= 1, lease_ttl_s > 0")
        run = self.runs[plan.run_id] = RunState(plan, state=state, created_at=self.clock())
        return run

    def restore(self, runs: list[RunState], leases: list[LeaseState]) -> None:
        """Rebuild the book from stored runs and leases (a restarted coordinator)."""
        for run in runs:
            self.runs[run.plan.run_id] = run
        for state in sorted(leases, key=lambda s: s.issued_at):
            self.leases[state.lease.lease_id] = state
            if state.payload_hash is not None:
                self.payloads[state.payload_hash] = state.lease.lease_id
            if state.status == "active":
                self.active[state.lease.lease_id] = state
            run = self.runs[state.lease.run_id]
            for index in state.counted:
                run.done[index] = state.lease.lease_id
        for run in self.runs.values():
            out = {i for s in self.active.values() if s.lease.run_id == run.plan.run_id
                   for i in s.lease.example_indices}  # fmt: skip
            lost = {i for s in self.leases.values() if s.lease.run_id == run.plan.run_id
                    and s.status in ("expired", "rejected", "quarantined")
                    for i in s.lease.example_indices}  # fmt: skip
            run.returned = deque(sorted(lost - out - set(run.done)))

    def set_policy_version(self, run_id: str, version: int) -> None:
        self.runs[run_id].policy_version = version

    def issue(self, run_id: str, node: str, max_prompts: int) -> Lease | None:
        """A lease of up to ``max_prompts`` examples for ``node``, or None when none are left."""
        self.expire()
        run = self.runs[run_id]
        if run.state != "running":
            return None
        max_prompts = min(max_prompts, run.plan.prompts_per_lease)
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
        state = LeaseState(lease, node, now)
        self.leases[lease.lease_id] = self.active[lease.lease_id] = state
        return lease

    def issue_for(
        self,
        node: str,
        base_model: str,
        max_prompts: int,
        adapter_versions: dict[str, int] | None = None,
        max_active: int = 3,
        untrained_cap: int | None = None,
    ) -> Lease | None:
        """A lease from the next run this node can serve (round robin over runs), or None.

        A node gets nothing while it holds ``max_active`` unexpired leases, so one node cannot
        hoard a run's examples. A run past version 0 is leased only to nodes holding its current
        adapter version; with ``untrained_cap``, a run has at most that many leases out or
        delivered that no round of training has taken yet (``untrained``).
        """
        self.expire()
        if sum(s.node == node for s in self.active.values()) >= max_active:
            return None
        runs = list(self.runs.values())
        for k in range(len(runs)):
            run = runs[(self._next_run + k) % len(runs)]
            if run.plan.base_model != base_model:
                continue
            held = (adapter_versions or {}).get(run.plan.run_id, 0)
            if run.policy_version and held != run.policy_version:
                continue
            if untrained_cap is not None and self.untrained(run) >= untrained_cap:
                continue
            lease = self.issue(run.plan.run_id, node, max_prompts)
            if lease is not None:
                self._next_run = (self._next_run + k + 1) % len(runs)
                return lease
        return None

    def trainable(self, run: RunState, state: LeaseState) -> bool:
        """A counted rollout (so verified or not quarantined) within the run's staleness
        window, not taken by an earlier round."""
        oldest = run.policy_version - run.plan.max_staleness
        return (
            state.status == "completed" and bool(state.counted) and state.payload_hash is not None
            and oldest <= state.lease.policy_version <= run.policy_version
            and state.trained_in in (None, run.policy_version)
        )  # fmt: skip

    def untrained(self, run: RunState) -> int:
        """Leases of the run that are out, or delivered and still waiting for a round."""
        return sum(
            s.lease.run_id == run.plan.run_id
            and (s.status == "active" or (self.trainable(run, s) and s.trained_in is None))
            for s in self.leases.values()
        )

    def expire(self) -> list[LeaseState]:
        """Expire active leases past their deadline; their undelivered examples are re-queued."""
        now_ms = self.clock() * 1000
        expired = []
        for state in list(self.active.values()):
            if now_ms > state.lease.deadline_ms:
                state.status = "expired"
                del self.active[state.lease.lease_id]
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
        if self.payloads.get(receipt.payload_hash, lease.lease_id) != lease.lease_id:
            return ReceiptOutcome.DUPLICATE_PAYLOAD
        self.payloads[receipt.payload_hash] = lease.lease_id
        run = self.runs[lease.run_id]
        fresh = [i for i in lease.example_indices if i not in run.done]
        state.status = "completed"
        state.completed_at = self.clock()
        state.payload_hash = receipt.payload_hash
        state.completion_tokens = receipt.completion_tokens
        self.active.pop(lease.lease_id, None)
        if not fresh:
            return ReceiptOutcome.DUPLICATE
        for index in fresh:
            run.done[index] = lease.lease_id
        state.counted = fresh
        run.completion_tokens += receipt.completion_tokens
        total = run.plan.total_examples
        if total is not None and len(run.done) >= total and run.state == "running":
            run.state, run.stop_reason = "completed", "max_examples"
        return ReceiptOutcome.COUNTED

    def uncount(self, lease_id: str, status: str) -> list[int]:
        """Take back what a lease's receipt counted (a rejected or quarantined rollout): its
        examples go back to the front of the queue and its tokens off the run's bill."""
        state = self.leases[lease_id]
        run = self.runs[state.lease.run_id]
        back = [i for i in state.counted if run.done.get(i) == lease_id]
        for index in reversed(back):
            del run.done[index]
            run.returned.appendleft(index)
        if state.counted:
            run.completion_tokens -= state.completion_tokens
        state.status, state.counted = status, []
        if back and run.state == "completed" and run.stop_reason == "max_examples":
            run.state, run.stop_reason = "running", ""
        return back

    def delivered(self, run_id: str) -> int:
        """How many examples of the run have counted."""
        return len(self.runs[run_id].done)
