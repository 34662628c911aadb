"""Training rounds and adapter versions (``/bazaar/adapters/1.0.0``): ``TrainRequest`` →
``TrainAssignment`` or ``NoTraining``, ``AdapterManifest`` → ``ManifestAck``, ``RoundReport``
→ ``ReportAck``, ``VersionsRequest`` → ``VersionsReply``.

A round of version ``v`` takes ``round_leases`` counted rollouts per live trainer from the run's
staleness window (the newest versions first, then in order of delivery) and deals them round
robin over the trainers; the first trainer to ask fixes the round's rollouts, so the others get
the rest of the same set, and rollouts delivered meanwhile wait for the next round. Only
rollouts the coordinator confirmed (and, by default, that passed an audit or come from trusted
producers) are dealt. The run's next version ``v + 1`` is made when every live trainer the
round is dealt to has signed the same manifest (a trainer it is not dealt to is refused and
struck; trainers that disagree leave the version unmade); a trainer's report bills what the
round moved.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import trio

from coordinator.db import AdapterRow, LeaseState, ReportRow, RunState
from coordinator.lifecycle import RunLifecycle
from coordinator.state import State
from protocol.adapters import (
    AdapterManifest,
    CommitmentAck,
    ManifestAck,
    NoTraining,
    ReportAck,
    RolloutRef,
    RoundCommitment,
    RoundReport,
    TrainAssignment,
    TrainRequest,
    VersionInfo,
    VersionsReply,
    VersionsRequest,
    committed_part,
    parse_part,
)
from protocol.codec import encode_body
from protocol.membership import PeerRecord

log = logging.getLogger(__name__)


async def _keep_nothing(peer: str, part_hash: bytes) -> bool:
    return True


@dataclass
class _Proposal:
    """A manifest for a run's next version, the trainers whose parts it says it averages, and
    the round's trainers that signed it."""

    frame: bytes
    group: list[str]
    signers: list[str] = field(default_factory=list)


