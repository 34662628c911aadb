"""Audit rules on a controlled clock and random source: adaptive sampling, who may verify what,
decision by majority, double-checks, known-answer audits and their scoring, verifier strikes and
bans, pay only for decided, agreeing verdicts, deadlines and the penalty ladder up to a ban; and
the audit handlers over a real database, paying and forfeiting in the ledger."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from coordinator.audits import AuditBook, Ruling
from coordinator.billing import NETWORK
from coordinator.config import AuditConfig
from coordinator.db import Audit, LeaseState, Trust
from protocol.verification import AuditAssignment, AuditRequest, NoAudit, Verdict
from tests.wait import await_until

H = bytes(32)
REAL = {"known_answer_rate": 0.0, "verifier_trusted_after": 0, "double_check_rate": 0.0}
"""Settings under which every assignment is the real audit (no known answers, no
double-checks): the tests of one rule turn on only what they test."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verdict(audit: Audit, passed: bool, check: str = "") -> Verdict:
    return Verdict(
        audit_id=audit.audit_id, lease_id=audit.lease_id, producer=audit.producer,
        payload_hash=audit.payload_hash, passed=passed, failed_check=check,
    )  # fmt: skip


def book(**config: float) -> tuple[AuditBook, Clock]:
    clock = Clock()
    settings = {**REAL, **config}
    return AuditBook(AuditConfig(**settings), clock, random.Random(0)), clock  # type: ignore[arg-type]


def counted(b: AuditBook, lease: str, producer: str = "p") -> Audit:
    audit = b.on_counted(lease, "r", producer, lease.encode().ljust(32, b"."))
    assert audit is not None
    return audit


def judge(b: AuditBook, verifier: str, audit: Audit, passed: bool, check: str = "") -> Ruling:
    """``verifier`` takes ``audit`` (it must be the one it is given) and answers."""
    assert b.assign(verifier) is audit
    return b.verdict(
        verifier, verdict(audit, passed, check or ("" if passed else "logprobs")), b"f"
    )


def test_new_producers_are_always_audited_then_at_the_floor_rate() -> None:
    b, _ = book(trusted_after=3, floor_rate=0.1)
    for i in range(3):
        assert judge(b, "v", counted(b, f"l{i}"), True).outcome == "recorded"
    assert b.rate("p") == 0.1
    audited = sum(b.on_counted(f"m{i}", "r", "p", H) is not None for i in range(2000))
    assert 140 < audited < 260  # ~10 %
    # a run's own floor (its spec's verification.audit_floor) overrides the coordinator's
    assert b.rate("p", 0.5) == 0.5
    audited = sum(b.on_counted(f"n{i}", "r", "p", H, 0.5) is not None for i in range(2000))
    assert 900 < audited < 1100
    b.trust["q"] = Trust("q")  # a new producer: audited every time regardless
    assert b.rate("q", 0.0) == 1.0


def test_the_default_rates_keep_honest_auditing_under_five_percent_of_compute() -> None:
    config = AuditConfig()
    assert config.steady_state_cost() <= 0.05
    assert config.steady_state_cost() > config.floor_rate  # double-checks and known answers count


def test_a_verifier_never_checks_its_own_work_nor_confirms_its_own_verdict() -> None:
    b, _ = book()
    audit = counted(b, "l")
    assert b.assign("p") is None  # the producer
    ruling = judge(b, "v1", audit, False)
    assert (ruling.outcome, ruling.penalty, ruling.paid) == ("confirming", None, [])
    assert audit.stage == "confirm" and audit.status == "pending"
    assert b.trust_of("p").strikes == 0  # one failed verdict is not a penalty
    assert b.assign("v1") is None  # not a second look by the same verifier
    assert b.assign("v2") is audit


