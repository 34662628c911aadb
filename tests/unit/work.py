"""The coordinator's work handlers over one state, as the server builds them, for unit tests
that drive them without a network (``Work.open(url)``)."""

from __future__ import annotations

from collections.abc import Callable
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
from protocol.adapters import NoTraining, RoundCommitment, TrainAssignment, TrainRequest
from tests.unit.test_leases import Clock


class CommittingRounds(Rounds):
    """The rounds handlers, with each trainer committing to a part of its share as soon as it
    is dealt it (as the trainer role does after its inner steps): for tests of what a round
    does after, where no trainer trains."""

    async def train(
        self,
        peer: str,
        req: TrainRequest,
        trainers: list[str],
        addrs_of: Callable[[str], list[str]],
        hivemind_peers: list[str],
    ) -> TrainAssignment | NoTraining:
        got = await super().train(peer, req, trainers, addrs_of, hivemind_peers)
        if isinstance(got, TrainAssignment):
            ids = [r.lease.lease_id for r in got.rollouts]
            ack = self.commit(peer, RoundCommitment(got.run_id, got.version, bytes(32), ids))
            assert ack.accepted, ack
        return got


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
        return cls(state, runs, Rollouts(state, runs), CommittingRounds(state, runs),
                   Auditing(state))  # fmt: skip

    def restored(self) -> Work:
        """The same database, opened again (a restarted coordinator)."""
        url = str(self.state.session.get_bind().url)
        again = Work.open(url, self.state.config, self.state.billing.accounts)
        again.state.restore()
        again.runs.resume()
        return again
