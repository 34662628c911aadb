"""Replay audits of trainers' rounds: the book of commitments and replays, and its rules.

**Commitments.** After its inner steps and before the all-reduce, each trainer of a round
commits to its quantized part (``RoundCommitment``: the hash of the signed ``TrainingPart`` it
serves, and the dealt rollouts it trained on). A commitment counts only from a trainer the round
is dealt to, naming only rollouts of its own share (anything else is refused and struck: it
trained on rollouts it was not dealt); a resend replaces it until the round makes a version.
A manifest counts only from a trainer that committed and whose part the coordinator fetched
and keeps (``coordinator/rounds.py``): a trainer cannot dodge a replay by not serving its part.

**Which rounds are replayed.** When a version is made, each of its signers' rounds is drawn
for a replay: every round of a trainer that has passed fewer than ``trusted_after`` replays
(a replay of a round without learning signal, whose part is all zeros, passes but earns no
trust: any cheat on a zero part is a no-op, so it proves nothing about the next round),
else ``rate`` of them (``lone_rate`` for a version one trainer made alone), with randomness drawn
after the version exists. When a round's trainers sign different manifests (a conflict), every
signer's round is replayed against the manifest it signed: the evidence decides which lied,
never who came first.

**A replay.** A verifier other than the round's trainers replays the trainer's round from the
dealt rollouts and checks its part and the manifest it signed against the parts of the round
(``verification/training.py``). One pass decides it. A failure is confirmed by another verifier:
two failures decide it failed; a pass and a failure go to a third, and the majority decides;
the verifier in the minority is struck (a verifier that fails honest trainers, or passes
lying ones when honest ones see it, loses). A replay not answered by its deadline goes to
another verifier.

**A failed replay** bans the trainer and rolls the run back to before the first of its rounds
no replay passed (``rollback_point``): every version made since is withdrawn, its replays
cancelled; the run goes on from there, and the trainer's pay for the withdrawn rounds goes back
to the run's payer (``coordinator/replaying.py`` applies it). A version that fails the sum
check (it is not the step its committed parts make) bans every trainer that signed it: before
signing, each trainer checks the all-reduce against the parts its group committed to, and signs
their step instead where they differ (``node/roles/trainer.py``) — so a trainer that puts
another part into the all-reduce than it committed moves no honest trainer's version, and its
own manifest, alone in a conflict, fails the sum check.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coordinator.config import ReplayConfig
from coordinator.db import AdapterRow, CommitmentRow, ReplayRow, Trust
from protocol.adapters import CommitmentAck, RoundCommitment, parse_part
from protocol.verification import ReplayVerdict

log = logging.getLogger(__name__)

HISTORY = 16
"""Parts of one round kept per trainer (one per try: a conflict makes the round trained again)."""

ABSTAIN = ("verifier_error", "unavailable")
"""Failed checks that say the verifier could not check, not that the trainer lied: the
coordinator keeps every committed part and the dealt payloads, so what a verifier cannot fetch
is its own trouble; the replay goes to another verifier."""


@dataclass
class ReplayRuling:
    """What a replay verdict decided."""

    outcome: str
    """abstained (the verifier could not check) | confirming | decided | unknown_audit |
    wrong_verifier"""
    replay: ReplayRow | None = None
    decision: str = ""
    """passed | failed, once decided."""
    struck: list[str] = field(default_factory=list)
    """Verifiers outvoted by the decision."""


class ReplayBook:
    def __init__(
        self,
        config: ReplayConfig,
        clock: Callable[[], float],
        trust_of: Callable[[str], Trust],
        keep: Callable[[object], None],
        rng: random.Random | None = None,
    ) -> None:
        self.config, self.clock, self.trust_of, self.keep = config, clock, trust_of, keep
        self.rng = rng or random.SystemRandom()
        self.empty_part: Callable[[bytes], bool] = lambda digest: False
        """Whether the kept part of this hash is all zeros (the server reads it)."""
        self.commitments: dict[tuple[str, int, str], CommitmentRow] = {}
        self.replays: dict[str, ReplayRow] = {}

    def restore(self, commitments: Iterable[CommitmentRow], replays: Iterable[ReplayRow]) -> None:
        for c in commitments:
            self.commitments[(c.run_id, c.round, c.trainer)] = c
        for r in replays:
            if r.status == "assigned":
                r.status, r.verifier = "open", ""
            self.replays[r.audit_id] = r

    # -- commitments ------------------------------------------------------------------------

    def commit(self, peer: str, msg: RoundCommitment, share: list[str], open_round: bool
               ) -> CommitmentAck:  # fmt: skip
        """Record ``peer``'s commitment to its part of round ``msg.version``: ``share`` is the
        rollouts the round is dealt to it with, ``open_round`` whether the round has yet to
        make its version."""
        if not open_round:
            return CommitmentAck(accepted=False, detail=f"round {msg.version} of {msg.run_id} "
                                 "is not open")  # fmt: skip
        if not share:
            return CommitmentAck(accepted=False, detail=f"round {msg.version} of {msg.run_id} "
                                 "is not dealt to you")  # fmt: skip
        if not msg.lease_ids:
            return CommitmentAck(accepted=False, detail="a part is trained on rollouts: name "
                                 "those of your share it was trained on")  # fmt: skip
        foreign = [i for i in msg.lease_ids if i not in set(share)]
        if foreign or len(set(msg.lease_ids)) != len(msg.lease_ids):
            return CommitmentAck(accepted=False, detail=f"rollout {foreign[:1] or msg.lease_ids} "
                                 "is not (once) in your share of the round")  # fmt: skip
        key = (msg.run_id, msg.version, peer)
        row = self.commitments.get(key)
        if row is None:
            row = CommitmentRow(run_id=msg.run_id, round=msg.version, trainer=peer,
                                part_hash=msg.part_hash, lease_ids=list(msg.lease_ids),
                                at=self.clock())  # fmt: skip
            self.keep(row)
            self.commitments[key] = row
        else:
            row.part_hash, row.lease_ids, row.at = msg.part_hash, list(msg.lease_ids), self.clock()
        history = dict(list(row.history.items())[-(HISTORY - 1) :])
        row.history = {**history, msg.part_hash.hex(): list(msg.lease_ids)}
        return CommitmentAck(accepted=True)

    def was_committed(self, run_id: str, round_: int, trainer: str, part_hash: bytes) -> bool:
        """Whether ``trainer`` committed to this part for the round (in any try of it)."""
        row = self.committed(run_id, round_, trainer)
        return row is not None and (part_hash == row.part_hash or part_hash.hex() in row.history)

    def committed(self, run_id: str, round_: int, trainer: str) -> CommitmentRow | None:
        return self.commitments.get((run_id, round_, trainer))

    # -- opening replays --------------------------------------------------------------------

    def on_made(self, row: AdapterRow, parent: int, group: list[str]) -> list[ReplayRow]:
        """Draw the rounds of a version just made for replay (``parent``: what the round's
        starting version was trained from; ``group``: the committed parts it averages, as its
        manifest names them)."""
        opened = []
        for trainer in row.signers:
            trust = self.trust_of(trainer)
            rate = self.config.lone_rate if len(row.signers) == 1 else self.config.rate
            if trust.replays_passed < self.config.trusted_after or self.rng.random() < rate:
                opened.append(self._open(row.run_id, row.trained_from(), parent, row.version,
                                         trainer, row.frame, row.signers, group))  # fmt: skip
        return [r for r in opened if r is not None]

    def on_conflict(
        self,
        run_id: str,
        round_: int,
        parent: int,
        proposals: Iterable[tuple[bytes, list[str], list[str]]],
    ) -> list[ReplayRow]:
        """Replay every signer of a round whose trainers signed different manifests, each
        against the manifest it signed (``(frame, signers, group)``: and the parts of the group
        that manifest names)."""
        opened = []
        for frame, signers, group in proposals:
            for trainer in signers:
                opened.append(
                    self._open(run_id, round_, parent, -1, trainer, frame, signers, group)
                )
        return [r for r in opened if r is not None]

    def _open(self, run_id: str, round_: int, parent: int, made: int, trainer: str,
              frame: bytes, signers: list[str], group: list[str]) -> ReplayRow | None:  # fmt: skip
        named = [parse_part(name) for name in group]
        own = [h for t, h in named if t == trainer]
        row_of = self.committed(run_id, round_, trainer)
        if len(own) != 1 or row_of is None:
            return None  # a manifest counts only with the signer's own committed part
        lease_ids = row_of.history.get(own[0].hex(), row_of.lease_ids)
        parts = [(trainer, own[0]), *[(t, h) for t, h in named if t != trainer]]
        question = (run_id, round_, trainer, made)
        open_ = [r for r in self.replays.values() if r.status in ("open", "assigned")]
        if any((r.run_id, r.round, r.trainer, r.made) == question for r in open_):
            return None  # the same question is open already (a round retrained in conflict)
        row = ReplayRow(
            audit_id=f"replay-{secrets.token_hex(8)}", run_id=run_id, round=round_,
            parent=parent, made=made, trainer=trainer, manifest=frame,
            parts=[[t, h.hex()] for t, h in parts],
            lease_ids=list(lease_ids), created_at=self.clock(), signers=list(signers),
        )  # fmt: skip
        self.keep(row)
        self.replays[row.audit_id] = row
        log.info("round %d of %s by %s drawn for a replay (%s)", round_, run_id, trainer,
                 f"version {made}" if made >= 0 else "a conflict",
                 extra={"run_id": run_id, "peer": trainer})  # fmt: skip
        return row

    # -- handing out and deciding ------------------------------------------------------------

    def assign(self, verifier: str, can_check: Callable[[ReplayRow], bool]) -> ReplayRow | None:
        """The oldest open replay ``verifier`` may take: not one it gave a verdict on, nor of a
        round it trained in. One it could not check it may take again: with two verifiers in
        the network, a failure confirmed needs both, whatever went wrong with a fetch."""
        now = self.clock()
        for r in self.replays.values():
            if r.status == "assigned" and r.deadline < now:
                log.info("replay %s not answered by %s in time: open again", r.audit_id,
                         r.verifier)  # fmt: skip
                r.status, r.verifier = "open", ""
        for r in sorted(self.replays.values(), key=lambda r: r.created_at):
            if r.status != "open" or not can_check(r):
                continue
            counted = {v[0] for v in r.verdicts if v[1] or v[2] not in ABSTAIN}
            if verifier in counted or verifier in {t for t, _ in r.parts}:
                continue
            r.status, r.verifier, r.deadline = "assigned", verifier, now + self.config.deadline_s
            return r
        return None

    def verdict(self, verifier: str, msg: ReplayVerdict) -> ReplayRuling:
        r = self.replays.get(msg.audit_id)
        if r is None or r.status in ("passed", "failed", "cancelled"):
            return ReplayRuling("unknown_audit", r)
        if r.status != "assigned" or r.verifier != verifier or msg.trainer != r.trainer:
            return ReplayRuling("wrong_verifier", r)
        r.verdicts = [*r.verdicts, [verifier, msg.passed, msg.failed_check, dict(msg.stats)]]
        r.verifier = ""
        if not msg.passed and msg.failed_check in ABSTAIN:
            r.status = "open"  # it could not check: another verifier will
            return ReplayRuling("abstained", r)
        counted = [v for v in r.verdicts if v[1] or v[2] not in ABSTAIN]
        passes = [v for v in counted if v[1]]
        fails = [v for v in counted if not v[1]]
        if not fails:
            return self._decide(r, "passed")
        if len(fails) >= 2 and len(fails) > len(passes):
            return self._decide(r, "failed")
        if len(passes) >= 2 and len(passes) > len(fails):
            return self._decide(r, "passed")
        r.status = "open"  # a failure to confirm, or a split to break
        return ReplayRuling("confirming", r)

    def _decide(self, r: ReplayRow, decision: str) -> ReplayRuling:
        r.status = decision
        if decision == "passed" and self.empty_part(bytes.fromhex(r.parts[0][1])):
            log.info("replay %s passed a round without learning signal (its part is zero): "
                     "no trust earned", r.audit_id, extra={"peer": r.trainer})  # fmt: skip
        elif decision == "passed":
            self.trust_of(r.trainer).replays_passed += 1
        struck = [v[0] for v in r.verdicts
                  if bool(v[1]) != (decision == "passed") and v[2] not in ABSTAIN]  # fmt: skip
        log.log(logging.INFO if decision == "passed" else logging.WARNING,
                "replay %s of %s round %d by %s: %s (%d verdicts)", r.audit_id, r.run_id, r.round,
                r.trainer, decision, len(r.verdicts),
                extra={"run_id": r.run_id, "peer": r.trainer})  # fmt: skip
        return ReplayRuling("decided", r, decision, struck)

    # -- after a failure ---------------------------------------------------------------------

    def rollback_point(self, versions: dict[int, AdapterRow], trainer: str) -> int | None:
        """The version a run goes back to once ``trainer`` is caught: the starting version of
        the first live version it signed whose round no replay passed (None: it signed none)."""
        passed = {(r.round, r.made) for r in self.replays.values()
                  if r.trainer == trainer and r.status == "passed"}  # fmt: skip
        suspect = [row for v, row in sorted(versions.items())
                   if not row.revoked and trainer in row.signers
                   and (row.trained_from(), v) not in passed]  # fmt: skip
        return suspect[0].trained_from() if suspect else None

    def cancel(self, run_id: str, rounds: set[int], trainer: str | None = None) -> None:
        """Cancel open replays of these rounds of a run (their versions were withdrawn), and
        every open replay of ``trainer`` (banned: its other rounds are moot)."""
        for r in self.replays.values():
            if (
                r.status in ("open", "assigned")
                and r.run_id == run_id
                and (r.round in rounds or r.trainer == trainer)
            ):
                r.status = "cancelled"

    def open_count(self) -> int:
        return sum(r.status in ("open", "assigned") for r in self.replays.values())
