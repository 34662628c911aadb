"""Lease bookkeeping: which examples of which run each inference node is generating.

Pure logic over an injected clock (``coordinator/rollouts.py`` wraps it with the network, and
``coordinator/state.py`` with the database). A run's examples are handed out in order; every
lease gets fresh coordinator randomness (``lease_seed``) from which the node's sampling seeds
are derived, so the node cannot pick its own noise. A lease that misses its deadline expires and
its examples go back to the front of the queue for another node.

Receipts are idempotent and never double-counted: an example counts once, for the first valid
receipt that covers it. A late receipt for an expired lease still counts for the examples no one
has delivered yet (the work is real), and the re-issued lease's receipt is then a duplicate for
those. Every outcome is a typed ``ReceiptOutcome``, never an exception: a bad receipt is data.

The book keeps every lease, and indexes so that no request walks a run's history: the active
leases, each run's delivered rollouts that no round has taken yet (``waiting``), and each
round's dealt rollouts (``dealt``). A request costs the same after a hundred thousand leases as
after a thousand (``scripts/bench_coordinator.py``). New entities are handed to ``keep`` (the
state's session adds them).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from enum import Enum

from coordinator.db import LeaseState, RunState
from protocol.leases import Lease
from protocol.rollouts import RolloutReceipt
from protocol.runs import RunPlan


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
    TOO_MANY_TOKENS = "too_many_tokens"
    """More completion tokens claimed than the lease allows (samples × ``max_tokens``): a
    claim no payload of this lease can back."""


class LeaseBook:
    def __init__(
        self, clock: Callable[[], float] = time.time, keep: Callable[[object], None] | None = None
    ) -> None:
        self.clock = clock
        self.keep = keep or (lambda entity: None)
        self.runs: dict[str, RunState] = {}
        self.leases: dict[str, LeaseState] = {}
        self.active: dict[str, LeaseState] = {}
        self.payloads: dict[bytes, str] = {}  # payload hash -> the lease it was handed in for
        self.done: dict[str, dict[int, str]] = {}
        """Each run's delivered examples: example index -> the lease that counted it."""
        self.returned: dict[str, deque[int]] = {}
        """Each run's examples to lease again (expired or taken back), first out first."""
        self.waiting: dict[str, dict[str, LeaseState]] = {}
        """Each run's counted rollouts that no round has been dealt yet."""
        self.dealt: dict[tuple[str, int], list[LeaseState]] = {}
        """The rollouts dealt to each (run, round)."""
        self.withdrawn: dict[str, set[int]] = {}
        """Each run's withdrawn versions (a rollback): rollouts sampled at them never train."""
        self.of_node: dict[str, list[LeaseState]] = {}
        self._next_run = 0  # round robin over runs

    def add_run(self, plan: RunPlan, state: str = "running") -> RunState:
        if plan.run_id in self.runs:
            raise ValueError(f"run {plan.run_id!r} already exists")
        rl = plan.spec.rl
        if rl.group_size < 1 or rl.lease_ttl_s <= 0 or rl.prompts_per_lease < 1:
            raise ValueError("group_size and prompts_per_lease must be >= 1, lease_ttl_s > 0")
        run = RunState(plan, state=state, created_at=self.clock())
        self._index_run(run)
        self.keep(run)
        return run

    def _index_run(self, run: RunState) -> None:
        self.runs[run.run_id] = run
        self.done[run.run_id], self.returned[run.run_id] = {}, deque()
        self.waiting[run.run_id] = {}
        self.withdrawn.setdefault(run.run_id, set())

    def restore(
        self,
        runs: Iterable[RunState],
        leases: Iterable[LeaseState],
        withdrawn: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Rebuild the book and its indexes from stored runs and leases (a restart), and each
        run's ``withdrawn`` versions."""
        for run_id, versions in (withdrawn or {}).items():
            self.withdrawn.setdefault(run_id, set()).update(versions)
        for run in runs:
            self._index_run(run)
        lost: dict[str, set[int]] = {r: set() for r in self.runs}
        for state in sorted(leases, key=lambda s: s.issued_at):
            self._index_lease(state)
            if state.payload_hash is not None:
                self.payloads[state.payload_hash] = state.lease_id
            if state.status in ("expired", "rejected", "quarantined"):
                lost[state.run_id].update(state.lease.example_indices)
            for index in state.counted:
                self.done[state.run_id][index] = state.lease_id
            if state.trained_in is not None:
                self.dealt.setdefault((state.run_id, state.trained_in), []).append(state)
            elif state.counted and state.status == "completed" and self._may_wait(state):
                self.waiting[state.run_id][state.lease_id] = state
        for run_id, indices in lost.items():
            out = {i for s in self.active.values() if s.run_id == run_id
                   for i in s.lease.example_indices}  # fmt: skip
            self.returned[run_id] = deque(sorted(indices - out - set(self.done[run_id])))

    def _index_lease(self, state: LeaseState) -> None:
        self.leases[state.lease_id] = state
        self.of_node.setdefault(state.node, []).append(state)
        if state.status == "active":
            self.active[state.lease_id] = state

    def set_policy_version(self, run_id: str, version: int) -> None:
        """The run is at a new version: rollouts now too stale to train leave the waiting
        index (versions only grow, so they never could again)."""
        self.runs[run_id].policy_version = version
        waiting = self.waiting[run_id]
        for lease_id in [i for i, s in waiting.items() if not self._may_wait(s)]:
            del waiting[lease_id]

    def roll_back(self, run_id: str, version: int, withdrawn: Iterable[int] = ()) -> None:
        """The run is back at ``version`` (newer ones, ``withdrawn``, were withdrawn): rollouts
        sampled at a withdrawn version leave the waiting index, never to train — those handed
        in later too."""
        self.runs[run_id].policy_version = version
        self.withdrawn[run_id].update(withdrawn)
        waiting = self.waiting[run_id]
        for lease_id in [i for i, s in waiting.items() if s.lease.policy_version > version]:
            del waiting[lease_id]

    def issue(self, run_id: str, node: str, max_prompts: int) -> Lease | None:
        """A lease of up to ``max_prompts`` examples for ``node``, or None when none are left."""
        self.expire()
        return self._issue(run_id, node, max_prompts)

    def _issue(self, run_id: str, node: str, max_prompts: int) -> Lease | None:
        run = self.runs[run_id]
        if run.state != "running":
            return None
        max_prompts = min(max_prompts, run.plan.spec.rl.prompts_per_lease)
        indices: list[int] = []
        returned, done = self.returned[run_id], self.done[run_id]
        while returned and len(indices) < max_prompts:
            index = returned.popleft()
            if index not in done:
                indices.append(index)
        total = run.plan.spec.rl.max_examples
        cursor = run.cursor
        while len(indices) < max_prompts and (total is None or cursor < total):
            indices.append(cursor)
            cursor += 1
        run.cursor = cursor
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
            group_size=plan.spec.rl.group_size,
            policy_version=run.policy_version,
            sampling=plan.sampling(),
            lease_seed=os.urandom(32),
            deadline_ms=int((now + plan.spec.rl.lease_ttl_s) * 1000),
        )
        state = LeaseState(lease, node, now)
        self._index_lease(state)
        self.keep(state)
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
        runs = [r for r in self.runs.values() if r.state == "running"]
        for k in range(len(runs)):
            run = runs[(self._next_run + k) % len(runs)]
            if run.plan.spec.base_model != base_model:
                continue
            held = (adapter_versions or {}).get(run.run_id, 0)
            if run.policy_version and held != run.policy_version:
                continue
            if untrained_cap is not None and self.untrained(run) >= untrained_cap:
                continue
            lease = self._issue(run.run_id, node, max_prompts)  # expired above
            if lease is not None:
                self._next_run = (self._next_run + k + 1) % len(runs)
                return lease
        return None

    def trainable(self, run: RunState, state: LeaseState) -> bool:
        """A counted rollout whose token count the coordinator confirmed (and, for a run that
        trains only on trusted work, whose audit passed or was not drawn), within the run's
        staleness window and not of a withdrawn version (``_may_wait``), not taken by an
        earlier round."""
        trusted = state.audit in ("", "passed") or not run.plan.spec.verification.trusted_only
        return (
            state.status == "completed" and bool(state.counted) and state.confirmed and trusted
            and self._may_wait(state) and state.lease.policy_version <= run.policy_version
            and state.trained_in in (None, run.policy_version)
        )  # fmt: skip

    def _may_wait(self, state: LeaseState) -> bool:
        """Whether a counted rollout may still train in a later round: sampled within the
        run's staleness window and not at a withdrawn version. One that may not never waits:
        it would hold a place under the cap on untrained leases for good (a run at
        max_staleness 0 stalled on two rollouts of the last version handed in just after the
        next was made)."""
        run, version = self.runs[state.run_id], state.lease.policy_version
        oldest = run.policy_version - run.plan.spec.diloco.max_staleness
        return version >= oldest and version not in self.withdrawn[run.run_id]

    def ready(self, run: RunState) -> list[LeaseState]:
        """The rollouts the run's current round may train on: those dealt to it, then those
        waiting."""
        waiting = self.waiting[run.run_id].values()
        candidates = [*self.dealt.get((run.run_id, run.policy_version), []), *waiting]
        return [s for s in candidates if self.trainable(run, s)]

    def deal(self, run: RunState, states: Iterable[LeaseState], version: int) -> None:
        """Give these waiting rollouts to the round of ``version``."""
        waiting, dealt = self.waiting[run.run_id], self.dealt.setdefault((run.run_id, version), [])
        for s in states:
            waiting.pop(s.lease_id, None)
            s.trained_in = version
            dealt.append(s)

    def untrained(self, run: RunState) -> int:
        """Leases of the run that are out, or delivered and still waiting for a round."""
        return self.active_of(run.run_id) + len(self.waiting[run.run_id])

    def expire(self) -> list[LeaseState]:
        """Expire active leases past their deadline; their undelivered examples are re-queued."""
        now_ms = self.clock() * 1000
        expired = []
        for state in list(self.active.values()):
            if now_ms > state.lease.deadline_ms:
                state.status = "expired"
                del self.active[state.lease_id]
                done, returned = self.done[state.run_id], self.returned[state.run_id]
                for index in reversed(state.lease.example_indices):
                    if index not in done:
                        returned.appendleft(index)
                expired.append(state)
        return expired

    def receipt(self, node: str, receipt: RolloutReceipt) -> ReceiptOutcome:
        """Record a producer's receipt; every outcome is a value, not an exception."""
        state = self.leases.get(receipt.lease_id)
        if state is None or state.run_id != receipt.run_id:
            return ReceiptOutcome.UNKNOWN_LEASE
        if state.node != node:
            return ReceiptOutcome.WRONG_NODE
        lease = state.lease
        if receipt.policy_version != lease.policy_version:
            return ReceiptOutcome.WRONG_VERSION
        if receipt.num_samples != len(lease.example_indices) * lease.group_size:
            return ReceiptOutcome.WRONG_SIZE
        most = receipt.num_samples * lease.sampling.max_tokens * lease.sampling.max_turns
        if receipt.completion_tokens > most:
            return ReceiptOutcome.TOO_MANY_TOKENS
        if state.status in ("completed", "rejected", "quarantined"):
            # handed in before; a penalized lease's receipt sent again must not count again
            return ReceiptOutcome.DUPLICATE
        if self.payloads.get(receipt.payload_hash, lease.lease_id) != lease.lease_id:
            return ReceiptOutcome.DUPLICATE_PAYLOAD
        self.payloads[receipt.payload_hash] = lease.lease_id
        run, done = self.runs[lease.run_id], self.done[lease.run_id]
        fresh = [i for i in lease.example_indices if i not in done]
        state.status = "completed"
        state.completed_at = self.clock()
        state.payload_hash = receipt.payload_hash
        state.completion_tokens = receipt.completion_tokens
        self.active.pop(lease.lease_id, None)
        if not fresh:
            return ReceiptOutcome.DUPLICATE
        for index in fresh:
            done[index] = lease.lease_id
        state.counted = fresh
        if self._may_wait(state):
            self.waiting[run.run_id][state.lease_id] = state
        run.completion_tokens += receipt.completion_tokens
        total = run.plan.spec.rl.max_examples
        if total is not None and len(done) >= total and run.state == "running":
            run.state, run.stop_reason = "completed", "max_examples"
        return ReceiptOutcome.COUNTED

    def uncount(self, lease_id: str, status: str) -> list[int]:
        """Take back what a lease's receipt counted (a rejected or quarantined rollout): its
        examples go back to the front of the queue and its tokens off the run's bill."""
        state = self.leases[lease_id]
        run, done = self.runs[state.run_id], self.done[state.run_id]
        back = [i for i in state.counted if done.get(i) == lease_id]
        for index in reversed(back):
            del done[index]
            self.returned[state.run_id].appendleft(index)
        if state.counted:
            run.completion_tokens -= state.completion_tokens
        state.status, state.counted = status, []
        self.waiting[state.run_id].pop(lease_id, None)
        if back and run.state == "completed" and run.stop_reason == "max_examples":
            run.state, run.stop_reason = "running", ""
        return back

    def delivered(self, run_id: str) -> int:
        """How many examples of the run have counted."""
        return len(self.done[run_id])

    def active_of(self, run_id: str) -> int:
        return sum(s.run_id == run_id for s in self.active.values())

    def counted_of(self, run_id: str) -> list[LeaseState]:
        """The run's counted rollouts, in order of delivery (a scan: for the REST API)."""
        done = [s for s in self.leases.values()
                if s.run_id == run_id and s.status == "completed" and s.counted]  # fmt: skip
        return sorted(done, key=lambda s: s.completed_at or 0.0)
