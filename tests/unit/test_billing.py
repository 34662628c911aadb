"""Billing a run and the run lifecycle, against a real coordinator database and a real accounts
database (SQLite files): what a round charges and to whom, holds on the owner's key budget,
exact reconciliation, the budget stop, and queued → running → completed / failed / cancelled."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio

from coordinator.billing import NETWORK
from coordinator.config import AuditConfig, LeaseConfig
from coordinator.db import LeaseState, RunState
from coordinator.rounds import Rounds
from coordinator.views import ledger
from protocol.accounts import ApiKey, KeyStore
from protocol.accounts import open_database as open_accounts
from protocol.adapters import (
    AdapterManifest,
    LeaseCount,
    NoTraining,
    RoundCommitment,
    RoundReport,
    ShardInfo,
    TrainAssignment,
    TrainRequest,
    VersionRewards,
)
from tests.unit.test_leases import Clock, plan, receipt_for
from tests.unit.test_rounds import STREAM, deliver
from tests.unit.work import Work

TOKENS = 100  # per delivered lease (receipt_for)


Databases = tuple[str, str]
"""URLs of the coordinator's database and the accounts database (PostgreSQL in
``tests/integration/test_postgres.py``: the same tests, both in one database)."""


@pytest.fixture
def dbs(tmp_path: Path) -> Databases:
    return f"sqlite:///{tmp_path / 'c.db'}", f"sqlite:///{tmp_path / 'accounts.db'}"


def service(dbs: Databases, **config: int) -> tuple[Work, KeyStore]:
    accounts = KeyStore(open_accounts(dbs[1]))
    lease_config = LeaseConfig(round_leases=1, manifest_wait_s=0, **config)  # type: ignore[arg-type]
    return Work.open(dbs[0], lease_config, accounts), accounts


def key(accounts: KeyStore, name: str) -> ApiKey:
    (k,) = [k for k in accounts.all() if k.name == name]
    return k


def count(lease: LeaseState) -> int | None:
    """The reconciler's count of a payload (unit tests have no payloads: the recount)."""
    return lease.recounted_tokens


async def round_of(
    svc: Work, run_id: str, trainers: list[str], made: list[str]
) -> list[TrainAssignment | NoTraining]:
    """Deliver a round's leases, deal them, record the next version as made by ``made``, and
    have every trainer report, with its count of every payload of its share."""
    run = svc.state.book.runs[run_id]
    v = run.policy_version
    for _ in trainers:
        deliver(svc.state.book, "producer", {run_id: v})
    got = [await svc.rounds.train(t, TrainRequest(base_model="tiny"), trainers, lambda p: [], [])
           for t in trainers]  # fmt: skip
    if all(isinstance(a, TrainAssignment) for a in got):
        for t in made:  # the trainers whose result is the version sign the same manifest;
            # the others died before they could (the version waits for no dead trainer)
            ack = await svc.rounds.manifest(t, manifest(run_id, v + 1), b"frame",
                                            lambda peer: peer in made)  # fmt: skip
            assert ack.outcome in ("recorded", "pending")
        for t, a in zip(trainers, got, strict=True):
            assert isinstance(a, TrainAssignment)
            counts = [LeaseCount(r.lease.lease_id, TOKENS) for r in a.rollouts]
            report = RoundReport(run_id=run_id, version=v, rewards=[], samples=[], counts=counts)
            assert (await svc.rounds.report(t, report)).recorded
    return got


async def streaming_run(svc: Work, owner: ApiKey) -> RunState:
    """Run ``r1``, billed to ``owner``, taking rollouts as they come (``STREAM``)."""
    from protocol.runs import RunSpec

    run = await svc.runs.create(RunSpec(name="r1"), owner)
    run.plan = STREAM
    return run


def manifest(run_id: str, version: int) -> AdapterManifest:
    shard = ShardInfo(sha256=bytes(32), size=1)
    return AdapterManifest(run_id=run_id, version=version, parent_version=version - 1,
                           base_model_hash=bytes(32), shards=[shard], total_bytes=1)  # fmt: skip


