"""Audit rules on a controlled clock and random source: adaptive sampling, who may verify what,
confirmation by a second verifier, deadlines, and the penalty ladder up to a ban."""

from __future__ import annotations

import random

from coordinator.audits import AuditBook
from coordinator.config import AuditConfig
from protocol.verification import Verdict

H = bytes(32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verdict(audit_id: str, lease_id: str, passed: bool, check: str = "") -> Verdict:
    return Verdict(
        audit_id=audit_id, lease_id=lease_id, producer="12D3KooWprod", payload_hash=H,
        passed=passed, failed_check=check,
    )  # fmt: skip


def book(**config: float) -> tuple[AuditBook, Clock]:
    clock = Clock()
    return AuditBook(AuditConfig(**config), clock, random.Random(0)), clock  # type: ignore[arg-type]


def test_new_producers_are_always_audited_then_at_the_floor_rate() -> None:
    b, _ = book(trusted_after=3, floor_rate=0.1)
    for i in range(3):
        audit = b.on_counted(f"l{i}", "r", "p", H)
        assert audit is not None  # every receipt while the producer is new
        assert b.assign("v") is audit
        assert b.verdict("v", verdict(audit.audit_id, f"l{i}", True), b"f")[0] == "recorded"
    assert b.rate("p") == 0.1
    audited = sum(b.on_counted(f"m{i}", "r", "p", H) is not None for i in range(2000))
    assert 140 < audited < 260  # ~10 %
    # a run's own floor (its spec's verification.audit_floor) overrides the coordinator's
    assert b.rate("p", 0.5) == 0.5
    audited = sum(b.on_counted(f"n{i}", "r", "p", H, 0.5) is not None for i in range(2000))
    assert 900 < audited < 1100
    b.trust["q"] = type(b.trust_of("p"))("q")  # a new producer: audited every time regardless
    assert b.rate("q", 0.0) == 1.0


def test_a_verifier_never_checks_its_own_work_nor_confirms_its_own_verdict() -> None:
    b, _ = book()
    audit = b.on_counted("l", "r", "p", H)
    assert audit is not None
    assert b.assign("p") is None  # the producer
    assert b.assign("v1") is audit
    outcome, penalty = b.verdict("v1", verdict(audit.audit_id, "l", False, "logprobs"), b"f1")
    assert (outcome, penalty) == ("confirming", None) and audit.stage == "confirm"
    assert b.trust_of("p").strikes == 0  # one failed verdict is not a penalty
    assert b.assign("v1") is None  # not a second look by the same verifier
    assert b.assign("v2") is audit


def test_a_confirmed_failure_strikes_and_the_last_strike_bans() -> None:
    b, _ = book(max_strikes=2)
    for i, banned in ((0, False), (1, True)):
        audit = b.on_counted(f"l{i}", "r", "p", H)
        assert audit is not None and b.assign("v1") is audit
        b.verdict("v1", verdict(audit.audit_id, f"l{i}", False, "seed"), b"f")
        assert b.assign("v2") is audit
        outcome, penalty = b.verdict("v2", verdict(audit.audit_id, f"l{i}", False, "seed"), b"f")
        assert outcome == "confirmed_failure" and penalty is not None
        assert penalty.failed_check == "seed" and penalty.banned is banned
    trust = b.trust_of("p")
    assert trust.strikes == 2 and trust.banned and trust.reputation < 0.2
    assert trust.clean_streak == 0


def test_a_second_verifier_that_disagrees_clears_the_producer() -> None:
    b, _ = book()
    audit = b.on_counted("l", "r", "p", H)
    assert audit is not None and b.assign("v1") is audit
    b.verdict("v1", verdict(audit.audit_id, "l", False, "logprobs"), b"f")
    assert b.assign("v2") is audit
    assert b.verdict("v2", verdict(audit.audit_id, "l", True), b"f") == ("cleared", None)
    assert b.trust_of("p").strikes == 0


def test_late_wrong_and_unknown_verdicts_change_nothing() -> None:
    b, clock = book(deadline_s=10)
    audit = b.on_counted("l", "r", "p", H)
    assert audit is not None and b.assign("v1") is audit
    clock.now += 11  # v1 missed its deadline: the audit goes to someone else
    assert b.assign("v2") is audit
    assert b.verdict("v1", verdict(audit.audit_id, "l", False, "x"), b"f")[0] == "wrong_verifier"
    assert b.verdict("v2", verdict("nope", "l", True), b"f")[0] == "unknown_audit"
    assert b.verdict("v2", verdict(audit.audit_id, "other", True), b"f")[0] == "unknown_audit"
    # a verifier that could not run the checks hands the audit on, no harm to the producer
    assert b.verdict("v2", verdict(audit.audit_id, "l", False, "verifier_error"), b"f")[0] == (
        "reassigned"
    )
    assert audit.status == "pending" and b.trust_of("p").strikes == 0
    assert b.assign("v2") is None and b.assign("v3") is audit
