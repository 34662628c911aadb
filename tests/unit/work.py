"""The coordinator's work handlers over one state, as the server builds them, for unit tests
that drive them without a network (``Work.open(url)``)."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.auditing import Auditing
from coordinator.config import AuditConfig, LeaseConfig
from coordinator.db import open_database
from coordinator.lifecycle import RunLifecycle
from coordinator.metrics import CoordinatorMetrics
from coordinator.rollouts import Rollouts
from coordinator.rounds import Rounds
from coordinator.state import State
from protocol.accounts import KeyStore
from tests.unit.test_leases import Clock


@dataclass
class Work:
    state: State
    runs: RunLifecycle
    rollouts: Rollouts
    rounds: Rounds
    auditing: Auditing

    @classmethod
    def open(
        cls,
        url: str,
        config: LeaseConfig | None = None,
        accounts: KeyStore | None = None,
        clock: Clock | None = None,
    ) -> Work:
        state = State(open_database(url), config or LeaseConfig(), AuditConfig(),
                      CoordinatorMetrics(), clock or Clock(), accounts)  # fmt: skip
        runs = RunLifecycle(state)
        return cls(state, runs, Rollouts(state, runs), Rounds(state, runs), Auditing(state))

    def restored(self) -> Work:
        """The same database, opened again (a restarted coordinator)."""
        url = str(self.state.session.get_bind().url)
        again = Work.open(url, self.state.config, self.state.billing.accounts)
        again.state.restore()
        again.runs.resume()
        return again