def test_a_round_is_billed_to_the_owner_and_credited_to_who_moved_the_model(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("alice", budget_tokens=10_000)

    async def main() -> None:
        await streaming_run(svc, owner)
        await round_of(svc, "r1", ["t1", "t2"], made=["t1", "t2"])
        # t3 died before it signed: its share did not move the model
        await round_of(svc, "r1", ["t1", "t3"], made=["t1"])
        view = await ledger(svc.state, count, "r1")
        (check,) = view["runs"]
        # each confirmed rollout: 100 sampled (to its producer) + 100 trained (to its trainer)
        # round 0: 2 shares; round 1: t1's share only
        assert check["charged_sampled"] == 300 and check["charged_trained"] == 300
        assert check["recounted_sampled"] == check["trainer_counted_sampled"] == 300
        assert check["recounted_trained"] == 300
        assert check["charged"] == check["key_usage"] == 600
        assert check["reconciled"] and view["reconciled"] and view["balance_sum"] == 0
        assert view["balances"]["key:alice"] == -600
        assert view["balances"]["node:producer"] == 300
        assert view["balances"]["node:t1"] == 200 and view["balances"]["node:t2"] == 100
        assert "node:t3" not in view["balances"]
        # round 1 is not closed (t3 reported, so it is): nothing stays held once all reported
        after = key(accounts, "alice")
        assert after.used_tokens == 600 and after.reserved_tokens == 0
        assert accounts.holds("run:r1") == {}

    trio.run(main)
    restored = svc.restored()
    assert restored.state.billing.charged("r1") == 600  # the journal is persisted


def test_what_a_trainer_says_it_trained_is_not_what_it_is_paid(dbs: Databases) -> None:
    """Trained tokens are what the coordinator dealt; unconfirmed rollouts are never dealt; a
    trainer whose signed counts or rewards the payloads contradict is not paid and struck."""
    svc, accounts = service(dbs)
    _, owner = accounts.create("carol", budget_tokens=10_000)

    async def main() -> None:
        await streaming_run(svc, owner)
        lease = svc.state.book.issue_for("producer", "tiny", 1, max_active=64)
        assert lease is not None
        svc.state.book.receipt("producer", receipt_for(lease))  # counted, not confirmed yet
        ask = TrainRequest(base_model="tiny")
        assert isinstance(await svc.rounds.train("t1", ask, ["t1"], lambda p: [], []), NoTraining)
        state = svc.state.book.leases[lease.lease_id]
        state.recounted_tokens, state.rewards = TOKENS, [1.0, 0.0]  # the coordinator's own
        got = await svc.rounds.train("t1", ask, ["t1"], lambda p: [], [])
        assert isinstance(got, TrainAssignment)
        await svc.rounds.manifest("t1", manifest("r1", 1), b"frame")
        counts = [LeaseCount(lease.lease_id, 10**6)]  # a lying count
        lie = RoundReport(run_id="r1", version=0, rewards=[VersionRewards(0, 2, 1.0, 1.0)],
                          samples=[], counts=counts)  # fmt: skip
        assert (await svc.rounds.report("t1", lie)).recorded
        assert svc.state.billing.charged("r1", "sampled") == TOKENS  # the producer's work
        assert svc.state.billing.charged("r1", "trained") == 0  # the liar is not paid
        assert svc.state.audits.trust["t1"].strikes == 1
        assert key(accounts, "carol").used_tokens == TOKENS
        check = (await ledger(svc.state, count, "r1"))["runs"][0]
        assert check["reconciled"]  # every charge is what the payloads hold
        assert check["disputed_by_trainers"] == [lease.lease_id]  # and the lie is on record

    trio.run(main)


def test_a_trainer_reporting_false_rewards_is_not_paid(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("gus", budget_tokens=10_000)

    async def main() -> None:
        await streaming_run(svc, owner)
        deliver(svc.state.book, "producer")
        (s,) = svc.state.book.waiting["r1"].values()
        s.rewards = [0.0, 0.0]  # the coordinator scored both samples 0
        got = await svc.rounds.train("t1", TrainRequest(base_model="tiny"), ["t1"],
                                     lambda p: [], [])  # fmt: skip
        assert isinstance(got, TrainAssignment)
        await svc.rounds.manifest("t1", manifest("r1", 1), b"frame")
        fake = RoundReport(run_id="r1", version=0, rewards=[VersionRewards(0, 2, 2.0, 2.0)],
                           samples=[], counts=[LeaseCount(s.lease_id, TOKENS)])  # fmt: skip
        assert (await svc.rounds.report("t1", fake)).recorded
        assert svc.state.billing.charged("r1", "trained") == 0
        assert svc.state.audits.trust["t1"].strikes == 1

    trio.run(main)


def test_no_charge_moves_more_than_its_round_holds(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("dan", budget_tokens=10_000)

    async def main() -> None:
        await streaming_run(svc, owner)
        deliver(svc.state.book, "producer")
        got = await svc.rounds.train("t1", TrainRequest(base_model="tiny"), ["t1"],
                                     lambda p: [], [])  # fmt: skip
        assert isinstance(got, TrainAssignment)
        (dealt,) = svc.state.book.dealt[("r1", 0)]
        # the round held 2 x 100; a (corrupted) claim of 10^6 confirmed tokens must not pass
        dealt.completion_tokens = dealt.recounted_tokens = 10**6
        await svc.rounds.manifest("t1", manifest("r1", 1), b"frame")
        report = RoundReport(run_id="r1", version=0, rewards=[], samples=[])
        assert (await svc.rounds.report("t1", report)).recorded
        assert svc.state.billing.charged("r1") == 0  # refused, logged
        dan = key(accounts, "dan")
        assert dan.used_tokens == 0 and dan.reserved_tokens == 0

    trio.run(main)


def test_trainers_asking_at_once_are_dealt_one_round_held_once(dbs: Databases) -> None:
    """Admitting a round waits on the accounts database (its hold); a second trainer asking
    meanwhile must find the round dealt, not deal and hold it again: that double-charged the
    first trainer's training and left the second hold on the key for good."""
    svc, accounts = service(dbs)
    _, owner = accounts.create("erin", budget_tokens=10_000)

    async def main() -> None:
        await streaming_run(svc, owner)
        trainers = ["t1", "t2"]
        for _ in trainers:
            deliver(svc.state.book, "producer")
        got: dict[str, TrainAssignment | NoTraining] = {}

        async def ask(t: str) -> None:
            got[t] = await svc.rounds.train(t, TrainRequest(base_model="tiny"), trainers,
                                            lambda p: [], [])  # fmt: skip

        async with trio.open_nursery() as nursery:
            for t in trainers:
                nursery.start_soon(ask, t)
        shares = {t: [r.lease.lease_id for r in a.rollouts]
                  for t, a in got.items() if isinstance(a, TrainAssignment)}  # fmt: skip
        assert sorted(len(s) for s in shares.values()) == [1, 1]  # one round, split in two
        assert len(svc.state.book.dealt[("r1", 0)]) == 2
        assert key(accounts, "erin").reserved_tokens == 2 * 2 * TOKENS  # held once
        for t in trainers:
            await svc.rounds.manifest(t, manifest("r1", 1), b"frame")
        for t in trainers:
            counts = [LeaseCount(i, TOKENS) for i in shares[t]]
            report = RoundReport(run_id="r1", version=0, rewards=[], samples=[], counts=counts)
            assert (await svc.rounds.report(t, report)).recorded
        assert svc.state.billing.charged("r1", "trained") == 2 * TOKENS
        erin = key(accounts, "erin")
        assert erin.used_tokens == 4 * TOKENS and erin.reserved_tokens == 0

    trio.run(main)


def test_an_ended_runs_round_a_dead_trainer_never_reports_gives_its_hold_back(
    dbs: Databases,
) -> None:
    """The run ends with its last round dealt to two trainers; one reports, the other died. Its
    share stays held until ``report_deadline_s`` after the round opened, then goes back; what
    the live trainer's report charged stays charged."""
    svc, accounts = service(dbs)
    clock = svc.state.billing.clock = svc.state.clock
    assert isinstance(clock, Clock)
    _, owner = accounts.create("fay", budget_tokens=10_000)

    async def main() -> None:
        run = await streaming_run(svc, owner)
        trainers = ["t1", "t2"]
        for _ in trainers:
            deliver(svc.state.book, "producer")
        got = {t: await svc.rounds.train(t, TrainRequest(base_model="tiny"), trainers,
                                         lambda p: [], []) for t in trainers}  # fmt: skip
        ack = await svc.rounds.manifest("t1", manifest("r1", 1), b"frame", lambda p: p == "t1")
        assert ack.outcome == "recorded"  # t2 is dead: the version does not wait for it
        a = got["t1"]
        assert isinstance(a, TrainAssignment)
        counts = [LeaseCount(r.lease.lease_id, TOKENS) for r in a.rollouts]
        report = RoundReport(run_id="r1", version=0, rewards=[], samples=[], counts=counts)
        assert (await svc.rounds.report("t1", report)).recorded
        await svc.runs.finish(run, "cancelled", "cancelled")
        deadline = svc.state.config.report_deadline_s
        clock.now += deadline - 1
        await svc.state.billing.close_overdue(run, deadline)
        assert key(accounts, "fay").reserved_tokens == 2 * TOKENS  # t2 may still report
        clock.now += 2
        await svc.state.billing.close_overdue(run, deadline)
        fay = key(accounts, "fay")
        assert fay.used_tokens == 2 * TOKENS and fay.reserved_tokens == 0

    trio.run(main)


def test_a_round_dealt_as_its_run_ends_gives_its_hold_back_at_once(dbs: Databases) -> None:
    """The run ends (its target reached) with its next round dealt to two trainers: one of them
    committed to its part before the end, and may still hand in the version; the other round,
    dealt to nobody who committed, can never be charged (commitments are refused from now on)
    and its hold goes back at once, not ``report_deadline_s`` later."""
    svc, accounts = service(dbs)
    _, owner = accounts.create("gus", budget_tokens=10_000)

    async def main() -> None:
        run = await streaming_run(svc, owner)
        deliver(svc.state.book, "producer")
        got = await Rounds.train(
            svc.rounds, "t1", TrainRequest(base_model="tiny"), ["t1"], lambda p: [], []
        )  # dealt; its trainer has not committed yet
        assert isinstance(got, TrainAssignment)
        assert key(accounts, "gus").reserved_tokens == 2 * TOKENS
        await svc.runs.finish(run, "completed", "target_reward")
        gus = key(accounts, "gus")
        assert gus.reserved_tokens == 0 and gus.used_tokens == 0
        assert svc.state.billing.outstanding("r1") == 0
        late = RoundCommitment("r1", 0, bytes(32), [r.lease.lease_id for r in got.rollouts])
        assert not svc.rounds.commit("t1", late).accepted  # nothing can be charged to it now

    trio.run(main)


def test_a_round_committed_to_before_its_run_ends_stays_held(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("hal", budget_tokens=10_000)

    async def main() -> None:
        run = await streaming_run(svc, owner)
        deliver(svc.state.book, "producer")
        got = await svc.rounds.train(
            "t1", TrainRequest(base_model="tiny"), ["t1"], lambda p: [], []
        )  # dealt, and committed to at once
        assert isinstance(got, TrainAssignment)
        await svc.runs.finish(run, "completed", "target_reward")
        assert key(accounts, "hal").reserved_tokens == 2 * TOKENS  # its version may yet come

    trio.run(main)


def test_a_restart_between_hold_and_settle_holds_again_first(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("erin", budget_tokens=300)

    async def main() -> None:
        await streaming_run(svc, owner)
        deliver(svc.state.book, "producer")
        got = await svc.rounds.train("t1", TrainRequest(base_model="tiny"), ["t1"],
                                     lambda p: [], [])  # fmt: skip
        assert isinstance(got, TrainAssignment)
        svc.state.commit()
        assert key(accounts, "erin").reserved_tokens == 200

    trio.run(main)
    # meanwhile the gateway spends part of the budget the round no longer holds? not if held
    again = svc.restored()
    assert key(accounts, "erin").reserved_tokens == 200  # held again, not given back
    assert accounts.hold("gateway", owner.id, 101) is False  # 300 - 200 held: 100 left

    async def settle() -> None:
        run = again.state.book.runs["r1"]
        run.plan = STREAM
        await again.rounds.manifest("t1", manifest("r1", 1), b"frame")
        (lease,) = again.state.book.dealt[("r1", 0)]
        counts = [LeaseCount(lease.lease_id, TOKENS)]
        report = RoundReport(run_id="r1", version=0, rewards=[], samples=[], counts=counts)
        assert (await again.rounds.report("t1", report)).recorded

    trio.run(settle)
    erin = key(accounts, "erin")
    assert erin.used_tokens == 200 and erin.reserved_tokens == 0 <= 300 - erin.used_tokens


def test_a_run_completes_cleanly_when_its_budget_is_spent(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    # one round holds 2 x 100 (one trainer) and charges it all: the third round cannot fit
    _, owner = accounts.create("bob", budget_tokens=400)

    async def main() -> None:
        run = await streaming_run(svc, owner)
        for _ in range(2):
            assert isinstance((await round_of(svc, "r1", ["t1"], ["t1"]))[0], TrainAssignment)
        assert run.state == "running"
        third = await round_of(svc, "r1", ["t1"], ["t1"])
        assert isinstance(third[0], NoTraining)
        assert (run.state, run.stop_reason) == ("completed", "budget")
        bob = key(accounts, "bob")
        assert bob.used_tokens == 400 and bob.reserved_tokens == 0
        assert (await ledger(svc.state, count))["reconciled"]

    trio.run(main)


def test_a_runs_own_token_cap_stops_it_too(dbs: Databases) -> None:
    svc, _ = service(dbs)

    async def main() -> None:
        from protocol.runs import BudgetSpec, RunSpec

        run = await svc.runs.create(RunSpec(name="r1", budget=BudgetSpec(max_tokens=350)))
        run.plan = plan(max_examples=None, prompts_per_lease=1, max_staleness=1, budget=350)
        await round_of(svc, "r1", ["t1"], ["t1"])  # charges 200 of 350
        assert run.state == "running"
        await round_of(svc, "r1", ["t1"], ["t1"])  # 200 + worst 200 > 350
        assert (run.state, run.stop_reason) == ("completed", "budget")
        assert svc.state.billing.charged("r1") == 200
        check = (await ledger(svc.state, count))["runs"][0]
        assert check["key_usage"] is None  # an open run: no key

    trio.run(main)


def test_verifiers_are_credited_and_a_penalized_producer_refunds_the_payer(
    dbs: Databases,
) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("fay", budget_tokens=10_000)

    async def main() -> None:
        run = await streaming_run(svc, owner)
        await round_of(svc, "r1", ["t1"], ["t1"])
        billing = svc.state.billing
        (paid,) = svc.state.book.dealt[("r1", 0)]
        assert billing.credit_verified("r1", "audit-1", "v", 100) is not None
        refunds = await billing.forfeit(run, "producer", [paid.lease_id, "not-paid"])
        assert [(r.debit, r.credit, r.tokens) for r in refunds] == [
            ("node:producer", "key:fay", TOKENS)
        ]
        assert await billing.forfeit(run, "producer", [paid.lease_id]) == []  # once
        assert billing.balances() == {"key:fay": -TOKENS, "node:producer": 0, NETWORK: -100,
                                      "node:t1": TOKENS, "node:v": 100}  # fmt: skip
        assert key(accounts, "fay").used_tokens == TOKENS  # 200 charged, 100 given back
        check = (await ledger(svc.state, count, "r1"))["runs"][0]
        assert check["refunded"] == TOKENS and check["key_usage"] == TOKENS
        assert check["reconciled"]

    trio.run(main)


def test_lifecycle_queued_running_and_the_stop_rules(dbs: Databases) -> None:
    svc, _ = service(dbs, max_running_runs=1)

    async def main() -> None:
        from protocol.runs import RunSpec, StopSpec

        first = await svc.runs.create(RunSpec(name="a", stop=StopSpec(max_rounds=1)))
        on_reward = RunSpec(name="b", stop=StopSpec(target_reward=0.5, min_samples=4))
        with pytest.raises(ValueError, match=r"tokenizers\.tiny"):  # cannot recompute rewards
            await svc.runs.create(on_reward)
        svc.state.can_score = lambda model: True
        second = await svc.runs.create(on_reward)
        third = await svc.runs.create(RunSpec(name="c"))
        assert [first.state, second.state, third.state] == ["running", "queued", "queued"]
        rl = msgspec.structs.replace(first.plan.spec.rl, prompts_per_lease=1)
        spec = msgspec.structs.replace(first.plan.spec, rl=rl)
        first.plan = msgspec.structs.replace(first.plan, spec=spec)
        await round_of(svc, "a", ["t1"], ["t1"])  # only a running run gets leases
        assert {s.lease.run_id for s in svc.state.book.leases.values()} == {"a"}
        assert (first.state, first.stop_reason) == ("completed", "max_rounds")  # v1 of 1
        assert (second.state, third.state) == ("running", "queued")  # the oldest starts
        # trainers' rewards never stop a run: a trainer could end it early
        lie = RoundReport(run_id="b", version=0, rewards=[VersionRewards(0, 8, 8.0, 8.0)],
                          samples=[])  # fmt: skip
        await svc.rounds.report("t1", lie)
        assert second.state == "running"
        # the coordinator's own: what it recomputed from payloads (coordinator/recount.py)
        svc.state.rewards.add("b", 0, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
        await svc.runs.check_target(second)
        assert second.state == "running"  # mean 0.25 < 0.5
        svc.state.rewards.add("b", 1, [1.0, 1.0, 1.0, 0.0])
        await svc.runs.check_target(second)
        assert (second.state, second.stop_reason) == ("completed", "target_reward")
        assert third.state == "running"
        await svc.runs.cancel(third)
        assert (third.state, third.stop_reason) == ("cancelled", "cancelled")
        svc.state.book.add_run(
            msgspec.structs.replace(first.plan, run_id="gone", env="no-such-env")
        )
        svc.state.commit()

    trio.run(main)
    restored = svc.restored()  # a restart: states persisted; a run that cannot go on fails
    states = {r: (s.state, s.stop_reason) for r, s in restored.state.book.runs.items()}
    assert states["a"] == ("completed", "max_rounds") and states["c"][0] == "cancelled"
    assert states["b"] == ("completed", "target_reward")
    assert states["gone"][0] == "failed" and "no-such-env" in states["gone"][1]


def test_a_verifier_that_hands_an_audit_on_is_not_paid(dbs: Databases) -> None:
    from protocol.runs import RunSpec
    from protocol.verification import AuditAssignment, AuditRequest, Verdict

    svc, _ = service(dbs)
    # no double-check drawn: a first pass decides alone here
    svc.state.audits.config = AuditConfig(double_check_rate=0.0)

    async def main() -> None:
        await svc.runs.create(RunSpec(name="r1"))
        svc.state.book.runs["r1"].plan = STREAM
        deliver(svc.state.book, "producer")  # a new producer: audited every time
        svc.state.audits.on_counted(*_counted(svc), None)
        ask = AuditRequest(base_model="tiny")
        paid = []
        for verifier, check in (("v1", "verifier_error"), ("v2", "")):
            job = await svc.auditing.request(verifier, ask, lambda p: [])
            assert isinstance(job, AuditAssignment)
            verdict = Verdict(audit_id=job.audit_id, lease_id=job.lease.lease_id,
                              producer=job.producer, payload_hash=job.payload_hash,
                              passed=not check, failed_check=check)  # fmt: skip
            ack = await svc.auditing.verdict(verifier, verdict, b"frame")
            paid.append((ack.outcome, svc.state.billing.balances().get(f"node:{verifier}", 0)))
        assert paid == [("reassigned", 0), ("recorded", TOKENS)]  # only the real check earns

    trio.run(main)


def _counted(svc: Work) -> tuple[str, str, str, bytes]:
    (s,) = [s for s in svc.state.book.leases.values() if s.counted]
    return s.lease_id, s.run_id, s.node, s.payload_hash or b""
