"""Audits: which receipts are checked, by whom, what decides them, and how verifiers are checked.

Pure logic over an injected clock and random source (``coordinator/auditing.py`` wraps it with
the network, ``coordinator/state.py`` with the database). Audits still open are indexed apart
(``open``, and ``assigned`` among them), so assigning and expiring audits never walks the
history. This docstring is the one description of the rules; the rates are ``AuditConfig``'s.

- **Sampling.** Whether a counted receipt is audited is drawn *after* it arrived, from the
  coordinator's randomness, so a producer cannot know which of its rollouts will be checked.
  A producer is audited every time until it has ``trusted_after`` clean audits in a row, then at
  the floor rate (adaptive replication, as BOINC does it); a failure starts the count again.
  The whole lease — every group in it — is one audit.
- **Assignment.** An audit goes to a verifier that is neither its producer nor one that has
  judged it: a further look (a confirmation, a tie-break, a double-check) first, the oldest;
  otherwise the oldest audit of the producer served longest ago, so one producer's backlog
  (every receipt of a new producer is audited) never holds up another's audits. An audit not
  answered by its deadline goes back to the queue for another verifier.
  A verifier that could not run the checks (``verifier_error``) hands the audit on, unpaid.
- **Decision by majority.** A first pass decides alone (the cost of auditing is one check),
  except that a ``double_check_rate`` share of first passes, drawn when the pass arrives, also
  goes to a second verifier (drawn only while another verifier is asking for work, so a network
  with one verifier never waits for a second). A failure is never decided alone: it goes to
  another verifier, and while the verdicts are split, to more (a third, …) until one side has
  at least two verdicts and more than the other — two failures, 2 of 3, …; a single later pass
  never clears a failure. Verdicts of banned nodes count for nothing. The decision sets the
  lease's audit (``passed`` / ``failed``; status ``cleared`` is a pass over a failed verdict).
- **A failure must vouch.** A verifier's failure of a producer's payload counts only once it
  has answered a known-honest reference *of that producer* right (sent blind, before anything
  else it could take, as soon as it failed one), or when the coordinator holds none it was not
  handed. Until then the audit waits; failing that reference discredits its failures of the
  producer (they count for nothing, besides the strike). Verifiers that lie about one producer
  only — colluders framing it, who answer every other known answer right and pass probation on
  other producers' references — fail its own honest work, and cannot make a majority against it.
- **Producer penalties** (a ``Penalty`` for the caller to apply to leases and credits): the
  rollout is rejected; every unaudited receipt of the producer within the quarantine window is
  quarantined; its credits in that window are forfeited; its reputation drops; after
  ``max_strikes`` failures decided against it, it is banned. The coordinator's own conviction
  (``convict``: the producer's signed payload contradicts its receipt) needs no verifier.
- **Known answers.** A payload whose verdict is settled — two passes and no failure (a
  double-check), two content failures and no pass, or the coordinator's conviction — is a
  *reference*; the newest ``max_references`` of each kind are kept, their frames pinned in the
  coordinator's payload store (``coordinator/auditing.py``). In place of a real audit it could
  take, a verifier gets, with probability ``known_answer_rate`` (every time while it is new: its
  first ``verifier_trusted_after`` right answers), a *known-answer audit*: a reference's lease
  it has never been handed, sent blind — a fresh audit id, the same fields as any audit, the
  versions of the original audit, the same sources (the producer while it is up, and the
  coordinator, which keeps every payload it recounted, for every audit). Its answer is scored:
  right earns like a real check; a pass of a known cheat or a failure of a known-honest payload
  is wrong. ``unavailable`` and ``verifier_error`` are no answer (a network failure is not a
  lie): no pay, no mark. The acknowledgement is the one a real first look would get.
- **Verifier penalties** (a ``VerifierPenalty``): a wrong known answer is a strike; being
  outvoted in a decided audit is a mark (not for ``unavailable``), and every
  ``minority_per_strike`` marks a strike; passing a payload the coordinator convicted is a mark.
  Each strike forfeits the verifier's credit for checks of the quarantine window to the
  network's account; at ``max_verifier_strikes`` it is banned from all work, and the passes it
  alone decided within the window are reopened for another verifier.
- **Pay.** Nothing is credited before an audit is decided, then only to verifiers whose verdict
  agrees with the decision (or with the known answer); nothing for a hand-on, an outvoted
  verdict, or an audit cancelled because its lease was quarantined.

What a verifier can still tell: the message is the same, but a known answer's lease is older
than most, and the public REST views list rollouts and verdicts by lease, so a verifier that
reads them can find a settled lease; the views are the operator's to restrict.
"""

