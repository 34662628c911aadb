"""The audit protocol against a real coordinator process, from in-process peers: only verifiers
get audits, never of their own work, only of payloads made in a dtype they can replay; verdicts
from anyone but the assigned verifier change nothing; audits and producers' records survive a
coordinator restart."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from protocol.errors import RemoteError
from protocol.identity import Identity
from protocol.leases import Lease, LeaseRequest
from protocol.rollouts import ComputeProfile, ReceiptAck, RolloutReceipt
from protocol.verification import AuditAssignment, AuditRequest, NoAudit, Verdict, VerdictAck
from protocol.versions import AUDITS, LEASES
from tests.integration.cluster import Cluster
from tests.integration.peer import peer

pytestmark = pytest.mark.timeout(120)
BF16 = ComputeProfile(backend="torch", dtype="bf16", device="cpu:AVX512", threads=2)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, interval_s=5.0)  # in-process peers do not heartbeat: a long interval
    yield c
    c.stop_all()


def verdict(a: AuditAssignment, passed: bool, check: str = "") -> Verdict:
    return Verdict(
        audit_id=a.audit_id, lease_id=a.lease.lease_id, producer=a.producer,
        payload_hash=a.payload_hash, passed=passed, failed_check=check,
    )  # fmt: skip


def test_audit_assignment_rules_and_restart(cluster: Cluster) -> None:
    cluster.start_coordinator(extra=["--audits.trusted_after=1000"])
    cluster.api("POST", "/v1/runs", json={"name": "r", "rl": {"max_examples": 4, "group_size": 2}})
    producer_id, v1_id, v2_id = Identity.generate(), Identity.generate(), Identity.generate()
    seen: dict[str, str] = {}

    async def first_half() -> None:
        async with (
            peer(cluster.multiaddr, producer_id) as producer,
            peer(cluster.multiaddr, v1_id) as v1,
            peer(cluster.multiaddr, v2_id) as v2,
        ):
            await producer.join(["inference", "verifier"], "producer")
            await v1.join(["verifier"], "v1")
            await v2.join(["inference"], "not-a-verifier")
            lease = await producer.ask(LEASES, LeaseRequest(max_prompts=4, base_model="tiny"))
            assert isinstance(lease, Lease)
            receipt = RolloutReceipt(
                lease_id=lease.lease_id, run_id="r", policy_version=0,
                payload_hash=hashlib.sha256(b"payload").digest(), num_samples=8,
                completion_tokens=10, profile=BF16,
            )  # fmt: skip
            ack = await producer.ask(LEASES, receipt)
            assert isinstance(ack, ReceiptAck) and ack.outcome == "counted"
            # made in bf16: not for a verifier that replays only fp32
            fp32_only = AuditRequest(base_model="tiny", dtypes=["fp32"])
            assert isinstance(await v1.ask(AUDITS, fp32_only), NoAudit)
            # the producer is new: its receipt is audited, but never by itself
            assert isinstance(await producer.ask(AUDITS, AuditRequest(base_model="tiny")), NoAudit)
            with pytest.raises(RemoteError, match="verifier role"):
                await v2.ask(AUDITS, AuditRequest(base_model="tiny"))
            assert isinstance(await v1.ask(AUDITS, AuditRequest(base_model="other")), NoAudit)
            exact = AuditRequest(base_model="tiny", dtypes=["fp32", "bf16"], device="cpu:AVX512")
            a = await v1.ask(AUDITS, exact)
            assert isinstance(a, AuditAssignment)
            assert a.lease == lease and a.producer == producer_id.peer_id and a.producer_addrs
            # a verdict from someone else than the assigned verifier changes nothing
            wrong = await producer.ask(AUDITS, verdict(a, True))
            assert isinstance(wrong, VerdictAck) and wrong.outcome == "wrong_verifier"
            first = await v1.ask(AUDITS, verdict(a, False, "logprobs"))
            assert isinstance(first, VerdictAck) and first.outcome == "confirming"
            seen["audit"] = a.audit_id

    trio.run(first_half)
    coordinator = cluster.coordinator
    assert coordinator is not None
    coordinator.signal(signal.SIGTERM)
    assert coordinator.wait() == 0
    cluster.start_coordinator(extra=["--audits.trusted_after=1000"])

    async def second_half() -> None:
        async with peer(cluster.multiaddr, v1_id) as v1, peer(cluster.multiaddr, v2_id) as v3:
            await v1.join(["verifier"], "v1")
            await v3.join(["verifier"], "v3")
            # after the restart the audit still waits for its second, independent look, by a
            # verifier that can replay bf16 (none that generates on its device class exactly
            # has asked since: any may)
            assert isinstance(await v1.ask(AUDITS, AuditRequest(base_model="tiny")), NoAudit)
            fp32_only = AuditRequest(base_model="tiny", dtypes=["fp32"])
            assert isinstance(await v3.ask(AUDITS, fp32_only), NoAudit)
            a = await v3.ask(AUDITS, AuditRequest(base_model="tiny"))
            assert isinstance(a, AuditAssignment) and a.audit_id == seen["audit"]
            done = await v3.ask(AUDITS, verdict(a, False, "logprobs"))
            assert isinstance(done, VerdictAck) and done.outcome == "confirmed_failure"

    trio.run(second_half)
    nodes = cluster.nodes()
    assert nodes["producer"]["trust"]["strikes"] == 1
    run = cluster.api("GET", "/v1/runs/r")
    assert run["examples_delivered"] == 0  # the rejected rollout no longer counts
    verdicts = cluster.api("GET", "/v1/network/verdicts")["data"]
    assert [v["failed_check"] for v in verdicts] == ["logprobs", "logprobs"]


def test_a_waiting_verifier_is_handed_an_audit_the_moment_it_opens(cluster: Cluster) -> None:
    """A long poll: the request is held until a receipt opens an audit, then answered at once;
    with nothing to check it is answered ``NoAudit`` after the wait, to ask again at once."""
    cluster.start_coordinator(extra=["--audits.trusted_after=1000", "--audits.max_wait_s=3"])
    cluster.api("POST", "/v1/runs", json={"name": "r", "rl": {"max_examples": 4, "group_size": 2}})

    async def main() -> None:
        async with (
            peer(cluster.multiaddr, Identity.generate()) as producer,
            peer(cluster.multiaddr, Identity.generate()) as v1,
        ):
            await producer.join(["inference"], "producer")
            await v1.join(["verifier"], "v1")
            started = trio.current_time()
            idle = await v1.ask(AUDITS, AuditRequest(base_model="tiny", wait_s=60))
            assert isinstance(idle, NoAudit) and idle.retry_after_s == 0
            assert 3 <= trio.current_time() - started < 8  # held for the coordinator's cap
            handed: list[tuple[AuditAssignment, float]] = []

            async def wait_for_audit() -> None:
                a = await v1.ask(AUDITS, AuditRequest(base_model="tiny", wait_s=3))
                assert isinstance(a, AuditAssignment)
                handed.append((a, trio.current_time()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_audit)
                await trio.sleep(0.5)  # the request is in and waiting
                lease = await producer.ask(LEASES, LeaseRequest(max_prompts=4, base_model="tiny"))
                assert isinstance(lease, Lease)
                receipt = RolloutReceipt(
                    lease_id=lease.lease_id, run_id="r", policy_version=0,
                    payload_hash=hashlib.sha256(b"payload").digest(), num_samples=8,
                    completion_tokens=10,
                )  # fmt: skip
                ack = await producer.ask(LEASES, receipt)
                counted = trio.current_time()
                assert isinstance(ack, ReceiptAck) and ack.outcome == "counted"
            a, at = handed[0]
            assert a.lease == lease and at - counted < 1.0  # answered as the audit opened

    trio.run(main)