def test_audits_wait_for_a_verifier_that_replays_their_device_class_exactly() -> None:
    """A payload made on a device class that an asking verifier generates on bit for bit goes
    to that verifier; another takes it only once no such verifier has asked for
    ``exact_hold_s`` — and an audit of no declared class goes to anyone."""
    b, clock = book(exact_hold_s=30.0)
    assert b.assign("exact", device="cpu:AVX512") is None  # it asks: now known to be there
    made = b.on_counted("l0", "r", "p", H, None, "bf16", "cpu:AVX512")
    plain = b.on_counted("l1", "r", "p", H, None, "bf16", "")
    assert made is not None and plain is not None
    assert b.assign("other", device="cpu:AVX2") is plain  # the held one is passed over
    assert b.assign("gpu") is None
    assert b.assign("exact", device="cpu:AVX512") is made
    later = b.on_counted("l2", "r", "p", H, None, "bf16", "cpu:AVX512")
    assert later is not None
    clock.now += 31  # no verifier of that class has asked since: anyone may take it
    assert b.assign("other", device="cpu:AVX2") is later


def test_further_looks_go_first_then_producers_take_turns() -> None:
    """A new producer's backlog (every receipt audited) does not hold up another's audits."""
    b, clock = book()
    backlog = [counted(b, f"p{i}", "p") for i in range(3)]
    newer = counted(b, "c0", "c")
    assert b.assign("v1") is backlog[0]
    clock.now += 1
    assert b.assign("v2") is newer  # p was served last: c's turn, though its audit is newer
    clock.now += 1
    assert b.assign("v3") is backlog[1]
    b.verdict("v1", verdict(backlog[0], False, "logprobs"), b"f")
    assert b.assign("v4") is backlog[0]  # a confirmation goes before any first look


def test_a_first_pass_decides_alone_and_is_paid_then() -> None:
    b, _ = book()
    audit = counted(b, "l")
    ruling = judge(b, "v1", audit, True)
    assert (ruling.outcome, ruling.decision, ruling.paid) == ("recorded", "passed", ["v1"])
    assert audit.status == "passed" and b.trust_of("p").passed == 1
    assert b.trust_of("v1").agreed == 1


def test_failures_are_decided_by_majority_and_a_single_later_pass_never_clears() -> None:
    b, _ = book()
    # failed, then passed: split, so a third verifier decides (2 of 3)
    audit = counted(b, "l")
    judge(b, "v1", audit, False)
    split = judge(b, "v2", audit, True)
    assert (split.outcome, split.decision, split.paid) == ("confirming", "", [])
    assert audit.status == "pending" and b.trust_of("p").strikes == 0
    cleared = judge(b, "v3", audit, True)
    assert (cleared.outcome, cleared.decision) == ("cleared", "passed")
    assert audit.status == "cleared" and cleared.penalty is None
    assert sorted(cleared.paid) == ["v2", "v3"]  # v1 was outvoted: unpaid, and marked
    assert b.trust_of("v1").outvoted == 1 and b.trust_of("v2").outvoted == 0
    # failed, passed, failed: the failure stands, the lone pass is outvoted
    other = counted(b, "m")
    judge(b, "v1", other, False)
    judge(b, "v2", other, True)
    failed = judge(b, "v3", other, False, "seed")
    assert (failed.outcome, failed.decision) == ("confirmed_failure", "failed")
    assert failed.penalty is not None and failed.penalty.failed_check in ("logprobs", "seed")
    assert sorted(failed.paid) == ["v1", "v3"] and b.trust_of("v2").outvoted == 1
    # two failures: decided at once
    third = counted(b, "n")
    judge(b, "v1", third, False)
    both = judge(b, "v2", third, False)
    assert both.outcome == "confirmed_failure" and sorted(both.paid) == ["v1", "v2"]


def test_a_confirmed_failure_strikes_and_the_last_strike_bans() -> None:
    b, _ = book(max_strikes=2)
    for i, banned in ((0, False), (1, True)):
        audit = counted(b, f"l{i}")
        judge(b, "v1", audit, False, "seed")
        ruling = judge(b, "v2", audit, False, "seed")
        assert ruling.outcome == "confirmed_failure" and ruling.penalty is not None
        assert ruling.penalty.failed_check == "seed" and ruling.penalty.banned is banned
    trust = b.trust_of("p")
    assert trust.strikes == 2 and trust.banned and trust.reputation < 0.2
    assert trust.clean_streak == 0