class Rounds:
    def __init__(
        self,
        state: State,
        runs: RunLifecycle,
        keep_part: Callable[[str, bytes], Awaitable[bool]] | None = None,
        instance_of: Callable[[str], str] = lambda peer: "",
    ) -> None:
        self.state = state
        self.runs = runs
        self.keep_part = keep_part or _keep_nothing
        """Fetch a trainer's committed part and keep it (False: it did not serve it)."""
        self.instance_of = instance_of
        """The process a member runs as now (its join's instance id)."""
        self._dealt_instance: dict[tuple[str, int, str], str] = {}
        """The process each trainer of an open round was dealt its share as, by (run, round,
        trainer): a trainer that crashed and came back lost that share's work, so its round
        waits for it no longer (kept in memory: after a coordinator restart, unknown)."""
        self._dealing = trio.Lock()
        """One request deals at a time: admitting a round waits on the accounts database (its
        hold), and a trainer asking meanwhile must find the round dealt, not deal it again."""
        self._proposals: dict[tuple[str, int], dict[str, _Proposal]] = {}
        """Manifests of next versions not made yet, by (run, version) and manifest hash."""

    async def train(
        self,
        peer: str,
        req: TrainRequest,
        trainers: list[str],
        addrs_of: Callable[[str], list[str]],
        hivemind_peers: list[str],
        payload_sources: Callable[[str], list[str]] | None = None,
    ) -> TrainAssignment | NoTraining:
        """A trainer's share of the next round of a run on its base model (``payload_sources``:
        where a producer's payloads may be fetched — the producer while it is up, then the
        coordinator, which keeps every rollout it dealt)."""
        payload_sources = payload_sources or addrs_of
        state, book = self.state, self.state.book
        if peer not in trainers:
            return NoTraining(retry_after_s=state.config.retry_after_s)
        for run in list(book.runs.values()):
            if run.state != "running" or run.plan.spec.base_model != req.base_model:
                continue
            v, k = run.policy_version, len(trainers)
            async with self._dealing:
                dealt = await self._deal(run, v, k)
            if not dealt:
                continue
            if self._restarted_mid_round(run.run_id, v, peer, trainers):
                continue  # its round's other trainers finish it; it takes the next one
            rank = trainers.index(peer)
            share = self._share(run.run_id, v, peer, dealt, trainers)
            if not share:
                continue
            self._dealt_instance[(run.run_id, v, peer)] = self.instance_of(peer)
            for s in share:
                s.trained_by = peer
            state.billing.dealt(run.run_id, v, peer)
            state.commit()
            refs = [RolloutRef(s.lease, s.node, payload_sources(s.node)[:16],
                               s.payload_hash or b"")
                    for s in share]  # fmt: skip
            group = min(k, max(1, len(dealt) // state.config.round_leases))
            return TrainAssignment(run_id=run.run_id, version=v, rollouts=refs, rank=rank,
                                   group_size=group, hivemind_peers=hivemind_peers[:16],
                                   settings=run.plan.spec.training(),
                                   next_version=self.next_version(run.run_id),
                                   parent=self.parent_of(run.run_id, v),
                                   co_trainers=[PeerRecord(t, addrs_of(t)[:16])
                                                for t in trainers if t != peer][:64])  # fmt: skip
        return NoTraining(retry_after_s=state.config.retry_after_s)

    async def _deal(self, run: RunState, v: int, k: int) -> list[LeaseState]:
        """The leases of round ``v`` of ``run``: those dealt already, or a new round's (held
        on the key first) once enough are ready for ``k`` trainers; none otherwise."""
        state, book = self.state, self.state.book
        ready = sorted(
            book.ready(run),
            key=lambda s: (s.trained_in != v, -s.lease.policy_version,
                           s.completed_at or 0.0, s.lease_id),
        )  # fmt: skip
        dealt = [s for s in ready if s.trained_in == v]
        if dealt:
            return dealt
        if len(ready) < state.config.round_leases * k:
            return []
        dealt = ready[: state.config.round_leases * k]
        if not await state.billing.admit_round(run, v, dealt):
            await self.runs.finish(run, "completed", "budget")
            return []
        book.deal(run, dealt, v)
        return dealt

    async def close_loop(self, period_s: float = 5.0) -> None:
        """Give back the holds of ended runs' rounds whose reports never came."""
        while True:
            await trio.sleep(period_s)
            for run in list(self.state.book.runs.values()):
                await self.state.billing.close_overdue(run, self.state.config.report_deadline_s)

    def next_version(self, run_id: str) -> int:
        """The number of the run's next version: after every version made, withdrawn ones
        included (a number is never used twice: nodes cache adapters by it)."""
        return max([0, *self.state.versions.get(run_id, {})]) + 1

    def parent_of(self, run_id: str, version: int) -> int:
        """The version ``version`` was trained from (-1 for version 0)."""
        row = self.state.versions.get(run_id, {}).get(version)
        return -1 if version == 0 or row is None else row.trained_from()

    def made_from(self, run_id: str, round_: int) -> AdapterRow | None:
        """The live version the round from ``round_`` made, if any."""
        rows = self.state.versions.get(run_id, {}).values()
        return next((r for r in rows if not r.revoked and r.trained_from() == round_), None)

    def live_versions(self, run_id: str) -> int:
        return sum(not r.revoked for r in self.state.versions.get(run_id, {}).values())

    def commit(self, peer: str, msg: RoundCommitment) -> CommitmentAck:
        """A trainer's commitment to its part of a round (``coordinator/replays.py``). Naming a
        rollout the round was not dealt is a strike: it trained on rollouts it was not dealt
        (one dealt to another trainer of the round since — the shares are cut again when
        trainers join — is refused, no strike: the trainer takes its share again)."""
        state = self.state
        run = state.book.runs.get(msg.run_id)
        if run is None:
            return CommitmentAck(accepted=False, detail=f"no run {msg.run_id!r}")
        dealt = state.book.dealt.get((msg.run_id, msg.version), [])
        share = [s.lease_id for s in dealt if s.trained_by == peer]
        open_round = run.state == "running" and msg.version == run.policy_version
        ack = state.replays.commit(peer, msg, share, open_round)
        round_ids = {s.lease_id for s in dealt}
        if not ack.accepted and open_round and any(i not in round_ids for i in msg.lease_ids):
            banned = state.audits.strike(peer)
            log.warning("trainer %s committed to %s round %d with rollouts it was not dealt: a "
                        "strike%s", peer, msg.run_id, msg.version, "; banned" if banned else "",
                        extra={"run_id": msg.run_id, "peer": peer})  # fmt: skip
        state.commit()
        return ack

    def _share(self, run_id: str, version: int, peer: str, dealt: list[LeaseState],
               trainers: list[str]) -> list[LeaseState]:  # fmt: skip
        """``peer``'s share of a dealt round. A share is the trainer's for the round once dealt:
        a trainer joining once the shares are taken takes none of them (cut again, a trainer at
        work would find its rollouts dealt to another and its version refused). What a trainer
        no longer works on (gone, banned, crashed and back as another process) goes to one
        asking: to a trainer with a share, on top of it (it trains the round again after a
        conflict); else split over the live trainers without one."""

        def working(t: str) -> bool:
            return t in trainers and self._same_process(run_id, version, t)

        holders = {s.trained_by for s in dealt if s.trained_by not in (None, peer)
                   and working(s.trained_by)}  # fmt: skip
        mine = [s for s in dealt if s.trained_by == peer] if working(peer) else []
        if mine:
            return mine + [s for s in dealt if s.trained_by not in (None, peer, *holders)]
        unheld = [s for s in dealt if s.trained_by not in holders]
        takers = [t for t in trainers if t not in holders]
        return unheld[takers.index(peer) :: len(takers)]

    def _same_process(self, run_id: str, version: int, trainer: str) -> bool:
        """Whether ``trainer`` runs as the process it was dealt round ``version`` as (or that
        is unknown)."""
        dealt = self._dealt_instance.get((run_id, version, trainer))
        return dealt is None or dealt == self.instance_of(trainer)

    def _restarted_mid_round(self, run_id: str, version: int, peer: str, live: list[str]) -> bool:
        """Whether ``peer`` was dealt this round as a process that is gone (it crashed and
        came back) while another trainer dealt the round still works on it as it was: that
        one makes the version alone (its all-reduce goes on without the lost partner), and a
        share dealt again to the new process would only sign a manifest of its own — a
        conflict, and the round trained again."""
        if self._same_process(run_id, version, peer):
            return False
        others = self.dealt_to(run_id, version) - {peer}
        return any(t in live and self._same_process(run_id, version, t) for t in others)

    def dealt_to(self, run_id: str, version: int) -> set[str]:
        """The trainers round ``version`` of a run is dealt to now."""
        dealt = self.state.book.dealt.get((run_id, version), [])
        return {s.trained_by for s in dealt if s.trained_by}

    async def manifest(
        self,
        peer: str,
        msg: AdapterManifest,
        frame: bytes,
        alive: Callable[[str], bool] = lambda peer: True,
    ) -> ManifestAck:
        """A trainer's manifest of the run's next version. Only the trainers the round was
        dealt to may make it (any other is refused and struck — but one that was dealt the
        round and committed to a part before it was dealt again is only refused: its manifest
        was late, not forged), and the version is made only
        when every one of them still alive (``alive``) has signed the same manifest: never on
        the word of whoever came first. Different manifests for one round are a conflict:
        nothing either signed is recorded, and the round's trainers train it again from the
        current version. (Which of them lied is for a replay of their work to show; until
        that exists, a trainer whose manifests keep conflicting stalls the run's versions —
        it cannot make one.)
        The request waits up to ``leases.manifest_wait_s`` for the round's other trainers;
        ``pending`` means "send it again"."""
        state = self.state
        run = state.book.runs.get(msg.run_id)
        if run is None:
            return ManifestAck(outcome="unknown_run", version=0, detail=f"no run {msg.run_id!r}")
        digest = hashlib.sha256(encode_body(msg)).hexdigest()
        current = run.policy_version
        made = state.versions.setdefault(msg.run_id, {}).get(msg.version)
        if made is not None and msg.version == current:
            return self._made(peer, msg, digest, made)
        nxt = self.next_version(msg.run_id)
        if msg.version != nxt or msg.parent_version != current:
            detail = f"the next version is {nxt}, from {current}"
            return ManifestAck(outcome="stale", version=current, detail=detail)
        dealt = self.dealt_to(msg.run_id, current)
        if peer not in dealt and state.replays.committed(msg.run_id, current, peer) is not None:
            # it was dealt this round and committed to a part, and the round has been dealt
            # again since (a conflict, a banned co-trainer): a late manifest, not a lie
            detail = f"round {current} of {msg.run_id} has been dealt again, not to you"
            return ManifestAck(outcome="not_dealt", version=current, detail=detail)
        if peer not in dealt:
            banned = state.audits.strike(peer)
            state.commit()
            log.warning("trainer %s sent a manifest for %s v%d, a round not dealt to it: a "
                        "strike%s", peer, msg.run_id, msg.version, "; banned" if banned else "",
                        extra={"run_id": msg.run_id, "peer": peer})  # fmt: skip
            detail = f"round {current} of {msg.run_id} is not dealt to you"
            return ManifestAck(outcome="not_dealt", version=current, detail=detail)
        commitment = state.replays.committed(msg.run_id, current, peer)
        if commitment is None:
            detail = f"no commitment of yours to a part of round {current} of {msg.run_id}"
            return ManifestAck(outcome="uncommitted", version=current, detail=detail)
        group = sorted(msg.group or [committed_part(peer, commitment.part_hash)])
        parts = [parse_part(name) for name in group]
        own = [h for t, h in parts if t == peer]
        if len(own) != 1 or not {t for t, _ in parts} <= dealt or len(set(parts)) != len(parts):
            detail = "a version averages parts of the round's dealt trainers, one of yours"
            return ManifestAck(outcome="conflict", version=current, detail=detail)
        if not all(state.replays.was_committed(msg.run_id, current, t, h) for t, h in parts):
            detail = "a version averages only parts committed to before the all-reduce"
            return ManifestAck(outcome="uncommitted", version=current, detail=detail)
        if not await self.keep_part(peer, own[0]):
            detail = f"the part you committed to for round {current} could not be fetched"
            return ManifestAck(outcome="uncommitted", version=current, detail=detail)
        proposals = self._proposals.setdefault((msg.run_id, msg.version), {})
        proposal = proposals.setdefault(digest, _Proposal(frame, group))
        if peer not in proposal.signers:
            proposal.signers.append(peer)
        give_up = trio.current_time() + state.config.manifest_wait_s
        while True:
            made = state.versions[msg.run_id].get(msg.version)
            if made is not None:  # another signer's request made it meanwhile
                return self._made(peer, msg, digest, made)
            if len(proposals) > 1:  # every signer of either learns it; the round starts over
                if self._proposals.get((msg.run_id, msg.version)) is proposals:
                    del self._proposals[(msg.run_id, msg.version)]
                    log.error("the trainers of %s round %d signed different manifests: none is "
                              "recorded, every signer's round is replayed, the round is "
                              "trained again", msg.run_id, current,
                              extra={"run_id": msg.run_id})  # fmt: skip
                    state.replays.on_conflict(
                        msg.run_id,
                        current,
                        self.parent_of(msg.run_id, current),
                        [(p.frame, list(p.signers), p.group) for p in proposals.values()],
                    )
                    state.commit()
                return ManifestAck(outcome="conflict", version=current,
                                   detail="the round's trainers signed different manifests: "
                                   "train the round again from the current version")  # fmt: skip
            missing = {t for t in self.dealt_to(msg.run_id, current)
                       if alive(t) and self._same_process(msg.run_id, current, t)}  # fmt: skip
            if missing <= set(proposal.signers):
                return await self._make(run, msg, digest, proposal)
            if trio.current_time() >= give_up:
                return ManifestAck(outcome="pending", version=current,
                                   detail=f"waiting for {len(missing - set(proposal.signers))} "
                                   "more of the round's trainers")  # fmt: skip
            # a co-trainer's manifest commits; one dying does not: look again every second
            with trio.move_on_at(min(give_up, trio.current_time() + 1.0)):
                await state.next_commit()

    def _made(self, peer: str, msg: AdapterManifest, digest: str, made: AdapterRow) -> ManifestAck:
        """The answer for a manifest of a version already made: a holder more if it is the
        same manifest from one of the round's trainers."""
        if made.manifest_hash != digest:
            log.warning("trainer %s sent another manifest for %s v%d", peer, msg.run_id,
                        msg.version, extra={"run_id": msg.run_id})  # fmt: skip
            return ManifestAck(outcome="conflict", version=msg.version,
                               detail="a different manifest holds this version")  # fmt: skip
        if peer in made.signers:
            return ManifestAck(outcome="recorded", version=msg.version)
        if peer in self.dealt_to(msg.run_id, made.trained_from()):
            made.signers = [*made.signers, peer]
            self.state.commit()
        return ManifestAck(outcome="duplicate", version=msg.version)

    async def _make(
        self, run: RunState, msg: AdapterManifest, digest: str, proposal: _Proposal
    ) -> ManifestAck:
        state = self.state
        row = AdapterRow(run_id=msg.run_id, version=msg.version, manifest_hash=digest,
                         frame=proposal.frame, signers=list(proposal.signers),
                         created_at=state.clock(), parent=msg.parent_version)  # fmt: skip
        parent = self.parent_of(msg.run_id, msg.parent_version)
        state.versions[msg.run_id][msg.version] = row
        state.add(row)
        self._proposals.pop((msg.run_id, msg.version), None)
        self._dealt_instance = {k: i for k, i in self._dealt_instance.items()
                                if k[0] != msg.run_id or k[1] >= msg.version}  # fmt: skip
        state.book.set_policy_version(msg.run_id, msg.version)
        state.replays.on_made(row, parent, proposal.group)
        state.commit()
        log.info("run %s is at version %d (manifest signed by %s)", msg.run_id, msg.version,
                 ", ".join(proposal.signers), extra={"run_id": msg.run_id})  # fmt: skip
        if (
            run.plan.spec.stop.max_rounds is not None
            and self.live_versions(msg.run_id) >= run.plan.spec.stop.max_rounds
        ):
            await self.runs.finish(run, "completed", "max_rounds")
        return ManifestAck(outcome="recorded", version=msg.version)

    async def report(self, peer: str, msg: RoundReport) -> ReportAck:
        """A trainer's report of a round it trained (a resend replaces the earlier one, and
        what was billed stays billed). A round that made the run's version bills what the
        coordinator dealt to this trainer, whatever the report says it trained. A round that
        made no version is not reported: its trainers train it again (a conflict), and the
        report of the round that makes it is the one billed."""
        state = self.state
        run = state.book.runs.get(msg.run_id)
        if run is None:
            return ReportAck(recorded=False, detail=f"no run {msg.run_id!r}")
        made = self.made_from(msg.run_id, msg.version)
        if made is None:  # a round is reported once it made a version
            return ReportAck(recorded=False, detail=f"round {msg.version} made no version (yet): "
                             "it is trained again, or goes on")  # fmt: skip
        rewards = [msgspec.to_builtins(r) for r in msg.rewards]
        samples = [msgspec.to_builtins(x) for x in msg.samples]
        counts = [msgspec.to_builtins(c) for c in msg.counts]
        row = state.reports.by_run.get(msg.run_id, {}).get((msg.version, peer))
        first = row is None
        if row is None:
            row = ReportRow(run_id=msg.run_id, round=msg.version, trainer=peer, rewards=rewards,
                            samples=samples, at=state.clock(), counts=counts)  # fmt: skip
            state.add(row)
            state.reports.add(row)
        else:
            row.rewards, row.samples, row.counts, row.at = rewards, samples, counts, state.clock()
        share = [s for s in state.book.dealt.get((msg.run_id, msg.version), [])
                 if s.trained_by == peer]  # fmt: skip
        if first and peer in made.signers:  # its round moved the model
            false = self._false_report(peer, share, msg)
            if false:
                banned = state.audits.strike(peer)
                log.warning("trainer %s reported %s for run %s round %d: not paid for it, a "
                            "strike%s", peer, false, msg.run_id, msg.version,
                            "; banned" if banned else "",
                            extra={"run_id": msg.run_id, "peer": peer})  # fmt: skip
            await state.billing.charge_round(run, msg.version, peer, share, pay_trainer=not false)
        state.billing.reported(run, msg.version, peer)
        await state.billing.close_reported(run)
        state.commit()
        return ReportAck(recorded=True)

    def _false_report(self, peer: str, share: list[LeaseState], msg: RoundReport) -> str:
        """What a trainer's report claims that the payloads of its share contradict, as the
        coordinator counted and scored them itself (empty: nothing)."""
        ours = {s.lease_id: s for s in share}
        wrong = [c for c in msg.counts if c.lease_id not in ours
                 or ours[c.lease_id].recounted_tokens != c.tokens]  # fmt: skip
        if wrong:
            return f"token counts the payloads do not hold (lease {wrong[0].lease_id})"
        fetched = [ours[c.lease_id] for c in msg.counts]
        if not fetched or any(s.rewards is None for s in fetched):
            return ""  # the coordinator did not score them all: nothing to compare with
        totals: dict[int, float] = {}
        for s in fetched:
            totals[s.lease.policy_version] = totals.get(s.lease.policy_version, 0.0) + sum(
                s.rewards or []
            )
        said = {r.version: r.reward_sum for r in msg.rewards}
        if said.keys() != totals.keys() or any(
            abs(said[v] - totals[v]) > 1e-4 * max(1.0, abs(totals[v])) for v in totals
        ):
            return f"rewards the environment does not give ({said} against {totals})"
        return ""

    def versions(self, req: VersionsRequest, addrs_of: Callable[[str], list[str]]) -> VersionsReply:
        """The current version of every running run on the request's base model (or the one
        version it names), with its holders: the trainers that made it first, then nodes that
        hold it, then nodes at a later version of the run (a node keeps the versions it went
        through: when the trainers that made a version have left, a trainer taking over
        still finds it, and its parent)."""
        state = self.state
        runs = state.book.runs
        on_model = [r for r in runs.values() if r.plan.spec.base_model == req.base_model]
        if req.run_id is not None and req.version is not None:
            wanted = [(req.run_id, req.version)]
        else:
            wanted = [(r.run_id, r.policy_version) for r in on_model if r.state == "running"]
        deployed = [(r.run_id, r.deployed) for r in on_model if r.deployed is not None]

        def infos(pairs: list[tuple[str, int]]) -> list[VersionInfo]:
            out = []
            for run_id, v in pairs:
                row = state.versions.get(run_id, {}).get(v)
                run = runs.get(run_id)
                if (row is None or row.revoked or run is None
                        or run.plan.spec.base_model != req.base_model):  # fmt: skip
                    continue
                at = {p: held[run_id] for p, held in state.held.items()
                      if run_id in held and p not in row.signers}  # fmt: skip
                nodes = [p for p, h in at.items() if h == v] + [p for p, h in at.items() if h > v]
                holders = [PeerRecord(p, addrs_of(p)[:16]) for p in [*row.signers, *nodes][:64]]
                out.append(VersionInfo(run_id, v, row.frame, holders, min(len(row.signers), 64)))
            return out[:32]

        current = {r.run_id: r.policy_version for r in on_model[-1024:]}
        return VersionsReply(versions=infos(wanted), deployed=infos(deployed), current=current)

    def roll_back(self, run: RunState, to: int) -> list[int]:
        """Withdraw every live version of the run after ``to`` (a failed replay touched the
        rounds that made them): the run is at ``to`` again, its next version takes the next
        unused number, nodes drop the withdrawn ones when they next sync, and the open replays
        of their rounds are cancelled. Rollouts sampled at withdrawn versions are not trained
        on; those the withdrawn rounds trained on stay spent. Returns the versions withdrawn."""
        rows = self.state.versions.get(run.run_id, {})
        withdrawn = [r for v, r in sorted(rows.items()) if not r.revoked and v > to]
        for r in withdrawn:
            r.revoked = True
        for key in [k for k in self._proposals if k[0] == run.run_id]:
            del self._proposals[key]
        self.state.book.roll_back(run.run_id, to, [r.version for r in withdrawn])
        if run.deployed is not None and run.deployed > to:
            run.deployed = to or None
        self.state.replays.cancel(run.run_id, {r.trained_from() for r in withdrawn})
        log.warning("run %s rolled back to version %d: versions %s withdrawn", run.run_id, to,
                    [r.version for r in withdrawn], extra={"run_id": run.run_id})  # fmt: skip
        return [r.version for r in withdrawn]
