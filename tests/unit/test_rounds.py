"""Training rounds at the coordinator: which rollouts a round consumes (counted, within the run's
staleness window, not taken by an earlier round), how they are dealt over trainers, and how many
leases may wait for training (one round sampled while the one before trains)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
from sqlalchemy import select

from coordinator.config import LeaseConfig
from coordinator.db import AdapterRow, CommitmentRow, LeaseState
from coordinator.leases import LeaseBook, ReceiptOutcome
from protocol.adapters import NoTraining, TrainAssignment, TrainRequest
from tests.unit.test_leases import Clock, plan, receipt_for
from tests.unit.work import Work

STREAM = plan(max_examples=None, prompts_per_lease=1, max_staleness=1)


def deliver(b: LeaseBook, node: str, versions: dict[str, int] | None = None) -> str:
    lease = b.issue_for(node, "tiny", 1, versions, max_active=64)
    assert lease is not None
    assert b.receipt(node, receipt_for(lease)) is ReceiptOutcome.COUNTED
    b.leases[lease.lease_id].recounted_tokens = 100  # the coordinator counted the payload
    return lease.lease_id


def test_leases_waiting_for_training_are_capped() -> None:
    b = LeaseBook(Clock())
    b.add_run(STREAM)
    run = b.runs["r1"]
    first = b.issue_for("a", "tiny", 1, untrained_cap=2)
    second = b.issue_for("a", "tiny", 1, untrained_cap=2)
    assert first is not None and second is not None
    assert b.issue_for("b", "tiny", 1, untrained_cap=2) is None  # two out, none trained
    assert b.receipt("a", receipt_for(first)) is ReceiptOutcome.COUNTED
    assert b.untrained(run) == 2  # delivered but not trained still waits
    assert b.issue_for("b", "tiny", 1, untrained_cap=2) is None
    b.deal(run, [b.leases[first.lease_id]], 0)  # a round took it
    assert b.untrained(run) == 1
    assert b.issue_for("b", "tiny", 1, untrained_cap=2) is not None


def test_a_rollout_handed_in_too_stale_takes_no_place_under_the_cap() -> None:
    b = LeaseBook(Clock())
    b.add_run(plan(max_examples=None, prompts_per_lease=1, max_staleness=0))
    run = b.runs["r1"]
    late = [b.issue_for("a", "tiny", 1, untrained_cap=2) for _ in range(2)]
    b.set_policy_version("r1", 1)  # the next version is made before their receipts arrive
    for lease in late:
        assert lease is not None
        assert b.receipt("a", receipt_for(lease)) is ReceiptOutcome.COUNTED  # paid as sampled
        assert not b.trainable(run, b.leases[lease.lease_id])
    assert b.untrained(run) == 0
    assert b.issue_for("a", "tiny", 1, {"r1": 1}, untrained_cap=2) is not None  # not stalled


def test_rollouts_of_withdrawn_versions_never_train_even_handed_in_late() -> None:
    b = LeaseBook(Clock())
    b.add_run(STREAM)  # max_staleness 1
    run = b.runs["r1"]
    b.set_policy_version("r1", 1)
    out = b.issue_for("a", "tiny", 1, {"r1": 1})  # sampled at v1, which a rollback withdraws
    assert out is not None
    b.roll_back("r1", 0, [1])
    b.set_policy_version("r1", 2)  # the next version takes the next number: v1 is in its window
    assert b.receipt("a", receipt_for(out)) is ReceiptOutcome.COUNTED
    b.leases[out.lease_id].recounted_tokens = 100
    assert not b.trainable(run, b.leases[out.lease_id]) and b.untrained(run) == 0
    fresh = deliver(b, "a", {"r1": 2})
    assert b.trainable(run, b.leases[fresh])
    # and after a restart, rebuilt from the stored runs and leases and the withdrawn versions
    again = LeaseBook(Clock())
    again.restore(list(b.runs.values()), list(b.leases.values()), {"r1": [1]})
    assert not again.trainable(again.runs["r1"], again.leases[out.lease_id])
    assert list(again.waiting["r1"]) == [fresh]


def test_the_staleness_window_bounds_what_trains() -> None:
    b = LeaseBook(Clock())
    b.add_run(STREAM)  # max_staleness 1
    run = b.runs["r1"]
    at0 = deliver(b, "a")
    b.set_policy_version("r1", 1)
    at1 = deliver(b, "a", {"r1": 1})
    assert b.trainable(run, b.leases[at0]) and b.trainable(run, b.leases[at1])
    b.set_policy_version("r1", 2)
    assert not b.trainable(run, b.leases[at0])  # two versions behind: too stale
    assert b.trainable(run, b.leases[at1])
    b.deal(run, [b.leases[at1]], 1)  # an earlier round consumed it
    assert not b.trainable(run, b.leases[at1])
    b.uncount(at1, "quarantined")
    assert not b.trainable(run, b.leases[at1])


def test_a_round_is_dealt_over_trainers_once(tmp_path: Path) -> None:
    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}", LeaseConfig(round_leases=2))
    book = work.state.book
    book.add_run(STREAM)
    trainers = ["t1", "t2"]
    req = TrainRequest(base_model="tiny")

    async def ask(peer: str) -> TrainAssignment | NoTraining:
        return await work.rounds.train(peer, req, trainers, lambda p: [], [])

    async def main() -> None:
        delivered = [deliver(book, "a") for _ in range(3)]
        assert isinstance(await ask("t1"), NoTraining)  # 3 < 2 per trainer x 2
        delivered.append(deliver(book, "a"))
        one, two = await ask("t1"), await ask("t2")
        assert isinstance(one, TrainAssignment) and isinstance(two, TrainAssignment)
        assert (one.rank, two.rank, one.group_size) == (0, 1, 2)
        got = [r.lease.lease_id for r in one.rollouts] + [r.lease.lease_id for r in two.rollouts]
        assert sorted(got) == sorted(delivered)  # disjoint shares of the same round
        again = await ask("t1")  # asking again (a retry) gets the same share
        assert isinstance(again, TrainAssignment)
        assert [r.lease.lease_id for r in again.rollouts] == [
            r.lease.lease_id for r in one.rollouts
        ]
        later = deliver(book, "a")  # delivered during the round: for the next one
        assert book.leases[later].trained_in is None
        assert {book.leases[i].trained_in for i in delivered} == {0}

    trio.run(main)
    with work.state.session.get_bind().connect() as db:  # what is on disk, not in memory
        rows = {i: v for i, v in db.execute(select(LeaseState.lease_id, LeaseState.trained_in))}
    assert sorted(v for v in rows.values() if v is not None) == [0, 0, 0, 0]  # persisted


def test_a_share_stays_its_trainers_while_it_works_on_it(tmp_path: Path) -> None:
    """A trainer joining once the round's shares are taken takes none of them (a share cut
    again under a trainer at work would have its version refused); the share of a trainer
    gone goes to one asking again."""
    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}", LeaseConfig(round_leases=1))
    book = work.state.book
    book.add_run(STREAM)
    req = TrainRequest(base_model="tiny")

    async def ask(peer: str, trainers: list[str]) -> list[str]:
        got = await work.rounds.train(peer, req, trainers, lambda p: [], [])
        return [r.lease.lease_id for r in got.rollouts] if isinstance(got, TrainAssignment) else []

    async def main() -> None:
        delivered = [deliver(book, "a") for _ in range(2)]
        one, two = await ask("t2", ["t1", "t2"]), await ask("t1", ["t1", "t2"])
        assert sorted(one + two) == sorted(delivered)
        assert await ask("t0", ["t0", "t1", "t2"]) == []  # joined mid-round: the next round
        assert await ask("t1", ["t0", "t1", "t2"]) == two  # the shares stayed
        assert await ask("t2", ["t0", "t1", "t2"]) == one  # asking again: the same share
        assert sorted(await ask("t2", ["t0", "t2"])) == sorted(delivered)  # t1 gone: its too

    trio.run(main)


def test_a_version_whose_makers_left_is_still_found_at_nodes_past_it(tmp_path: Path) -> None:
    """The trainer that made v1 and v2 is gone; a sampler at v2 still holds v1 (nodes keep the
    versions they went through): a trainer taking over, which needs v1 as v2's parent, is sent
    there, after the holders that are at v1 itself."""
    from protocol.adapters import VersionsRequest

    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}")
    work.state.book.add_run(STREAM)

    def made(v: int) -> AdapterRow:
        return AdapterRow(run_id="r1", version=v, manifest_hash="h", frame=b"f", signers=["gone"],
                          created_at=0.0, parent=v - 1)  # fmt: skip

    work.state.versions["r1"] = {1: made(1), 2: made(2)}
    work.state.book.set_policy_version("r1", 2)
    work.state.held = {"sampler": {"r1": 2}, "behind": {"r1": 0}, "at-1": {"r1": 1}, "x": {}}
    reply = work.rounds.versions(VersionsRequest(base_model="tiny", run_id="r1", version=1),
                                 lambda p: [f"/ip4/127.0.0.1/tcp/1/p2p/{p}"])  # fmt: skip
    (info,) = reply.versions
    assert [h.peer_id for h in info.holders] == ["gone", "at-1", "sampler"]
    assert info.seeds == 1  # the manifest is still the makers' to sign


def test_round_reports_add_up_by_sampled_version(tmp_path: Path) -> None:
    from protocol.adapters import RoundReport, SampleText, VersionRewards

    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}")
    work.state.book.add_run(STREAM)
    made = AdapterRow(run_id="r1", version=1, manifest_hash="h", frame=b"f", signers=["t1", "t2"],
                      created_at=0.0, parent=0)  # fmt: skip
    work.state.versions["r1"] = {1: made}  # round 0 made version 1
    work.state.book.set_policy_version("r1", 1)
    work.state.commit()

    def report(version: int, rewards: list[VersionRewards], text: str = "") -> RoundReport:
        samples = [SampleText(version=version, prompt="p", completion=text, reward=1.0)]
        return RoundReport(run_id="r1", version=version, rewards=rewards,
                           samples=samples if text else [])  # fmt: skip

    async def main() -> None:
        # two trainers of round 0; the first one resends (the resend replaces it)
        assert (
            await work.rounds.report("t1", report(0, [VersionRewards(0, 4, 1.0, 1.0)]))
        ).recorded
        again = report(0, [VersionRewards(0, 4, 2.0, 2.0)], "a")
        assert (await work.rounds.report("t1", again)).recorded
        assert (
            await work.rounds.report("t2", report(0, [VersionRewards(0, 4, 0.0, 0.0)]))
        ).recorded
        ahead = await work.rounds.report("t1", report(5, []))  # a round not reached
        assert not ahead.recorded

    trio.run(main)
    reports = work.state.reports
    (v0,) = reports.rewards("r1")
    assert (v0["version"], v0["samples"]) == (0, 8)
    assert v0["mean"] == pytest.approx(0.25) and v0["std"] == pytest.approx(0.4330127, rel=1e-5)
    assert [x["completion"] for x in reports.samples("r1")] == ["a"]
    restored = work.restored()
    assert restored.state.reports.rewards("r1") == reports.rewards("r1")  # persisted


def test_only_the_rounds_trainers_make_its_version_and_only_together(tmp_path: Path) -> None:
    """A manifest from a trainer the round is not dealt to is refused and struck; the version
    is made once every live trainer of the round signed the same manifest; different
    manifests make nothing, and the round is trained again; a dead trainer is not waited for."""
    from protocol.adapters import ManifestAck
    from tests.unit.test_billing import manifest

    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}",
                     LeaseConfig(round_leases=1, manifest_wait_s=0))  # fmt: skip
    book = work.state.book
    book.add_run(STREAM)
    trainers = ["t1", "t2"]

    async def deal() -> None:
        for _ in trainers:
            deliver(book, "a", {"r1": book.runs["r1"].policy_version})
        for t in trainers:
            got = await work.rounds.train(t, TrainRequest(base_model="tiny"), trainers,
                                          lambda p: [], [])  # fmt: skip
            assert isinstance(got, TrainAssignment)

    async def sign(peer: str, version: int, content: int = 0, dead: str = "") -> ManifestAck:
        m = manifest("r1", version)
        m = msgspec.structs.replace(m, total_bytes=1 + content)  # another adapter
        return await work.rounds.manifest(peer, m, b"frame", lambda t: t != dead)

    async def main() -> None:
        await deal()
        refused = await sign("outsider", 1)
        assert refused.outcome == "not_dealt" and work.state.audits.trust_of("outsider").strikes
        # a trainer the round was dealt to before it was dealt again (its co-trainer banned, a
        # conflict) committed to a part then: its late manifest is refused, not struck
        work.state.replays.commitments[("r1", 0, "late")] = CommitmentRow(
            run_id="r1", round=0, trainer="late", part_hash=bytes(32), lease_ids=[], at=0.0
        )
        late = await sign("late", 1)
        assert late.outcome == "not_dealt" and "dealt again" in late.detail
        assert work.state.audits.trust_of("late").strikes == 0
        assert (await sign("t1", 1)).outcome == "pending"  # t2 has not signed yet
        assert book.runs["r1"].policy_version == 0
        assert (await sign("t2", 1)).outcome == "recorded"
        assert book.runs["r1"].policy_version == 1
        assert work.state.versions["r1"][1].signers == ["t1", "t2"]
        assert (await sign("t1", 1)).outcome == "recorded"  # a resend changes nothing

        await deal()
        assert (await sign("t1", 2)).outcome == "pending"
        assert (await sign("t2", 2, content=1)).outcome == "conflict"  # a poisoned adapter
        assert book.runs["r1"].policy_version == 1  # neither is the version
        assert (await sign("t1", 2)).outcome == "pending"  # the round starts over
        assert (await sign("t2", 2)).outcome == "recorded"  # trained again, agreeing

        await deal()
        assert (await sign("t1", 3, dead="t2")).outcome == "recorded"
        assert work.state.versions["r1"][3].signers == ["t1"]

    trio.run(main)


def test_a_trainer_back_from_a_crash_mid_round_is_neither_waited_for_nor_dealt_it(
    tmp_path: Path,
) -> None:
    """A trainer killed mid-round and started again (another process: another join instance)
    lost its share's work: the round's other trainer makes the version without it at once, and
    the new process takes the next round rather than a share of this one (its manifest alone
    would conflict). A lone trainer's round is dealt to its new process."""
    from tests.unit.test_billing import manifest

    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}",
                     LeaseConfig(round_leases=1, manifest_wait_s=5))  # fmt: skip
    book, rounds = work.state.book, work.rounds
    book.add_run(STREAM)
    process = {"t1": "t1-a", "t2": "t2-a"}
    rounds.instance_of = lambda peer: process[peer]

    async def train(peer: str, trainers: list[str]) -> TrainAssignment | NoTraining:
        return await rounds.train(peer, TrainRequest(base_model="tiny"), trainers,
                                  lambda p: [], [])  # fmt: skip

    async def main() -> None:
        both = ["t1", "t2"]
        for _ in both:
            deliver(book, "a")
        assert all([isinstance(await train(t, both), TrainAssignment) for t in both])
        process["t2"] = "t2-b"  # killed and started again, with the same key
        assert isinstance(await train("t2", both), NoTraining)
        started = trio.current_time()
        ack = await rounds.manifest("t1", manifest("r1", 1), b"frame")
        assert ack.outcome == "recorded" and trio.current_time() - started < 1
        assert work.state.versions["r1"][1].signers == ["t1"]

        for _ in both:  # the next round is the new process's like any other
            deliver(book, "a", {"r1": 1})
        assert all([isinstance(await train(t, both), TrainAssignment) for t in both])
        assert (await rounds.manifest("t1", manifest("r1", 2), b"frame")).outcome == "pending"

    trio.run(main)


