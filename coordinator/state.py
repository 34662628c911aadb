"""The coordinator's work state and its persistence: one object every protocol's handlers share.

It holds the books (``LeaseBook``: runs and leases; ``AuditBook``: audits and trust;
``ReplayBook``: trainers' commitments and the replays of their rounds;
``ReportBook``: trainers' round reports; ``RewardBook``: the rewards the coordinator recomputed;
``Billing``: the journal and the holds), each run's adapter versions,
and one long-lived SQLAlchemy session. Entities (``coordinator/db.py``) are the in-memory
objects themselves: new ones are added to the session as the books create them, and the
session tracks every change, so a handler changes what it must and calls ``commit()`` — no
handler lists what it touched, and nothing is converted to rows and back.

The session is used from the event loop's thread only. ``commit()`` is synchronous: SQLite in
WAL mode with ``synchronous=NORMAL`` commits without an fsync, and the session flushes only the
changed columns of the changed objects, which costs less than a hop to a worker thread (and a
session cannot be shared with one while the loop changes its objects). Every change is
committed before the answer goes out, so a lease a node holds, or a receipt it was told
counted, survives a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from coordinator.audits import AuditBook
from coordinator.billing import Billing
from coordinator.config import AuditConfig, LeaseConfig, ReplayConfig
from coordinator.db import (
    AdapterRow,
    Audit,
    CommitmentRow,
    LeaseState,
    LedgerRow,
    ReplayRow,
    ReportRow,
    RunState,
    Trust,
)
from coordinator.leases import LeaseBook
from coordinator.metrics import CoordinatorMetrics
from coordinator.replays import ReplayBook
from coordinator.reports import ReportBook, RewardBook
from protocol.accounts import KeyStore

log = logging.getLogger(__name__)


class State:
    def __init__(
        self,
        engine: Engine,
        config: LeaseConfig,
        audit_config: AuditConfig,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float],
        accounts: KeyStore | None = None,
        replay_config: ReplayConfig | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.session = Session(engine, expire_on_commit=False, autoflush=False)
        self.book = LeaseBook(clock, keep=self.add)
        self.audits = AuditBook(audit_config, clock, keep=self.add)
        self.replays = ReplayBook(replay_config or ReplayConfig(), clock, self.audits.trust_of,
                                  keep=self.add)  # fmt: skip
        """Trainers' commitments and the replays of their rounds."""
        self.reports = ReportBook()
        self.rewards = RewardBook()
        """The rewards the coordinator recomputed itself (``coordinator/recount.py``)."""
        self.can_score: Callable[[str], bool] = lambda base_model: False
        """Whether the coordinator can recompute rewards on this base model (has its
        tokenizer): stop rules on reward need it."""
        self.billing = Billing(accounts, clock, keep=self.add)
        self.versions: dict[str, dict[int, AdapterRow]] = {}
        """Each run's recorded adapter versions."""
        self.held: dict[str, dict[str, int]] = {}
        """The adapter versions each node last said it holds (with its lease requests)."""
        self._committed = trio.Event()

    def add(self, entity: object) -> None:
        """A new entity, written with the next commit."""
        self.session.add(entity)

    def commit(self) -> None:
        """Write every change since the last commit, in one transaction."""
        self.session.commit()
        self._committed.set()
        self._committed = trio.Event()

    async def next_commit(self) -> None:
        """Return at the next commit: what a long poll waits on for its work to appear."""
        await self._committed.wait()

    def restore(self) -> None:
        """Load everything from the database (blocking: call before serving)."""
        s = self.session
        runs = list(s.scalars(select(RunState).order_by(RunState.created_at)))
        leases = list(s.scalars(select(LeaseState)))
        for row in s.scalars(select(AdapterRow).order_by(AdapterRow.run_id, AdapterRow.version)):
            self.versions.setdefault(row.run_id, {})[row.version] = row
        withdrawn = {run_id: [v for v, row in rows.items() if row.revoked]
                     for run_id, rows in self.versions.items()}  # fmt: skip
        self.book.restore(runs, leases, withdrawn)
        for report in s.scalars(select(ReportRow).order_by(ReportRow.at)):
            self.reports.add(report)
        for lease in leases:
            if lease.rewards is not None and lease.confirmed:
                self.rewards.add(lease.run_id, lease.lease.policy_version, lease.rewards)
        self.billing.restore(s.scalars(select(LedgerRow).order_by(LedgerRow.id)))
        for run in runs:
            rounds = {v: dealt for (r, v), dealt in self.book.dealt.items() if r == run.run_id}
            reported: dict[int, set[str]] = {}
            for v, trainer in self.reports.by_run.get(run.run_id, {}):
                reported.setdefault(v, set()).add(trainer)
            self.billing.reestablish(run, rounds, reported)
        audits = list(s.scalars(select(Audit).order_by(Audit.created_at)))
        self.audits.restore(s.scalars(select(Trust)), audits)
        self.replays.restore(s.scalars(select(CommitmentRow)), s.scalars(select(ReplayRow)))
        self.commit()  # audits that were assigned are pending again
        if runs or audits:
            log.info("restored %d runs, %d leases and %d audits from the database",
                     len(runs), len(leases), len(audits))  # fmt: skip

    def close(self) -> None:
        self.session.close()