from __future__ import annotations

import math
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coordinator.config import AuditConfig
from coordinator.db import Audit, Trust, VerdictRecord
from protocol.verification import Verdict, VerdictOutcome

NO_ANSWER = ("verifier_error", "unavailable")
"""Failed checks that say the verifier could not look, not what it saw (on a known answer)."""
FETCH_CHECKS = ("unavailable", "signature")
"""Failures at fetching: a reference of a known cheat needs failures of the content itself."""
DECIDED = ("passed", "cleared", "failed")


@dataclass(frozen=True)
class Penalty:
    producer: str
    lease_id: str
    failed_check: str
    banned: bool


@dataclass(frozen=True)
class VerifierPenalty:
    verifier: str
    audit_id: str
    reason: str
    """``known_answer`` (a wrong one) or ``outvoted`` (marks that made a strike)."""
    banned: bool


@dataclass
class Ruling:
    """What a verdict (or a conviction) changed, for the caller to apply."""

    outcome: VerdictOutcome
    audit: Audit | None = None
    decision: str = ""
    """``passed`` or ``failed`` when this decided a real audit; empty otherwise."""
    penalty: Penalty | None = None
    paid: list[str] = field(default_factory=list)
    """Verifiers to credit for this audit now."""
    struck: list[VerifierPenalty] = field(default_factory=list)
    reopened: list[Audit] = field(default_factory=list)
    """Audits a verifier banned now had decided alone: open again."""
    followups: list[Ruling] = field(default_factory=list)
    """Audits this verdict let be decided (a verifier vouched for, or was discredited on, the
    producer their failures waited on)."""


