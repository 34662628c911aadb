"""The replay audits' handlers (audit protocol): a verifier asking for work gets a replay of a
trainer's round when one is open (``ReplayAssignment``), and its ``ReplayVerdict`` is applied —
which replays exist and what verdicts decide is the replay book's (``coordinator/replays.py``).

A failed replay bans the trainer, rolls its run back to before the first of its rounds no
replay passed, forfeits its pay for the withdrawn rounds to the run's payer, and tells the
nodes (``Deployed`` on gossip makes them sync: they drop the withdrawn versions). A verifier
outvoted by a replay's decision takes a verifier strike.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from coordinator.db import ReplayRow, RunState
from coordinator.rounds import Rounds
from coordinator.state import State
from protocol.adapters import RolloutRef
from protocol.membership import PeerRecord
from protocol.verification import (
    AuditRequest,
    PartRef,
    ReplayAssignment,
    ReplayVerdict,
    VerdictAck,
    VerdictOutcome,
)

log = logging.getLogger(__name__)


class Replaying:
    def __init__(
        self,
        state: State,
        rounds: Rounds,
        addrs_of: Callable[[str], list[str]],
        sources: Callable[[str], list[str]],
        announce: Callable[[str, int], Awaitable[None]],
    ) -> None:
        self.state, self.rounds = state, rounds
        self.addrs_of, self.sources, self.announce = addrs_of, sources, announce

    def request(self, peer: str, req: AuditRequest) -> ReplayAssignment | None:
        """An open replay for ``peer`` (None: there is none it may take)."""
        state = self.state
        runs = state.book.runs

        def can_check(r: ReplayRow) -> bool:
            run = runs.get(r.run_id)
            return run is not None and run.plan.spec.base_model == req.base_model

        row = state.replays.assign(peer, can_check)
        if row is None:
            return None
        run, leases = runs[row.run_id], state.book.leases
        refs = [RolloutRef(leases[i].lease, leases[i].node, self.sources(leases[i].node)[:16],
                           leases[i].payload_hash or b"")
                for i in row.lease_ids if i in leases]  # fmt: skip
        if len(refs) != len(row.lease_ids):  # commitments name leases of the round only
            log.error("replay %s names leases the coordinator lacks: cancelled", row.audit_id)
            row.status = "cancelled"
            state.commit()
            return None
        state.commit()
        return ReplayAssignment(
            audit_id=row.audit_id, run_id=row.run_id, version=row.round, parent=row.parent,
            trainer=row.trainer,
            parts=[PartRef(t, self.addrs_of(t)[:16], bytes.fromhex(h)) for t, h in row.parts],
            manifest=row.manifest,
            holders=[PeerRecord(t, self.addrs_of(t)[:16]) for t, _ in row.parts][:16],
            rollouts=refs, settings=run.plan.spec.training(),
            deadline_ms=int(row.deadline * 1000),
        )  # fmt: skip

    async def verdict(self, peer: str, msg: ReplayVerdict) -> VerdictAck:
        state = self.state
        ruling = state.replays.verdict(peer, msg)
        row = ruling.replay
        outcome: VerdictOutcome
        if ruling.outcome in ("unknown_audit", "wrong_verifier") or row is None:
            log.warning("replay verdict from %s refused: %s", peer, ruling.outcome)
            state.commit()
            refused: VerdictOutcome = (
                "unknown_audit" if ruling.outcome == "unknown_audit" else "wrong_verifier"
            )
            return VerdictAck(audit_id=msg.audit_id, outcome=refused)
        if ruling.outcome == "abstained":  # it could not check: the replay goes to another
            log.info("replay %s: %s could not check it (%s: %s)", row.audit_id, peer,
                     msg.failed_check, msg.detail)  # fmt: skip
            outcome = "reassigned"
        elif ruling.outcome == "confirming":
            log.warning("replay %s of %s failed %s (%s); asking another verifier", row.audit_id,
                        row.trainer, msg.failed_check, msg.detail)  # fmt: skip
            outcome = "confirming"
        elif ruling.decision == "passed":
            outcome = "cleared" if ruling.struck else "recorded"
        else:
            outcome = "confirmed_failure"
            await self._failed(row, msg)
        for verifier in ruling.struck:
            trust = state.audits.trust_of(verifier)
            trust.verifier_strikes += 1
            if trust.verifier_strikes >= state.audits.config.max_verifier_strikes:
                trust.banned = True
            log.warning("verifier %s outvoted on replay %s: verifier strike %d%s", verifier,
                        row.audit_id, trust.verifier_strikes, "; banned" if trust.banned else "",
                        extra={"peer": verifier})  # fmt: skip
        state.commit()
        return VerdictAck(audit_id=msg.audit_id, outcome=outcome)

    async def _failed(self, row: ReplayRow, msg: ReplayVerdict) -> None:
        """Ban the trainer, roll its run back, forfeit its pay for the withdrawn rounds. A
        version that is not the step its committed parts make (the sum check) condemns every
        trainer that signed it: an honest trainer checks the all-reduce against the committed
        parts before signing, and signs their step instead where they differ."""
        state = self.state
        culprits = [row.trainer]
        if msg.failed_check == "version_sum":
            culprits = sorted({row.trainer, *row.signers})
        run = state.book.runs[row.run_id]
        versions = state.versions.get(row.run_id, {})
        points = [state.replays.rollback_point(versions, t) for t in culprits]
        to = min((p for p in points if p is not None), default=None)
        withdrawn = self.rounds.roll_back(run, to) if to is not None else []
        forfeited = 0
        for trainer in culprits:
            trust = state.audits.trust_of(trainer)
            trust.strikes += 1
            trust.banned = True
            rounds = {versions[v].trained_from() for v in withdrawn
                      if trainer in versions[v].signers}  # fmt: skip
            forfeited += sum(r.tokens for r in await state.billing.forfeit_trained(
                run, trainer, rounds))  # fmt: skip
            state.replays.cancel(row.run_id, set(), trainer)
            state.metrics.penalties.inc()
        log.error("trainer(s) %s failed the replay of %s round %d (%s: %s): banned; versions %s "
                  "withdrawn, %d tokens of pay forfeited", ", ".join(culprits), row.run_id,
                  row.round, msg.failed_check, msg.detail, withdrawn, forfeited,
                  extra={"run_id": row.run_id, "peer": row.trainer})  # fmt: skip
        await self._rolled_back(run, withdrawn)

    async def _rolled_back(self, run: RunState, withdrawn: list[int]) -> None:
        """After a rollback: a run completed on withdrawn versions runs again, and the nodes
        sync now (they drop the withdrawn versions)."""
        self.state.commit()
        if not withdrawn:
            return
        await self.rounds.runs.reopen(run)
        try:
            await self.announce(run.run_id, run.deployed or run.policy_version)
        except Exception as e:  # gossip is the prompt; nodes sync on their own anyway
            log.warning("could not announce the rollback of %s: %s", run.run_id, e)
