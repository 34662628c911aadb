"""The training checks (a committed part against a replay, a version against its parts) and the
replay book's rules: commitments, which rounds are replayed, what verdicts decide, how far a
run goes back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import trio

from coordinator.config import ReplayConfig
from coordinator.db import AdapterRow, Trust
from coordinator.replays import ReplayBook
from protocol.adapters import RoundCommitment, TrainAssignment, TrainRequest, committed_part
from protocol.verification import ReplayVerdict
from verification.training import check_part, check_sum

Q = 63


def honest(n: int = 20_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A part as error feedback makes it: ``q = clamp(round(g/s + r))`` with a carried residual
    ``r`` of at most half a level; returns ``(q, g, s)``."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.full((n,), 0.01)
    g = torch.randn(n, generator=gen) * 0.2
    r = torch.rand(n, generator=gen) - 0.5
    return torch.clamp(torch.round(g / s + r), -Q, Q), g, s


def test_an_honest_part_passes_and_each_cheat_fails_its_check() -> None:
    q, g, s = honest()
    ok = check_part(q, g, s, Q)
    assert ok.passed and 0.2 < ok.stats["mean_distance"] < 0.4
    wobble = g * (1 + 1e-6 * torch.randn(g.shape))  # another machine's last bits
    assert check_part(q, wobble, s, Q).passed
    assert check_part(torch.zeros_like(q), g, s, Q).check == "part_replay"  # skipped its steps
    scaled = torch.clamp(3 * q, -Q, Q)
    assert check_part(scaled, g, s, Q).check == "part_replay"
    # the rounding that suits it, everywhere: within the band, as an honest part whose carried
    # residuals all sit at half a level (the scale shrank) — bounded, not detectable
    biased = torch.clamp(torch.ceil(g / s), -Q, Q)
    assert check_part(biased, g, s, Q).passed
    shrunk = torch.clamp(torch.round(g / s + 0.4999), -Q, Q)  # every residual at the bound
    assert check_part(shrunk, g, s, Q).passed
    assert check_part(q * 1.5, g, s, Q).check == "part_range"
    assert check_part(q[:-1], g, s, Q).check == "part_shape"


def test_a_version_must_be_the_step_its_committed_parts_make() -> None:
    q1, _, s = honest(seed=1)
    q2, _, _ = honest(seed=2)
    start = torch.randn(q1.shape)
    made = start - 1.0 * ((q1 + q2) / 2 * s)
    assert check_sum(start, [q1, q2], s, 1.0, made).passed
    assert check_sum(start, [q2, q1], s, 1.0, made).passed  # order does not matter
    poisoned = made.clone()
    poisoned[:10] *= 10
    assert check_sum(start, [q1, q2], s, 1.0, poisoned).check == "version_sum"
    assert check_sum(start, [q1], s, 1.0, made).check == "version_sum"  # a part left out


class Book:
    def __init__(self, **config: float) -> None:
        self.trust: dict[str, Trust] = {}
        self.clock = 0.0
        self.book = ReplayBook(ReplayConfig(**config), lambda: self.clock, self.trust_of,
                               keep=lambda row: None, rng=random.Random(0))  # fmt: skip

    def trust_of(self, peer: str) -> Trust:
        return self.trust.setdefault(peer, Trust(peer))

    def commit(self, trainer: str, round_: int = 0, share: tuple[str, ...] = ("l1",)) -> bool:
        msg = RoundCommitment("r1", round_, bytes([len(trainer)]) * 32, list(share))
        return self.book.commit(trainer, msg, list(share), True).accepted

    def parts(self, trainers: list[str]) -> list[str]:
        """The parts ``commit`` makes, as a manifest names them."""
        return [committed_part(t, bytes([len(t)]) * 32) for t in trainers]

    def made(self, version: int, signers: list[str], parent: int = -1) -> AdapterRow:
        return AdapterRow(run_id="r1", version=version, manifest_hash="h", frame=b"m",
                          signers=signers, created_at=0.0, parent=version - 1)  # fmt: skip

    def verdict(self, verifier: str, audit_id: str, trainer: str, passed: bool,
                check: str = "part_replay") -> str:  # fmt: skip
        row = self.book.assign(verifier, lambda r: True)
        assert row is not None and row.audit_id == audit_id
        msg = ReplayVerdict(audit_id, trainer, passed, "" if passed else check)
        self.last = ruling = self.book.verdict(verifier, msg)
        return ruling.decision or ruling.outcome


def test_a_commitment_counts_only_for_the_trainers_own_share() -> None:
    b = Book()
    assert b.commit("t1", share=("l1", "l2"))
    msg = RoundCommitment("r1", 0, bytes(32), ["l1", "l9"])  # l9 was dealt to someone else
    assert not b.book.commit("t1", msg, ["l1", "l2"], True).accepted
    assert not b.book.commit("t2", msg, [], True).accepted  # not dealt any of the round
    assert not b.book.commit("t1", RoundCommitment("r1", 0, bytes(32), ["l1"]), ["l1"],
                             False).accepted  # the round made its version already  # fmt: skip
    assert b.book.committed("r1", 0, "t1") is not None


def test_new_trainers_are_replayed_every_round_then_at_the_rate() -> None:
    b = Book(trusted_after=2, rate=0.0, lone_rate=0.0)
    b.commit("t1")
    assert len(b.book.on_made(b.made(1, ["t1"]), -1, b.parts(["t1"]))) == 1
    b.trust_of("t1").replays_passed = 2
    b.commit("t1", 1)
    assert b.book.on_made(b.made(2, ["t1"]), 0, b.parts(["t1"])) == []  # trusted, and the rate is 0
    assert (
        b.book.on_made(b.made(3, ["t9"]), 1, b.parts(["t9"])) == []
    )  # never committed: nothing to replay


def test_a_pass_on_a_zero_part_earns_no_trust() -> None:
    """A round without learning signal leaves the part zero, and any cheat on zero is a no-op:
    passing its replay says nothing of the next round, so the trainer stays new."""
    b = Book(trusted_after=1, rate=0.0, lone_rate=0.0)
    zero = bytes([len("t1")]) * 32  # the part hash Book.commit gives t1
    b.book.empty_part = lambda digest: digest == zero
    b.commit("t1")
    (row,) = b.book.on_made(b.made(1, ["t1"]), -1, b.parts(["t1"]))
    assert b.verdict("v1", row.audit_id, "t1", True) == "passed"
    assert b.trust_of("t1").replays_passed == 0
    b.commit("t1", 1)
    (row,) = b.book.on_made(b.made(2, ["t1"]), 0, b.parts(["t1"]))  # still every round
    assert b.verdict("v1", row.audit_id, "t1", True) == "passed"
    b.book.empty_part = lambda digest: False
    b.commit("t1", 2)
    (row,) = b.book.on_made(b.made(3, ["t1"]), 1, b.parts(["t1"]))
    assert b.verdict("v1", row.audit_id, "t1", True) == "passed"
    assert b.trust_of("t1").replays_passed == 1


def test_one_pass_decides_two_failures_ban_and_a_split_goes_to_the_majority() -> None:
    b = Book()
    for t in ("good", "bad", "split"):
        b.commit(t)
    (good,) = b.book.on_made(b.made(1, ["good"]), -1, b.parts(["good"]))
    assert b.verdict("v1", good.audit_id, "good", True) == "passed"
    assert b.trust_of("good").replays_passed == 1
    (bad,) = b.book.on_made(b.made(1, ["bad"]), -1, b.parts(["bad"]))
    assert b.verdict("v1", bad.audit_id, "bad", False) == "confirming"
    assert b.book.assign("v1", lambda r: True) is None  # the same verifier never looks twice
    assert b.book.assign("bad", lambda r: True) is None  # nor the trainer at its own round
    assert b.verdict("v2", bad.audit_id, "bad", False) == "failed"
    (split,) = b.book.on_made(b.made(1, ["split"]), -1, b.parts(["split"]))
    assert b.verdict("v1", split.audit_id, "split", False) == "confirming"
    assert b.verdict("v2", split.audit_id, "split", True) == "confirming"
    assert b.verdict("v3", split.audit_id, "split", True) == "passed"
    assert b.last.struck == ["v1"]  # the outvoted verifier


def test_a_verifier_that_could_not_check_does_not_count() -> None:
    b = Book()
    b.commit("t1")
    (row,) = b.book.on_made(b.made(1, ["t1"]), -1, b.parts(["t1"]))
    assert b.verdict("v1", row.audit_id, "t1", False, "unavailable") == "abstained"
    assert row.status == "open"
    assert b.verdict("v2", row.audit_id, "t1", False) == "confirming"  # the first to count
    # it may take the replay again (its try did not count): with two verifiers, it must
    assert b.verdict("v1", row.audit_id, "t1", False) == "failed"


def test_a_caught_trainer_takes_the_run_back_before_its_first_unconfirmed_round() -> None:
    b = Book()
    versions = {v: b.made(v, ["honest", "liar"] if v >= 3 else ["honest"]) for v in (1, 2, 3, 4)}
    for v in (2, 3):  # rounds 2 and 3 made versions 3 and 4
        b.commit("liar", v)
        b.commit("honest", v)
    rows = b.book.on_made(versions[3], 1, b.parts(["honest", "liar"]))
    liar3 = next(r for r in rows if r.trainer == "liar")
    b.book._decide(liar3, "passed")  # its round 2 replayed clean
    assert b.book.rollback_point(versions, "liar") == 3  # round 3 (made v4) is the first unsure
    liar3.status = "open"
    assert b.book.rollback_point(dict(versions), "liar") == 2
    assert b.book.rollback_point(versions, "nobody") is None


@pytest.mark.parametrize("signers", [["solo"], ["a", "b"]])
def test_the_rates_cost_what_the_config_says(signers: list[str]) -> None:
    b = Book(trusted_after=0, rate=0.05, lone_rate=0.1)
    drawn = 0
    for v in range(1, 2001):
        for t in signers:
            b.commit(t, v - 1)
        drawn += len(b.book.on_made(b.made(v, signers), v - 2, b.parts(signers)))
    expected = (0.1 if len(signers) == 1 else 0.05) * 2000 * len(signers)
    assert abs(drawn - expected) < 4 * expected**0.5


def test_a_commitment_naming_rollouts_the_round_was_not_dealt_is_a_strike(tmp_path: Path) -> None:
    from tests.unit.test_billing import service, streaming_run
    from tests.unit.test_rounds import deliver

    svc, accounts = service((f"sqlite:///{tmp_path / 'c.db'}", f"sqlite:///{tmp_path / 'a.db'}"))
    accounts.create("researcher", budget_tokens=10**9)
    (owner,) = accounts.all()

    async def main() -> None:
        run = await streaming_run(svc, owner)
        for _ in range(3):
            deliver(svc.state.book, "producer", {"r1": 0})
        ask = TrainRequest(base_model="tiny")
        a = await svc.rounds.train("t1", ask, ["t1", "t2"], lambda p: [], [])
        b = await svc.rounds.train("t2", ask, ["t1", "t2"], lambda p: [], [])
        assert isinstance(a, TrainAssignment) and isinstance(b, TrainAssignment)
        theirs = b.rollouts[0].lease.lease_id
        outside = next(i for i in svc.state.book.waiting[run.run_id])  # dealt to no round
        refused = svc.rounds.commit("t1", RoundCommitment("r1", 0, bytes(32), [theirs]))
        assert not refused.accepted and svc.state.audits.trust_of("t1").strikes == 0
        struck = svc.rounds.commit("t1", RoundCommitment("r1", 0, bytes(32), [outside]))
        assert not struck.accepted and svc.state.audits.trust_of("t1").strikes == 1
        empty = svc.rounds.commit("t1", RoundCommitment("r1", 0, bytes(32), []))
        assert not empty.accepted

    trio.run(main)