class AuditBook:
    def __init__(
        self,
        config: AuditConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        keep: Callable[[object], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or secrets.SystemRandom()
        self.keep = keep or (lambda entity: None)
        self.trust: dict[str, Trust] = {}
        self.audits: dict[str, Audit] = {}
        self.open: dict[str, Audit] = {}
        """Real audits pending or assigned, oldest first."""
        self.assigned: dict[str, Audit] = {}
        """The audits a verifier holds now, known answers included."""
        self.references: dict[str, dict[str, Audit]] = {"pass": {}, "fail": {}}
        """Decided audits whose payloads are known answers, by answer, oldest first."""
        self.handed: dict[str, set[str]] = {}
        """Lease → every verifier handed or having judged an audit of it."""
        self.asked: dict[str, float] = {}
        """Verifier → when it last asked for work."""
        self.devices: dict[str, str] = {}
        """Verifier → the device class it generates on exactly (as it last asked; empty:
        none)."""
        self.served: dict[str, float] = {}
        """Producer → when an audit of its work was last handed out."""
        self.vouched: dict[str, set[str]] = {}
        """Verifier → producers whose known-honest reference it answered right."""
        self.discredited: dict[str, set[str]] = {}
        """Verifier → producers whose known-honest reference it failed."""
        self._servable: Callable[[bytes], bool] = lambda digest: True
        """Whether the coordinator can serve a payload (as ``assign`` was last told): a
        reference it cannot serve cannot test anyone."""
        self.owed: dict[str, dict[str, str]] = {}
        """Verifier → producer (→ run) whose known-honest reference it must answer before its
        failures of that producer count."""

    def restore(self, trust: Iterable[Trust], audits: Iterable[Audit]) -> None:
        """Rebuild from stored records; an audit assigned when the coordinator stopped goes
        back to the queue (its verifier's deadline is gone with the process), a known answer
        is dropped."""
        for t in trust:
            self.trust[t.peer_id] = t
        for a in audits:
            self.audits[a.audit_id] = a
            seen = self.handed.setdefault(a.lease_id, set())
            seen.update(a.seen_by())
            if a.known_answer:
                seen.add(a.verifier)
                if a.status == "assigned":
                    a.status = "cancelled"
                self._note_answer(a)
                continue
            if a.status == "assigned":
                a.status, a.verifier = "pending", ""
            if a.status == "pending":
                self.open[a.audit_id] = a
            self._maybe_reference(a)

    def trust_of(self, node: str) -> Trust:
        trust = self.trust.get(node)
        if trust is None:
            trust = self.trust[node] = Trust(node)
            self.keep(trust)
        return trust

    def banned(self, node: str) -> bool:
        t = self.trust.get(node)
        return t is not None and t.banned

    def on_probation(self, verifier: str) -> bool:
        """A verifier new to the network: every audit it could take is a known answer."""
        return self.trust_of(verifier).known_right < self.config.verifier_trusted_after

    # -- sampling -------------------------------------------------------------------------------

    def rate(self, producer: str, floor: float | None = None) -> float:
        """Audit rate of the producer's next receipt: every one until it is trusted, then the
        floor (a run's own, or the coordinator's)."""
        trust = self.trust_of(producer)
        if trust.clean_streak < self.config.trusted_after:
            return 1.0
        return self.config.floor_rate if floor is None else floor

    def on_counted(
        self,
        lease_id: str,
        run_id: str,
        producer: str,
        payload_hash: bytes,
        floor: float | None = None,
        dtype: str = "",
        device: str = "",
    ) -> Audit | None:
        """Decide, with fresh randomness, whether this receipt is audited; the audit if so
        (``dtype``, ``device``: those the receipt declares)."""
        if self.rng.random() >= self.rate(producer, floor):
            return None
        audit = Audit(uuid.uuid4().hex, lease_id, run_id, producer, payload_hash, self.clock(),
                      dtype=dtype, device=device)  # fmt: skip
        self.audits[audit.audit_id] = self.open[audit.audit_id] = audit
        self.keep(audit)
        return audit

    # -- assignment -----------------------------------------------------------------------------

    def expire(self) -> list[Audit]:
        """Assigned audits past their deadline go back to the queue (a known answer is
        dropped: nobody else needs it)."""
        now, back = self.clock(), []
        for audit in list(self.assigned.values()):
            if now > audit.deadline:
                del self.assigned[audit.audit_id]
                if audit.known_answer:
                    audit.status = "cancelled"
                    continue
                audit.status, audit.verifier = "pending", ""
                back.append(audit)
        return back

    def assign(
        self,
        verifier: str,
        can_check: Callable[[Audit], bool] = lambda a: True,
        can_serve: Callable[[bytes], bool] = lambda digest: True,
        device: str = "",
    ) -> Audit | None:
        """What this verifier checks next: a real audit it may take (not its own work, not one
        it has judged, one it can check — ``can_check``: it runs the run's base model — and not
        one held for a verifier of its payload's device class, ``device`` being this one's; a
        further look first, else the producer served longest ago), or in its place, drawn, a
        known answer (``can_serve``: the coordinator holds the reference's payload)."""
        self.expire()
        if self.banned(verifier):
            return None
        self.asked[verifier] = self.clock()
        self.devices[verifier] = device
        self._servable = can_serve
        for producer, run_id in list(self.owed.get(verifier, {}).items()):
            ref = self._reference_of(producer, run_id, verifier, can_check, can_serve)
            if ref is not None:  # before anything else: failures of the producer wait on it
                return self._hand(self._known_audit(ref, "pass"), verifier)
            del self.owed[verifier][producer]
        real, served = None, 0.0
        for a in self.open.values():  # oldest first
            if a.status != "pending" or a.producer == verifier or verifier in a.seen_by() \
                    or not can_check(a) or self._held_for_another(a, verifier):  # fmt: skip
                continue
            if a.stage == "confirm":
                real = a
                break
            at = self.served.get(a.producer, 0.0)
            if real is None or at < served:
                real, served = a, at
        if real is None:
            return None
        share = 1.0 if self.on_probation(verifier) else self.config.known_answer_rate
        if share > 0 and self.rng.random() < share:
            known = self._known_answer(verifier, can_check, can_serve)
            if known is not None:
                return self._hand(known, verifier)
        return self._hand(real, verifier)

    def _held_for_another(self, audit: Audit, verifier: str) -> bool:
        """Whether ``audit`` waits for a verifier that generates exactly on its payload's device
        class (this one does not; one that could take it asked within ``exact_hold_s``)."""
        if not audit.device or self.devices.get(verifier) == audit.device:
            return False
        since = self.clock() - self.config.exact_hold_s
        return any(
            device == audit.device and self.asked.get(other, -math.inf) >= since
            and other != audit.producer and other not in audit.seen_by()
            and not self.banned(other)
            for other, device in self.devices.items()
        )  # fmt: skip

    def _hand(self, audit: Audit, verifier: str) -> Audit:
        audit.status, audit.verifier = "assigned", verifier
        audit.deadline = self.clock() + self.config.deadline_s
        if not audit.known_answer:
            self.served[audit.producer] = self.clock()
        self.assigned[audit.audit_id] = audit
        self.handed.setdefault(audit.lease_id, set()).add(verifier)
        return audit

    def _known_answer(
        self, verifier: str, can_check: Callable[[Audit], bool], can_serve: Callable[[bytes], bool]
    ) -> Audit | None:
        """A new known-answer audit of a reference this verifier was never handed; a known
        cheat or a known-honest payload with even odds when both can be had."""
        kinds = []
        for answer, refs in self.references.items():
            eligible = [r for r in refs.values() if r.producer != verifier
                        and verifier not in self.handed.get(r.lease_id, ())
                        and can_check(r) and can_serve(r.payload_hash)]  # fmt: skip
            if eligible:
                kinds.append((answer, eligible))
        if not kinds:
            return None
        answer, eligible = self.rng.choice(kinds)
        return self._known_audit(self.rng.choice(eligible), answer)

    def _known_audit(self, ref: Audit, answer: str) -> Audit:
        audit = Audit(uuid.uuid4().hex, ref.lease_id, ref.run_id, ref.producer, ref.payload_hash,
                      self.clock(), known_answer=answer, reference=ref.audit_id,
                      current_version=ref.current_version, dtype=ref.dtype, device=ref.device,
                      max_staleness=ref.max_staleness)  # fmt: skip
        self.audits[audit.audit_id] = audit
        self.keep(audit)
        return audit

    def _reference_of(
        self,
        producer: str,
        run_id: str,
        verifier: str,
        can_check: Callable[[Audit], bool] = lambda a: True,
        can_serve: Callable[[bytes], bool] = lambda digest: True,
    ) -> Audit | None:
        """A known-honest reference of the producer's work in the run that the verifier was
        never handed (and can check, and the coordinator can serve); None if there is none."""
        for ref in self.references["pass"].values():
            if ref.producer == producer and ref.run_id == run_id \
                    and verifier not in self.handed.get(ref.lease_id, ()) \
                    and can_check(ref) and can_serve(ref.payload_hash):  # fmt: skip
                return ref
        return None

    # -- verdicts -------------------------------------------------------------------------------

    def verdict(self, verifier: str, verdict: Verdict, frame: bytes) -> Ruling:
        """Record a verifier's verdict and what it decides."""
        audit = self.audits.get(verdict.audit_id)
        if audit is None or audit.lease_id != verdict.lease_id:
            return Ruling("unknown_audit")
        if audit.status != "assigned" or audit.verifier != verifier:
            return Ruling("wrong_verifier")
        del self.assigned[audit.audit_id]
        if self.banned(verifier):  # banned while it held the audit: its word counts for nothing
            audit.status, audit.verifier = ("cancelled", verifier) if audit.known_answer \
                else ("pending", "")  # fmt: skip
            return Ruling("wrong_verifier", audit)
        audit.verdicts.append(
            VerdictRecord(
                verifier, verdict.passed, verdict.failed_check, verdict.detail, frame, self.clock()
            )
        )
        if audit.known_answer:
            return self._score(audit, verifier, verdict)
        if not verdict.passed and verdict.failed_check == "verifier_error":
            # the verifier could not check (its own fault, not the producer's): someone else will
            audit.status, audit.verifier = "pending", ""
            return Ruling("reassigned", audit)
        return self._decide(audit, verdict.passed)

    def _score(self, audit: Audit, verifier: str, verdict: Verdict) -> Ruling:
        """A known answer's verdict, acknowledged as a real first look would be."""
        outcome: VerdictOutcome = "recorded" if verdict.passed else "confirming"
        if not verdict.passed and verdict.failed_check in NO_ANSWER:
            audit.status = "cancelled"
            return Ruling("reassigned" if verdict.failed_check == "verifier_error" else outcome,
                          audit)  # fmt: skip
        audit.decided_at = self.clock()
        trust = self.trust_of(verifier)
        if verdict.passed == (audit.known_answer == "pass"):
            audit.status = "right"
            trust.known_right += 1
            ruling = Ruling(outcome, audit, paid=[verifier])
        else:
            audit.status = "wrong"
            trust.known_wrong += 1
            ruling = Ruling(outcome, audit)
            self._verifier_strike(verifier, audit.audit_id, "known_answer", ruling)
        if self._note_answer(audit):  # the audits its failures of the producer held, decided
            for held in [a for a in self.open.values() if a.producer == audit.producer
                         and a.status == "pending" and a.stage == "confirm"]:  # fmt: skip
                decided = self._decide(held, passed=False)
                if decided.decision:
                    ruling.followups.append(decided)
        return ruling

    def _note_answer(self, audit: Audit) -> bool:
        """Record a scored known-honest answer as vouching for its producer, or discrediting
        the verifier on it; True if it was one."""
        if audit.known_answer != "pass" or audit.status not in ("right", "wrong") \
                or not audit.verdicts:  # fmt: skip
            return False
        verifier = audit.verdicts[-1].verifier
        book = self.vouched if audit.status == "right" else self.discredited
        book.setdefault(verifier, set()).add(audit.producer)
        self.owed.get(verifier, {}).pop(audit.producer, None)
        return True

    def _standing(self, verifier: str, audit: Audit) -> str:
        """Whether the verifier's failure of ``audit``'s producer ``counts``, is ``owed`` a
        known-honest answer first, or is ``discredited``."""
        producer = audit.producer
        if producer in self.vouched.get(verifier, ()):
            return "counts"
        if producer in self.discredited.get(verifier, ()):
            return "discredited"
        if self._reference_of(producer, audit.run_id, verifier, can_serve=self._servable) is None:
            return "counts"  # nothing to test it with: its word counts as any verifier's
        return "owed"

    def _counted(self, audit: Audit, ignore: frozenset[str] = frozenset()) -> tuple[int, int]:
        """``(passes, failures)`` that count: no hand-ons, nothing from a banned node, no
        failure from a verifier in ``ignore`` (discredited on the producer)."""
        votes = [v.passed for v in audit.verdicts
                 if v.failed_check != "verifier_error" and not self.banned(v.verifier)
                 and (v.passed or v.verifier not in ignore)]  # fmt: skip
        return sum(votes), len(votes) - sum(votes)

    def _decide(self, audit: Audit, passed: bool) -> Ruling:
        first = audit.stage == "first"
        audit.stage = "confirm"  # any further look is a second one
        failing = {v.verifier for v in audit.verdicts if not v.passed
                   and v.failed_check != "verifier_error"
                   and not self.banned(v.verifier)}  # fmt: skip
        standing = {v: self._standing(v, audit) for v in failing}
        owed = [v for v, s in standing.items() if s == "owed"]
        if owed:  # no decision while a failing verifier has not vouched for the producer
            for v in owed:
                self.owed.setdefault(v, {})[audit.producer] = audit.run_id
            audit.status, audit.verifier = "pending", ""
            return Ruling("confirming", audit)
        ignore = frozenset(v for v, s in standing.items() if s == "discredited")
        p, f = self._counted(audit, ignore)
        if (
            first
            and passed
            and self._another_verifier(audit)
            and self.rng.random() < self.config.double_check_rate
        ):
            audit.quorum = 2  # a double-check: a second verifier looks as well
        if f == 0 and p >= audit.quorum:
            decision = "passed"
        elif p != f and max(p, f) >= 2:
            decision = "passed" if p > f else "failed"
        else:
            audit.status, audit.verifier = "pending", ""
            return Ruling("recorded" if f == 0 else "confirming", audit)
        ruling = self._settle(audit, decision)
        ruling.outcome = ("recorded" if f == 0 else "cleared") if decision == "passed" \
            else "confirmed_failure"  # fmt: skip
        return ruling

    def _another_verifier(self, audit: Audit) -> bool:
        """Has a verifier that may take this audit asked for work within a deadline?"""
        since, seen = self.clock() - self.config.deadline_s, audit.seen_by()
        return any(t >= since and v != audit.producer and v not in seen and not self.banned(v)
                   for v, t in self.asked.items())  # fmt: skip

    def _settle(self, audit: Audit, decision: str) -> Ruling:
        """Decide a real audit: its producer's record, who is paid, who was outvoted."""
        self.open.pop(audit.audit_id, None)
        f = self._counted(audit)[1]
        audit.status = "failed" if decision == "failed" else ("passed" if f == 0 else "cleared")
        audit.verifier, audit.decided_at = "", self.clock()
        ruling = Ruling("recorded", audit, decision)
        wanted = decision == "passed"
        for v in audit.verdicts:
            if v.failed_check == "verifier_error" or self.banned(v.verifier):
                continue
            if v.passed == wanted:
                self.trust_of(v.verifier).agreed += 1
                if v.verifier not in ruling.paid:
                    ruling.paid.append(v.verifier)
            elif v.failed_check != "unavailable":  # out of reach from there is not a lie
                self._outvoted(v.verifier, audit.audit_id, ruling)
        trust = self.trust_of(audit.producer)
        if wanted:
            trust.passed += 1
            trust.clean_streak += 1
        else:
            ruling.penalty = self._strike(audit, self._check_of(audit))
        self._maybe_reference(audit)
        return ruling

    def _check_of(self, audit: Audit) -> str:
        """The check most failed verdicts named (the first such)."""
        checks = [v.failed_check for v in audit.verdicts
                  if not v.passed and v.failed_check != "verifier_error"]  # fmt: skip
        return max(checks, key=checks.count) if checks else "unknown"

    # -- the coordinator's own findings ---------------------------------------------------------

    def convict(
        self,
        lease_id: str,
        run_id: str,
        producer: str,
        payload_hash: bytes,
        judge: str,
        check: str,
        detail: str,
        evidence: bytes,
        current_version: int = 0,
        max_staleness: int = 0,
    ) -> Ruling:
        """A failure the coordinator saw itself (``judge``, its peer id): the producer's own
        signed payload contradicts its receipt, so no verifier needs to confirm it. Recorded as
        a failed audit, with the payload as evidence, and a known cheat; open audits of the
        lease are dropped, and a verifier that passed the payload is marked outvoted."""
        ruling = Ruling("confirmed_failure", decision="failed")
        for a in [a for a in self.audits.values() if a.lease_id == lease_id and not a.known_answer]:
            self.references["pass"].pop(a.audit_id, None)  # its passes were wrong
            for v in a.verdicts:
                if v.passed and not self.banned(v.verifier):
                    self._outvoted(v.verifier, a.audit_id, ruling)
        self.cancel_for({lease_id})
        now = self.clock()
        audit = Audit(uuid.uuid4().hex, lease_id, run_id, producer, payload_hash, now,
                      stage="confirm", status="failed", verifier=judge,
                      current_version=current_version, max_staleness=max_staleness,
                      decided_at=now)  # fmt: skip
        audit.verdicts.append(VerdictRecord(judge, False, check, detail, evidence, now))
        self.audits[audit.audit_id] = audit
        self.keep(audit)
        self._maybe_reference(audit)
        ruling.audit, ruling.penalty = audit, self._strike(audit, check)
        return ruling

    def cancel_for(self, lease_ids: set[str]) -> None:
        """Drop open audits of quarantined leases: their work is redone anyway."""
        for audit in [a for a in self.open.values() if a.lease_id in lease_ids]:
            audit.status = "cancelled"
            del self.open[audit.audit_id]
            self.assigned.pop(audit.audit_id, None)

    # -- penalties ------------------------------------------------------------------------------

    def _strike(self, audit: Audit, check: str) -> Penalty:
        trust = self.trust_of(audit.producer)
        trust.failed += 1
        trust.clean_streak = 0
        return Penalty(audit.producer, audit.lease_id, check, self.strike(audit.producer))

    def strike(self, node: str) -> bool:
        """A strike against a node caught lying (a producer's failed audit, a trainer's false
        report); True if that bans it (``max_strikes``)."""
        trust = self.trust_of(node)
        trust.strikes += 1
        trust.banned = trust.banned or trust.strikes >= self.config.max_strikes
        return trust.banned

    def _outvoted(self, verifier: str, audit_id: str, ruling: Ruling) -> None:
        trust = self.trust_of(verifier)
        trust.outvoted += 1
        if trust.outvoted % self.config.minority_per_strike == 0:
            self._verifier_strike(verifier, audit_id, "outvoted", ruling)

    def _verifier_strike(self, verifier: str, audit_id: str, reason: str, ruling: Ruling) -> None:
        trust = self.trust_of(verifier)
        trust.verifier_strikes += 1
        newly = not trust.banned and trust.verifier_strikes >= self.config.max_verifier_strikes
        trust.banned = trust.banned or newly
        ruling.struck.append(VerifierPenalty(verifier, audit_id, reason, trust.banned))
        if newly:
            ruling.reopened.extend(self._reopen(verifier))

    def _reopen(self, verifier: str) -> list[Audit]:
        """The passes a verifier banned now decided within the quarantine window, open again:
        without its verdict they are not decided. References it vouched for are dropped."""
        since = self.clock() - self.config.quarantine_window_s
        out = []
        for audit in list(self.audits.values()):
            if (
                audit.known_answer
                or audit.status not in ("passed", "cleared")
                or (audit.decided_at or 0.0) < since
                or verifier not in audit.seen_by()
            ):
                continue
            for refs in self.references.values():
                refs.pop(audit.audit_id, None)
            p, f = self._counted(audit)
            if p > f and p >= 1 and (f == 0 or p >= 2):
                continue  # still decided without it
            audit.status, audit.stage, audit.verifier, audit.quorum = "pending", "confirm", "", 1
            producer = self.trust_of(audit.producer)
            producer.passed = max(0, producer.passed - 1)  # counted again when decided again
            self.open[audit.audit_id] = audit
            out.append(audit)
        return out

    # -- references -----------------------------------------------------------------------------

    def _maybe_reference(self, audit: Audit) -> None:
        """Keep a decided audit as a known answer if its verdict is settled beyond doubt."""
        if audit.known_answer or audit.status not in DECIDED:
            return
        passes = [v for v in audit.verdicts if v.passed and not self.banned(v.verifier)]
        fails = [v for v in audit.verdicts if not v.passed and not self.banned(v.verifier)
                 and v.failed_check not in ("verifier_error", *FETCH_CHECKS)]  # fmt: skip
        convicted = len(audit.verdicts) == 1 and audit.verdicts[0].verifier == audit.verifier
        if (
            audit.status == "passed"
            and len({v.verifier for v in passes}) >= 2
            and not any(not v.passed and v.failed_check != "verifier_error" for v in audit.verdicts)
        ):
            answer = "pass"
        elif (
            audit.status == "failed"
            and not passes
            and (len({v.verifier for v in fails}) >= 2 or (convicted and fails))
        ):
            answer = "fail"
        else:
            return
        refs = self.references[answer]
        refs[audit.audit_id] = audit
        while len(refs) > self.config.max_references:
            del refs[next(iter(refs))]

    def reference_hashes(self) -> set[bytes]:
        """The payloads of every known answer kept (to pin in the payload store)."""
        return {a.payload_hash for refs in self.references.values() for a in refs.values()}