def test_a_lone_trainer_back_from_a_crash_is_dealt_its_round_again(tmp_path: Path) -> None:
    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}", LeaseConfig(round_leases=1))
    book, rounds = work.state.book, work.rounds
    book.add_run(STREAM)
    process = {"t1": "t1-a"}
    rounds.instance_of = lambda peer: process[peer]

    async def main() -> None:
        deliver(book, "a")
        request = TrainRequest(base_model="tiny")
        first = await rounds.train("t1", request, ["t1"], lambda p: [], [])
        process["t1"] = "t1-b"
        again = await rounds.train("t1", request, ["t1"], lambda p: [], [])
        assert isinstance(first, TrainAssignment) and isinstance(again, TrainAssignment)
        assert again.rollouts == first.rollouts  # nobody else would ever make the version

    trio.run(main)


def test_a_manifest_waits_for_the_rounds_other_trainers(tmp_path: Path) -> None:
    from tests.unit.test_billing import manifest

    work = Work.open(f"sqlite:///{tmp_path / 'c.db'}",
                     LeaseConfig(round_leases=1, manifest_wait_s=5))  # fmt: skip
    book = work.state.book
    book.add_run(STREAM)
    trainers = ["t1", "t2"]
    answers: dict[str, str] = {}

    async def sign(peer: str) -> None:
        ack = await work.rounds.manifest(peer, manifest("r1", 1), b"frame")
        answers[peer] = ack.outcome

    async def main() -> None:
        for _ in trainers:
            deliver(book, "a")
        for t in trainers:
            await work.rounds.train(t, TrainRequest(base_model="tiny"), trainers, lambda p: [], [])
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sign, "t1")
            await trio.sleep(0.2)
            nursery.start_soon(sign, "t2")
        assert answers == {"t1": "recorded", "t2": "recorded"}
        assert trio.current_time() - started < 2  # t1 was answered when t2 signed

    trio.run(main)