def test_a_double_check_waits_for_a_second_pass_and_makes_a_known_honest_payload() -> None:
    b, _ = book(double_check_rate=1.0)
    alone = counted(b, "alone")
    # no other verifier asks for work: nobody to double-check, the pass decides alone
    assert judge(b, "v1", alone, True).decision == "passed"
    audit = counted(b, "l")
    assert b.assign("v2") is audit  # v2 asks (and gives it back): a second verifier is there
    release(b, audit)
    first = judge(b, "v1", audit, True)
    # acknowledged as any pass, but not decided: nobody is paid yet
    assert (first.outcome, first.decision, first.paid) == ("recorded", "", [])
    assert audit.status == "pending" and audit.quorum == 2
    second = judge(b, "v2", audit, True)
    assert (second.decision, sorted(second.paid)) == ("passed", ["v1", "v2"])
    assert list(b.references["pass"]) == [audit.audit_id]
    assert b.reference_hashes() == {audit.payload_hash}


def test_no_pay_for_hand_ons_nor_before_the_decision() -> None:
    b, clock = book(deadline_s=10)
    audit = counted(b, "l")
    assert b.assign("v1") is audit
    clock.now += 11  # v1 missed its deadline: the audit goes to someone else
    assert b.assign("v2") is audit
    assert b.verdict("v1", verdict(audit, False, "x"), b"f").outcome == "wrong_verifier"
    assert b.verdict("v2", Verdict(audit_id="nope", lease_id="l", producer="p", payload_hash=H,
                                   passed=True), b"f").outcome == "unknown_audit"  # fmt: skip
    # a verifier that could not run the checks hands the audit on: no harm, no pay
    handed = b.verdict("v2", verdict(audit, False, "verifier_error"), b"f")
    assert (handed.outcome, handed.paid) == ("reassigned", [])
    assert audit.status == "pending" and b.trust_of("p").strikes == 0
    assert b.assign("v2") is None and b.assign("v3") is audit
    first = b.verdict("v3", verdict(audit, False, "logprobs"), b"f")
    assert first.paid == []  # a failure is paid only once confirmed
    second = judge(b, "v4", audit, False)
    assert sorted(second.paid) == ["v3", "v4"]  # v2's hand-on earns nothing


def known_pair(b: AuditBook) -> tuple[Audit, Audit]:
    """A known-honest payload (two passes, by h1 and h2) and a known cheat (two failures):
    call it first, while no other audit is open."""
    cheat = counted(b, "cheat", "c")
    for verifier in ("h1", "h2"):
        judge(b, verifier, cheat, False)
    honest = counted(b, "honest", "p")
    b.config = b.config.model_copy(update={"double_check_rate": 1.0})
    for verifier in ("h1", "h2"):
        judge(b, verifier, honest, True)
    b.config = b.config.model_copy(update={"double_check_rate": 0.0})
    assert [list(r) for r in b.references.values()] == [[honest.audit_id], [cheat.audit_id]]
    return honest, cheat


def test_new_verifiers_get_known_answers_blind_in_place_of_real_audits() -> None:
    b, _ = book(verifier_trusted_after=2)
    honest, cheat = known_pair(b)
    assert b.assign("new") is None  # no real audit it could take: no known answer either
    real = counted(b, "real", "p")
    handed = {}
    for _ in range(2):
        a = b.assign("new")
        assert a is not None and a.known_answer and a is not real
        ref = honest if a.known_answer == "pass" else cheat
        # blind: a fresh id, and the original's lease, producer, payload and versions
        assert a.audit_id not in (honest.audit_id, cheat.audit_id, real.audit_id)
        assert (a.lease_id, a.producer, a.payload_hash, a.reference) == (
            ref.lease_id, ref.producer, ref.payload_hash, ref.audit_id)  # fmt: skip
        assert (a.current_version, a.max_staleness) == (ref.current_version, ref.max_staleness)
        handed[a.known_answer] = a
        b.verdict("new", verdict(a, a.known_answer == "pass"), b"f")
    assert set(handed) == {"pass", "fail"}  # each reference once: never one it was handed
    assert not b.on_probation("new") and b.trust_of("new").known_right == 2
    assert b.assign("new") is real  # past probation, at a rate of 0 here: the real audit
    release(b, real)
    # never a reference to a verifier that judged it, nor to its producer
    assert b.assign("h1") is real
    release(b, real)
    a = b.assign("c")
    assert a is not None and a.known_answer == "pass"  # not its own cheat
    # and none whose payload the coordinator does not hold
    assert b.assign("fresh", can_serve=lambda digest: False) is real


