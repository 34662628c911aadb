"""Billing a run and the run lifecycle, against a real coordinator database and a real accounts
database (SQLite files): what a round charges and to whom, holds on the owner's key budget,
exact reconciliation, the budget stop, and queued → running → completed / failed / cancelled."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio

from coordinator.billing import NETWORK, Billing
from coordinator.config import LeaseConfig
from coordinator.views import ledger
from protocol.accounts import ApiKey, KeyStore
from protocol.accounts import open_database as open_accounts
from protocol.adapters import (
    AdapterManifest,
    NoTraining,
    RoundReport,
    ShardInfo,
    TrainAssignment,
    TrainRequest,
    VersionRewards,
)
from tests.unit.test_leases import plan
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
    lease_config = LeaseConfig(round_leases=1, **config)  # type: ignore[arg-type]
    return Work.open(dbs[0], lease_config, accounts), accounts


def key(accounts: KeyStore, name: str) -> ApiKey:
    (k,) = [k for k in accounts.all() if k.name == name]
    return k


async def round_of(
    svc: Work, run_id: str, trainers: list[str], made: list[str], trained: int
) -> list[TrainAssignment | NoTraining]:
    """Deliver a round's leases, deal them, record the next version as made by ``made``, and
    have every trainer report ``trained`` tokens."""
    run = svc.state.book.runs[run_id]
    v = run.policy_version
    for _ in trainers:
        deliver(svc.state.book, "producer", {run_id: v})
    got = [await svc.rounds.train(t, TrainRequest(base_model="tiny"), trainers, lambda p: [], [])
           for t in trainers]  # fmt: skip
    if all(isinstance(a, TrainAssignment) for a in got):
        for t in made:  # the trainers whose result is the version sign the same manifest
            ack = await svc.rounds.manifest(t, manifest(run_id, v + 1), b"frame")
            assert ack.outcome in ("recorded", "duplicate")
        for t in trainers:
            report = RoundReport(run_id=run_id, version=v, rewards=[], tokens_trained=trained,
                                 samples=[])  # fmt: skip
            assert (await svc.rounds.report(t, report)).recorded
    return got


def manifest(run_id: str, version: int) -> AdapterManifest:
    shard = ShardInfo(sha256=bytes(32), size=1)
    return AdapterManifest(run_id=run_id, version=version, parent_version=version - 1,
                           base_model_hash=bytes(32), shards=[shard], total_bytes=1)  # fmt: skip


def test_a_round_is_billed_to_the_owner_and_credited_to_who_moved_the_model(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    _, owner = accounts.create("alice", budget_tokens=10_000)

    async def main() -> None:
        from protocol.runs import RunSpec

        run = await svc.runs.create(RunSpec(name="r1"), owner)
        run.plan = STREAM
        await round_of(svc, "r1", ["t1", "t2"], made=["t1", "t2"], trained=60)
        # t3's result lost to another group's: its share did not move the model
        await round_of(svc, "r1", ["t1", "t3"], made=["t1"], trained=50)
        view = await ledger(svc.state, "r1")
        (check,) = view["runs"]
        # round 0: 2 shares x 100 sampled + 2 x 60 trained; round 1: t1's 100 + 50
        assert check["charged_sampled"] == 300 and check["charged_trained"] == 170
        assert check["processed"] == check["charged"] == check["key_usage"] == 470
        assert check["reconciled"] and view["reconciled"] and view["balance_sum"] == 0
        assert view["balances"]["key:alice"] == -470
        assert view["balances"]["node:producer"] == 300
        assert view["balances"]["node:t1"] == 110 and view["balances"]["node:t2"] == 60
        assert "node:t3" not in view["balances"]
        # round 1 is not closed (t3 reported, so it is): nothing stays held once all reported
        after = key(accounts, "alice")
        assert after.used_tokens == 470 and after.reserved_tokens == 0
        assert accounts.holds("run:r1") == {}

    trio.run(main)
    restored = svc.restored()
    assert restored.state.billing.charged("r1") == 470  # the journal is persisted


def test_a_run_completes_cleanly_when_its_budget_is_spent(dbs: Databases) -> None:
    svc, accounts = service(dbs)
    # one round holds 2 x 100 (one trainer); charges 100 + 40: the third round cannot fit
    _, owner = accounts.create("bob", budget_tokens=400)

    async def main() -> None:
        from protocol.runs import RunSpec

        run = await svc.runs.create(RunSpec(name="r1"), owner)
        run.plan = STREAM
        for _ in range(2):
            assert isinstance((await round_of(svc, "r1", ["t1"], ["t1"], 40))[0], TrainAssignment)
        assert run.state == "running"
        third = await round_of(svc, "r1", ["t1"], ["t1"], 40)
        assert isinstance(third[0], NoTraining)
        assert (run.state, run.stop_reason) == ("completed", "budget")
        bob = key(accounts, "bob")
        assert bob.used_tokens == 280 <= 400 and bob.reserved_tokens == 0
        assert (await ledger(svc.state))["reconciled"]

    trio.run(main)


def test_a_runs_own_token_cap_stops_it_too(dbs: Databases) -> None:
    svc, _ = service(dbs)

    async def main() -> None:
        from protocol.runs import BudgetSpec, RunSpec

        run = await svc.runs.create(RunSpec(name="r1", budget=BudgetSpec(max_tokens=350)))
        run.plan = plan(max_examples=None, prompts_per_lease=1, max_staleness=1, budget=350)
        await round_of(svc, "r1", ["t1"], ["t1"], 100)  # charges 200 of 350
        assert run.state == "running"
        await round_of(svc, "r1", ["t1"], ["t1"], 100)  # 200 + worst 200 > 350
        assert (run.state, run.stop_reason) == ("completed", "budget")
        assert svc.state.billing.charged("r1") == 200
        assert (await ledger(svc.state))["runs"][0]["key_usage"] is None  # an open run: no key

    trio.run(main)


def test_verifiers_are_credited_and_a_penalized_producer_forfeits() -> None:
    billing = Billing(None)
    paid = billing.post("r1", "sampled", "key:a", "node:p", 100, "lease-1")
    assert paid is not None and billing.post("r1", "sampled", "key:a", "node:p", 100,
                                              "lease-1") is None  # fmt: skip
    assert billing.credit_verified("r1", "audit-1", "v", 100) is not None
    assert [r.tokens for r in billing.forfeit("r1", "p", ["lease-1", "lease-2"])] == [100]
    assert billing.forfeit("r1", "p", ["lease-1"]) == []  # once
    assert billing.balances() == {"key:a": -100, "node:p": 0, NETWORK: 0, "node:v": 100}


def test_lifecycle_queued_running_and_the_stop_rules(dbs: Databases) -> None:
    svc, _ = service(dbs, max_running_runs=1)

    async def main() -> None:
        from protocol.runs import RunSpec, StopSpec

        first = await svc.runs.create(RunSpec(name="a", stop=StopSpec(max_rounds=1)))
        second = await svc.runs.create(
            RunSpec(name="b", stop=StopSpec(target_reward=0.5, min_samples=4))
        )
        third = await svc.runs.create(RunSpec(name="c"))
        assert [first.state, second.state, third.state] == ["running", "queued", "queued"]
        rl = msgspec.structs.replace(first.plan.spec.rl, prompts_per_lease=1)
        spec = msgspec.structs.replace(first.plan.spec, rl=rl)
        first.plan = msgspec.structs.replace(first.plan, spec=spec)
        await round_of(svc, "a", ["t1"], ["t1"], 10)  # only a running run gets leases
        assert {s.lease.run_id for s in svc.state.book.leases.values()} == {"a"}
        assert (first.state, first.stop_reason) == ("completed", "max_rounds")  # v1 of 1
        assert (second.state, third.state) == ("running", "queued")  # the oldest starts
        svc.state.book.set_policy_version("b", 1)
        low = RoundReport(run_id="b", version=0, rewards=[VersionRewards(0, 8, 2.0, 2.0)],
                          tokens_trained=0, samples=[])  # fmt: skip
        await svc.rounds.report("t1", low)
        assert second.state == "running"  # mean 0.25 < 0.5
        svc.state.book.set_policy_version("b", 2)
        high = RoundReport(run_id="b", version=1, rewards=[VersionRewards(1, 4, 3.0, 3.0)],
                           tokens_trained=0, samples=[])  # fmt: skip
        await svc.rounds.report("t1", high)
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
