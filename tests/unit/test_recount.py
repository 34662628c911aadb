"""The coordinator's own count of rollouts (``coordinator/recount.py``), with real signed payload
frames: a payload that holds what its receipt claims confirms it; one that does not convicts
its producer on its own signature and refunds the payer what the producer was paid; a payload
never served loses its count; and the ledger reconciles against the kept frames, counted
again — and fails on a discrepancy planted in the books."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import numpy as np
import pytest
import trio
from sqlalchemy import update

from coordinator.config import LeaseConfig
from coordinator.db import LeaseState, LedgerRow
from coordinator.recount import Recounter, Tokenizers
from coordinator.views import ledger
from protocol.accounts import KeyStore
from protocol.accounts import open_database as open_accounts
from protocol.adapters import LeaseCount, RoundReport, TrainAssignment, TrainRequest
from protocol.envelope import seal
from protocol.errors import RemoteError
from protocol.identity import Identity
from protocol.leases import Lease
from protocol.payload_store import PayloadStore
from protocol.rollouts import RolloutPayload, RolloutReceipt, Sample
from protocol.runs import RunSpec, VerificationSpec
from tests.unit.test_billing import key, manifest
from tests.unit.test_leases import Clock
from tests.unit.test_rounds import STREAM
from tests.unit.work import Work

PER_SAMPLE = 3  # completion tokens in each sample


def produce(identity: Identity, lease: Lease, claim_more: int = 0) -> tuple[bytes, RolloutReceipt]:
    """A lease's payload, signed by its producer, and the receipt it hands in (claiming
    ``claim_more`` tokens beyond what the payload holds)."""
    n = len(lease.example_indices) * lease.group_size
    ids, logprobs = np.arange(PER_SAMPLE, dtype="<u4"), np.zeros(PER_SAMPLE, dtype="<f4")
    samples = [Sample(example_index=lease.example_indices[k // lease.group_size],
                      sample_index=k, seed=k, token_ids=ids.tobytes(), logprobs=logprobs.tobytes(),
                      finish_reason="length", reward=0.0)
               for k in range(n)]  # fmt: skip
    payload = RolloutPayload(lease_id=lease.lease_id, run_id=lease.run_id,
                             policy_version=lease.policy_version, samples=samples)  # fmt: skip
    frame = seal(identity, payload)
    receipt = RolloutReceipt(lease_id=lease.lease_id, run_id=lease.run_id,
                             policy_version=lease.policy_version,
                             payload_hash=hashlib.sha256(frame).digest(), num_samples=n,
                             completion_tokens=n * PER_SAMPLE + claim_more)  # fmt: skip
    return frame, receipt


def test_payloads_are_counted_liars_convicted_and_the_ledger_reconciles(tmp_path: Path) -> None:
    accounts = KeyStore(open_accounts(f"sqlite:///{tmp_path / 'accounts.db'}"))
    _, owner = accounts.create("ada", budget_tokens=10_000)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    clock = Clock()
    work = Work.open(url, LeaseConfig(round_leases=1, manifest_wait_s=0), accounts, clock)
    store = PayloadStore(tmp_path / "kept")
    recounter = Recounter(work.state, work.auditing, work.runs, store, "coordinator",
                          Tokenizers({}), deadline_s=30.0, clock=clock)  # fmt: skip
    producer = Identity.generate()
    frames: dict[str, bytes] = {}

    async def fetch(lease: LeaseState) -> bytes:
        if lease.lease_id not in frames:
            raise RemoteError("not_found", "no such payload here")
        return frames[lease.lease_id]

    async def deliver(claim_more: int = 0, served: bool = True) -> str:
        held = {"r1": work.state.book.runs["r1"].policy_version}
        lease = work.state.book.issue_for(producer.peer_id, "tiny", 1, held, max_active=64)
        assert lease is not None
        frame, receipt = produce(producer, lease, claim_more)
        if served:
            frames[lease.lease_id] = frame
        ack = await work.rollouts.receipt(producer.peer_id, receipt)
        assert ack.outcome == "counted"
        return lease.lease_id

    async def main() -> None:
        run = await work.runs.create(RunSpec(name="r1"), owner)
        # no verifier here: rollouts train once the coordinator confirmed them, unaudited
        unaudited = VerificationSpec(trusted_only=False)
        run.plan = msgspec.structs.replace(
            STREAM, spec=msgspec.structs.replace(STREAM.spec, verification=unaudited)
        )
        honest = await deliver()
        assert not work.state.book.leases[honest].confirmed  # a claim, until counted
        assert await recounter.recount(honest, fetch)
        s = work.state.book.leases[honest]
        assert s.confirmed and s.recounted_tokens == 4 * PER_SAMPLE
        # its round: dealt, made, reported, billed
        got = await work.rounds.train("t1", TrainRequest(base_model="tiny"), ["t1"],
                                      lambda p: [], [])  # fmt: skip
        assert isinstance(got, TrainAssignment)
        await work.rounds.manifest("t1", manifest("r1", 1), b"frame")
        counts = [LeaseCount(honest, 4 * PER_SAMPLE)]
        report = RoundReport(run_id="r1", version=0, rewards=[], samples=[], counts=counts)
        assert (await work.rounds.report("t1", report)).recorded
        assert work.state.billing.charged("r1") == 2 * 4 * PER_SAMPLE

        # a payload never served: no count, then after the deadline its examples are redone
        withheld = await deliver(served=False)
        assert not await recounter.recount(withheld, fetch)  # try again later
        clock.now += 31
        assert await recounter.recount(withheld, fetch)
        assert work.state.book.leases[withheld].status == "unconfirmed"
        assert work.state.audits.trust[producer.peer_id].strikes == 0  # no strike for it

        # one token more than the payload holds: convicted on its own signed payload
        inflated = await deliver(claim_more=1)
        assert await recounter.recount(inflated, fetch)
        assert work.state.book.leases[inflated].status == "rejected"
        trust = work.state.audits.trust[producer.peer_id]
        assert trust.strikes == 1 and trust.failed == 1
        of = [a for a in work.state.audits.audits.values() if a.lease_id == inflated]
        assert {a.status for a in of} == {"cancelled", "failed"}  # its drawn audit: moot
        (audit,) = [a for a in of if a.status == "failed"]
        (record,) = audit.verdicts
        assert (audit.status, record.verifier, record.failed_check) == (
            "failed",
            "coordinator",
            "token_count",
        )
        assert record.frame == frames[inflated]  # the evidence: the producer's own signature
        # its paid, unaudited work is quarantined and refunded to the key
        assert work.state.book.leases[honest].status == "quarantined"
        assert work.state.billing.refunded("r1") == 4 * PER_SAMPLE
        assert key(accounts, "ada").used_tokens == 4 * PER_SAMPLE  # 24 charged, 12 back
        books = await ledger(work.state, recounter.kept_count, "r1")
        (check,) = books["runs"]
        assert check["reconciled"] and books["reconciled"], check
        assert check["recounted_sampled"] == check["charged_sampled"] == 4 * PER_SAMPLE

    trio.run(main)

    # a discrepancy planted in the books: a charge the payloads do not back
    with work.state.session.get_bind().begin() as db:
        db.execute(update(LedgerRow).where(LedgerRow.kind == "sampled").values(tokens=13))
    again = work.restored()
    kept = Recounter(again.state, again.auditing, again.runs, PayloadStore(tmp_path / "kept"),
                     "coordinator", Tokenizers({}))  # fmt: skip

    async def audit() -> None:
        books = await ledger(again.state, kept.kept_count, "r1")
        (check,) = books["runs"]
        assert not check["reconciled"] and not books["reconciled"]
        assert (check["charged_sampled"], check["recounted_sampled"]) == (13, 4 * PER_SAMPLE)

    trio.run(audit)


def test_a_tokenizer_asked_for_by_threads_at_once_is_loaded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The recount's workers and the fingerprinting ask at once after a restart; one load, one
    tokenizer (two threads importing transformers together failed one of them)."""
    import threading
    import time as time_

    loads: list[str] = []

    def slow_load(path: str) -> object:
        loads.append(path)
        time_.sleep(0.2)
        return object()

    tokenizers = Tokenizers({"tiny": "/models/tiny"})
    monkeypatch.setattr(tokenizers, "_load", slow_load)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(tokenizers.get("tiny")))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["/models/tiny"] and len(got) == 4 and len({id(g) for g in got}) == 1