def release(b: AuditBook, audit: Audit) -> None:
    """Take an assigned audit back (as its deadline passing would)."""
    b.assigned.pop(audit.audit_id)
    audit.status, audit.verifier = "pending", ""


def test_trusted_verifiers_get_known_answers_at_the_configured_rate() -> None:
    b, _ = book(known_answer_rate=0.25)
    for i in range(400):
        ref = counted(b, f"ref{i}", "p")
        b.references["pass"][ref.audit_id] = ref
        b.open.pop(ref.audit_id)
    real = counted(b, "real", "p")
    known = 0
    for i in range(400):
        a = b.assign(f"v{i}")
        assert a is not None
        known += bool(a.known_answer)
        real.status, real.verifier = "pending", ""
        b.assigned.clear()
    assert 70 < known < 130  # ~25 %


def test_known_answers_are_scored_and_acknowledged_as_real_first_looks() -> None:
    b, _ = book(verifier_trusted_after=1, max_verifier_strikes=2)
    honest, cheat = known_pair(b)
    counted(b, "real", "p")

    def known(verifier: str, answer: str) -> Audit:
        a = b.assign(verifier)
        while a is not None and a.known_answer != answer:  # the draw picked the other kind
            a.status = "cancelled"
            b.assigned.pop(a.audit_id)
            b.handed[a.lease_id].discard(verifier)
            a = b.assign(verifier)
        assert a is not None
        return a

    # right: paid like a real check; wrong: a strike, and the ack a real look would get
    right = b.verdict("good", verdict(known("good", "fail"), False, "logprobs"), b"f")
    assert (right.outcome, right.paid, right.struck) == ("confirming", ["good"], [])
    wrong = b.verdict("lazy", verdict(known("lazy", "fail"), True), b"f")
    assert (wrong.outcome, wrong.paid) == ("recorded", [])
    assert [(s.verifier, s.reason, s.banned) for s in wrong.struck] == [
        ("lazy", "known_answer", False)
    ]
    assert wrong.audit is not None and wrong.audit.status == "wrong"
    # no answer (unavailable, verifier_error) is neither right nor wrong
    none = b.verdict("lazy", verdict(known("lazy", "pass"), False, "unavailable"), b"f")
    assert (none.paid, none.struck) == ([], []) and none.audit is not None
    assert none.audit.status == "cancelled"
    # a producer whose payloads are known answers is never touched by them
    assert b.trust_of("p").strikes == 0 and b.trust_of("c").strikes == 1
    assert (honest.status, cheat.status) == ("passed", "failed")
    t = b.trust_of("lazy")
    assert (t.known_wrong, t.verifier_strikes, t.banned) == (1, 1, False)
    assert t.verifier_reputation < b.trust_of("good").verifier_reputation


