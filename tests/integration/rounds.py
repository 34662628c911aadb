"""Playing a producer and trainers with in-process peers, for tests of what comes after a round
(versions, shards, deployment, the dashboard): a run's version is made only by the trainers its
round was dealt to, so a test trainer must be dealt one first.

``deliver`` makes a lease's payload (``TOKENS`` tokens a sample), serves it and sends its
receipt; ``dealt_round`` delivers a round's leases, waits for the coordinator's own count to
confirm them, and has each trainer take its share and commit to a part of it. The run must
train on unaudited rollouts (``"verification": {"trusted_only": false}``) unless the producer
is trusted."""

from __future__ import annotations

import hashlib

import msgspec
import trio

from protocol.adapters import TrainAssignment, TrainRequest
from protocol.envelope import seal
from protocol.leases import Lease, LeaseRequest
from protocol.payload_store import PayloadStore
from protocol.rollouts import ReceiptAck, RolloutPayload, RolloutReceipt
from protocol.versions import ADAPTERS, LEASES
from tests.examples import rollout_payload
from tests.integration.cluster import Cluster
from tests.integration.peer import Peer
from tests.wait import wait_until

NO_REPLAYS = ["--replays.trusted_after=0", "--replays.rate=0", "--replays.lone_rate=0"]
"""Coordinator flags for tests whose trainers are in-process peers that train nothing: a real
verifier would replay their rounds, and their made-up parts fail any replay."""

TOKENS = 5
"""Completion tokens in each sample of the payloads below."""


def payload_for(lease: Lease) -> RolloutPayload:
    """A payload that fits the lease: its samples, each of ``TOKENS`` tokens."""
    n = len(lease.example_indices) * lease.group_size
    made = rollout_payload(n * TOKENS * 8, tokens_per_sample=TOKENS).samples
    g = lease.group_size
    samples = [msgspec.structs.replace(x, example_index=lease.example_indices[k // g],
                                       sample_index=k) for k, x in enumerate(made)]  # fmt: skip
    return RolloutPayload(lease_id=lease.lease_id, run_id=lease.run_id,
                          policy_version=lease.policy_version, samples=samples)  # fmt: skip


async def take_lease(producer: Peer, version: int = 0, run_id: str = "r1") -> Lease:
    held = {run_id: version} if version else {}
    lease = await producer.ask(LEASES, LeaseRequest(max_prompts=1, base_model="tiny",
                                                    adapter_versions=held))  # fmt: skip
    assert isinstance(lease, Lease), lease
    return lease


async def deliver(
    producer: Peer, lease: Lease, store: PayloadStore | None, claim: int | None = None
) -> int:
    """Make the lease's payload, serve it from ``store`` (None: serve nothing) and send a
    receipt claiming ``claim`` completion tokens (default: what the payload holds)."""
    payload = payload_for(lease)
    frame = seal(producer.identity, payload)
    digest = store.put(frame) if store is not None else hashlib.sha256(frame).digest()
    tokens = TOKENS * len(payload.samples)
    receipt = RolloutReceipt(
        lease_id=lease.lease_id, run_id=lease.run_id, policy_version=lease.policy_version,
        payload_hash=digest, num_samples=len(payload.samples),
        completion_tokens=tokens if claim is None else claim,
    )  # fmt: skip
    ack = await producer.ask(LEASES, receipt)
    assert isinstance(ack, ReceiptAck) and ack.outcome == "counted", ack
    return tokens


async def dealt_round(
    cluster: Cluster,
    producer: Peer,
    store: PayloadStore,
    trainers: list[Peer],
    run_id: str = "r1",
    leases: int = 1,
) -> list[TrainAssignment]:
    """Deliver ``leases`` leases per trainer at the run's current version, wait until the
    coordinator confirmed them, and have each trainer take its share of the round and commit
    to a part (``Peer.commit``: a manifest counts only after)."""
    await producer.rejoin()  # live, so the coordinator fetches its payloads from it
    version = cluster.api("GET", f"/v1/runs/{run_id}")["policy_version"]
    before = cluster.api("GET", f"/v1/runs/{run_id}")["confirmed_tokens"]
    delivered = 0
    for _ in range(leases * len(trainers)):
        delivered += await deliver(producer, await take_lease(producer, version, run_id), store)

    def confirmed() -> bool:
        return bool(cluster.api("GET", f"/v1/runs/{run_id}")["confirmed_tokens"]
                    >= before + delivered)  # fmt: skip

    await trio.to_thread.run_sync(lambda: wait_until(confirmed, 60, what="the recount"))
    shares = []
    for t in trainers:
        await t.rejoin()  # live, or it is dealt no share
    for t in trainers:
        share = await t.ask(ADAPTERS, TrainRequest(base_model="tiny"))
        assert isinstance(share, TrainAssignment), share
        shares.append(share)
    for t, share in zip(trainers, shares, strict=True):  # their parts, before the all-reduce
        ack = await t.commit(run_id, share.version, [r.lease.lease_id for r in share.rollouts])
        assert ack.accepted, ack
    return shares