def test_repeat_offenders_are_banned_and_the_passes_they_decided_alone_reopen() -> None:
    b, clock = book(max_verifier_strikes=1)
    _, cheat = known_pair(b)
    b.references["pass"].clear()
    covered = counted(b, "covered", "c")
    assert judge(b, "liar", covered, True).decision == "passed"  # the liar decided alone
    shared = counted(b, "shared", "p")
    judge(b, "liar", shared, False)  # an open audit only the liar failed
    spare = counted(b, "spare", "p")  # a real audit the known answer is given in place of
    b.config = b.config.model_copy(update={"known_answer_rate": 1.0})
    a = b.assign("liar")
    assert a is not None and a.reference == cheat.audit_id
    ruling = b.verdict("liar", verdict(a, True), b"f")  # passes a known cheat
    assert [s.banned for s in ruling.struck] == [True] and b.banned("liar")
    assert ruling.reopened == [covered] and covered.status == "pending"
    assert b.assign("liar") is None  # banned: no audits
    # its word counts for nothing: the audit only it failed is decided by the next pass alone,
    # and the pass it decided alone needs an honest look (here: the payload was a cheat)
    b.config = b.config.model_copy(update={"known_answer_rate": 0.0})
    b.cancel_for({spare.lease_id})
    assert judge(b, "h1", shared, True).decision == "passed"
    assert judge(b, "h1", covered, False).outcome == "confirming"
    assert judge(b, "h2", covered, False).decision == "failed"
    assert b.trust_of("p").strikes == 0
    # a pass older than the quarantine window stays decided
    old = counted(b, "old", "c")
    judge(b, "liar2", old, True)
    clock.now += b.config.quarantine_window_s + 1
    counted(b, "later", "p")
    b.config = b.config.model_copy(update={"known_answer_rate": 1.0})
    a = b.assign("liar2")
    assert a is not None and a.known_answer == "fail"
    assert b.verdict("liar2", verdict(a, True), b"f").reopened == []


def test_outvoted_verdicts_mark_a_verifier_and_enough_marks_strike() -> None:
    b, _ = book(minority_per_strike=2, max_verifier_strikes=1)
    struck = []
    for i in range(2):
        audit = counted(b, f"l{i}")
        judge(b, "contrarian", audit, False)
        judge(b, "h1", audit, True)
        struck += judge(b, "h2", audit, True).struck
    assert b.trust_of("contrarian").outvoted == 2
    assert [(s.verifier, s.reason, s.banned) for s in struck] == [("contrarian", "outvoted", True)]
    assert b.trust_of("h1").outvoted == b.trust_of("h1").verifier_strikes == 0
    # an outvoted "unavailable" is no mark: the producer may have been out of its reach
    audit = counted(b, "l9")
    judge(b, "h3", audit, False, "unavailable")
    judge(b, "h1", audit, True)
    judge(b, "h2", audit, True)
    assert b.trust_of("h3").outvoted == 0


def test_the_coordinators_conviction_is_a_known_cheat_and_marks_who_passed_it() -> None:
    b, _ = book()
    audit = counted(b, "l", "c")
    assert judge(b, "freeloader", audit, True).decision == "passed"
    ruling = b.convict("l", "r", "c", audit.payload_hash, "coordinator", "token_count",
                       "receipt claims 10, payload holds 8", b"evidence", 3, 1)  # fmt: skip
    assert ruling.penalty is not None and ruling.penalty.failed_check == "token_count"
    assert b.trust_of("freeloader").outvoted == 1
    (ref,) = b.references["fail"].values()
    assert (ref.lease_id, ref.current_version, ref.max_staleness) == ("l", 3, 1)


def test_restore_rebuilds_references_and_drops_known_answers_in_flight() -> None:
    b, _ = book(verifier_trusted_after=5)
    honest, cheat = known_pair(b)
    counted(b, "real", "p")
    in_flight = b.assign("new")
    assert in_flight is not None and in_flight.known_answer
    again, _ = book(verifier_trusted_after=5)
    again.restore(b.trust.values(), b.audits.values())
    assert in_flight.status == "cancelled" and in_flight.audit_id not in again.assigned
    assert {a for refs in again.references.values() for a in refs} == {
        honest.audit_id, cheat.audit_id}  # fmt: skip
    # the restored book still never hands "new" the lease it was handed
    a = again.assign("new")
    assert a is not None and a.lease_id != in_flight.lease_id


def test_an_expired_known_answer_is_dropped_not_requeued() -> None:
    b, clock = book(verifier_trusted_after=1, deadline_s=10)
    known_pair(b)
    real = counted(b, "real", "p")
    a = b.assign("new")
    assert a is not None and a.known_answer
    clock.now += 11
    assert b.expire() == [] and a.status == "cancelled"
    assert b.verdict("new", verdict(a, True), b"f").outcome == "wrong_verifier"
    assert real.status == "pending"


def test_the_handlers_pay_on_decision_and_forfeit_on_a_wrong_known_answer(tmp_path: Path) -> None:
    """Over a real database: the ledger credits verifiers when an audit is decided, only
    those who agreed, and takes a lying verifier's credit of the window back to the network;
    the known cheat is served from the coordinator's payload store, pinned there."""
    from protocol.payload_store import PayloadStore
    from protocol.runs import RunSpec
    from tests.unit.test_rounds import STREAM, deliver
    from tests.unit.work import Work

    svc = Work.open(f"sqlite:///{tmp_path / 'c.db'}")
    state = svc.state
    state.audits.config = AuditConfig(**{**REAL, "max_verifier_strikes": 1})  # type: ignore[arg-type]
    store = svc.auditing.payloads = PayloadStore(tmp_path / "payloads")
    ask = AuditRequest(base_model="tiny")

    async def answer(verifier: str, passed: bool) -> str:
        job = await svc.auditing.request(verifier, ask, lambda p: [f"/ip4/127.0.0.1/tcp/1/p2p/{p}"])
        assert isinstance(job, AuditAssignment)
        assert job.completion_tokens == 100  # the receipt's claim, for the verifier to count
        assert job.producer_addrs == [f"/ip4/127.0.0.1/tcp/1/p2p/{job.producer}"]
        v = Verdict(audit_id=job.audit_id, lease_id=job.lease.lease_id, producer=job.producer,
                    payload_hash=job.payload_hash, passed=passed,
                    failed_check="" if passed else "logprobs")  # fmt: skip
        return (await svc.auditing.verdict(verifier, v, b"frame")).outcome

    def balance(verifier: str) -> int:
        return state.billing.balances().get(f"node:{verifier}", 0)

    def audited(producer: str, kept: bool = True) -> str:
        """A new rollout of ``producer``, counted and drawn for an audit."""
        lease_id = deliver(state.book, producer)
        s = state.book.leases[lease_id]
        assert state.audits.on_counted(lease_id, s.run_id, producer, s.payload_hash or b"")
        s.audit = "pending"
        if kept:  # the coordinator's copy of the payload (``receipt_for`` hashes the lease id)
            store.put(lease_id.encode())
        return lease_id

    async def from_producer(lease: LeaseState) -> bytes:
        """The producer's payload frame (here: what hashes to its receipt's digest)."""
        return lease.lease_id.encode()

    async def main() -> None:
        await svc.runs.create(RunSpec(name="r1"))
        state.book.runs["r1"].plan = STREAM
        cheat, honest = audited("cheat", kept=False), audited("honest")
        assert await answer("v1", False) == "confirming"
        assert balance("v1") == 0  # not decided yet
        assert await answer("v2", False) == "confirmed_failure"
        assert balance("v1") == balance("v2") == 100
        assert state.book.leases[cheat].audit == "failed"
        # a known cheat, rejected before the coordinator's own count fetched it: fetched now,
        # kept and pinned
        known = state.book.leases[cheat].payload_hash
        assert store.pinned == {known} and known not in store
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.auditing.keep_references, from_producer)
            await await_until(lambda: known in store)
            nursery.cancel_scope.cancel()
        assert await answer("v3", True) == "recorded"  # the honest one, decided alone
        assert balance("v3") == 100 and state.book.leases[honest].audit == "passed"
        # v3 passes the known cheat (given in place of a new real audit): struck, banned, its
        # credit of the window back to the network, and the pass it decided alone reopened
        audited("honest")
        state.audits.config = state.audits.config.model_copy(update={"known_answer_rate": 0.99})
        assert await answer("v3", True) == "recorded"  # acknowledged as any pass
        assert balance("v3") == 0 and state.audits.banned("v3")
        t = state.audits.trust_of("v3")
        assert (t.verified_tokens, t.verified_forfeited_tokens, t.known_wrong) == (0, 100, 1)
        assert state.billing.balances()[NETWORK] == -200  # v1's and v2's pay stands
        assert sum(state.billing.balances().values()) == 0
        assert state.book.leases[honest].audit == "pending"
        audited("honest")
        assert isinstance(await svc.auditing.request("v3", ask, lambda p: []), NoAudit)  # banned
        assert isinstance(await svc.auditing.request("v1", ask, lambda p: []), AuditAssignment)

    trio.run(main)


def known_honest(b: AuditBook, lease: str, producer: str = "p") -> Audit:
    """A known-honest reference of the producer's work: two passes of a double-check."""
    audit = counted(b, lease, producer)
    audit.quorum = 2
    judge(b, "h1", audit, True)
    assert judge(b, "h2", audit, True).decision == "passed"
    assert audit.audit_id in b.references["pass"]
    return audit


def test_colluders_framing_a_producer_fail_its_honest_work_and_decide_nothing() -> None:
    """Two verifiers that fail every payload of one producer (and answer everything else
    right): a failure of theirs waits until each answered a known-honest payload of that
    producer, sent blind at once; they fail it — struck, and their failures of it no longer
    count — and an honest pass decides the audit. The producer is never penalized."""
    b, _ = book()
    known_honest(b, "ref-1")
    known_honest(b, "ref-2")
    audit = counted(b, "l")
    held = judge(b, "c1", audit, False)
    assert (held.outcome, held.decision) == ("confirming", "")
    assert judge(b, "c2", audit, False).decision == ""  # two failures, but neither vouched
    for colluder in ("c1", "c2"):
        test = b.assign(colluder)
        assert test is not None and test.known_answer == "pass" and test.producer == "p"
        wrong = b.verdict(colluder, verdict(test, False, "logprobs"), b"f")
        assert wrong.struck and wrong.followups == []  # no decision on their word
        assert b.trust_of(colluder).verifier_strikes == 1
    assert audit.status == "pending"
    cleared = judge(b, "h1", audit, True)  # the honest look: their failures count for nothing
    assert cleared.decision == "passed" and cleared.penalty is None
    assert b.trust_of("p").strikes == 0
    assert b.trust_of("c1").outvoted == 1 and b.trust_of("c2").outvoted == 1


def test_honest_verifiers_vouch_once_then_their_failures_decide() -> None:
    """A producer with known-honest work starts cheating: each honest verifier that fails it
    first answers one of its honest payloads right, and the failure is then decided."""
    b, _ = book()
    known_honest(b, "ref-1")
    known_honest(b, "ref-2")
    audit = counted(b, "l")
    assert judge(b, "v1", audit, False).decision == ""
    test = b.assign("v1")
    assert test is not None and test.known_answer == "pass"
    right = b.verdict("v1", verdict(test, True), b"f")
    assert right.followups == [] and audit.status == "pending"  # one failure: not enough
    assert judge(b, "v2", audit, False).decision == ""
    test = b.assign("v2")
    assert test is not None and test.known_answer == "pass" and test.lease_id != "l"
    done = b.verdict("v2", verdict(test, True), b"f")
    (decided,) = done.followups
    assert decided.decision == "failed" and decided.penalty is not None
    assert sorted(decided.paid) == ["v1", "v2"]
    # vouched for now: their next failures of it count at once
    again = counted(b, "m")
    judge(b, "v1", again, False)
    assert judge(b, "v2", again, False).decision == "failed"


def test_a_producer_without_known_honest_work_is_decided_as_before() -> None:
    b, _ = book()
    audit = counted(b, "l", producer="new")
    judge(b, "v1", audit, False)
    assert judge(b, "v2", audit, False).decision == "failed"


def test_a_reference_the_coordinator_cannot_serve_holds_no_failure() -> None:
    """Known-honest payloads the coordinator no longer holds cannot test a failing verifier:
    its failure counts as before, so the audit is decided instead of waiting for good."""
    b, _ = book()
    known_honest(b, "ref-1")
    assert b.assign("nobody", can_serve=lambda digest: False) is None  # what it can serve
    audit = counted(b, "l")
    assert b.assign("v1", can_serve=lambda digest: False) is audit
    b.verdict("v1", verdict(audit, False, "logprobs"), b"f")
    assert b.assign("v2", can_serve=lambda digest: False) is audit
    decided = b.verdict("v2", verdict(audit, False, "logprobs"), b"f")
    assert decided.decision == "failed"
