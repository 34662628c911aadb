"""One valid instance of every wire message type: round-trip tests, fuzz seeds, benchmarks."""

from __future__ import annotations

import hashlib

import numpy as np

import protocol  # noqa: F401  (registers every message type)
from protocol.adapters import (
    AdapterManifest,
    CommitmentAck,
    Deployed,
    LeaseCount,
    ManifestAck,
    NoTraining,
    ReportAck,
    RolloutRef,
    RoundCommitment,
    RoundReport,
    SampleText,
    ShardData,
    ShardInfo,
    ShardRequest,
    TrainAssignment,
    TrainingPart,
    TrainRequest,
    VersionInfo,
    VersionRewards,
    VersionsReply,
    VersionsRequest,
)
from protocol.codec import Message
from protocol.leases import Lease, LeaseRequest, NoLease, SamplingParams
from protocol.membership import (
    Announce,
    Capabilities,
    Device,
    Goodbye,
    Heartbeat,
    JoinReply,
    JoinRequest,
    PeerRecord,
    PeersReply,
    PeersRequest,
)
from protocol.rollouts import (
    ComputeProfile,
    PayloadRequest,
    ReceiptAck,
    RolloutPayload,
    RolloutReceipt,
    Sample,
)
from protocol.runs import DilocoSpec, LoraSpec, LossSpec, RunStatus, TrainSettings
from protocol.verification import (
    AuditAssignment,
    AuditRequest,
    NoAudit,
    PartRef,
    ReplayAssignment,
    ReplayVerdict,
    Verdict,
    VerdictAck,
)

H = hashlib.sha256(b"x").digest()
PEER = "12D3KooWDqKLJN9JUJNg2HgVqrSCYR6AYm8LK57Tpgt6d2riQevu"
ADDR = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
CAPS = Capabilities(
    roles=["inference", "verifier"],
    devices=[Device("cpu", "x86_64", 8 << 30)],
    ram_bytes=24 << 30,
    cpu_count=2,
    torch_version="2.13.0",
    backends=["torch"],
    software_version="0.1.0",
    compute=ComputeProfile(backend="torch", dtype="fp32", device="cpu"),
)


def rollout_payload(total_bytes: int, tokens_per_sample: int = 512) -> RolloutPayload:
    """A payload of about ``total_bytes``: samples of uint32 token ids and float32 logprobs."""
    rng = np.random.default_rng(0)
    n = max(1, total_bytes // (tokens_per_sample * 8))
    samples = [
        Sample(
            example_index=i // 8,
            sample_index=i % 8,
            seed=1_000 + i,
            token_ids=rng.integers(0, 50_000, tokens_per_sample, dtype="<u4").tobytes(),
            logprobs=(-rng.random(tokens_per_sample, dtype=np.float32)).astype("<f4").tobytes(),
            finish_reason="length",
            reward=0.5,
        )
        for i in range(n)
    ]
    return RolloutPayload(lease_id="l-1", run_id="r-1", policy_version=3, samples=samples,
                          profile=ComputeProfile(backend="torch", dtype="bf16",
                                                 device="cuda:NVIDIA H200"))  # fmt: skip


LEASE = Lease(
    lease_id="l-1",
    run_id="r-1",
    env_id="arith",
    env_version="1",
    env_seed=1234,
    example_indices=[0, 1, 2],
    group_size=4,
    policy_version=3,
    sampling=SamplingParams(temperature=0.8, max_tokens=64),
    lease_seed=H,
    deadline_ms=1_700_000_000_000,
)

EXAMPLES: list[Message] = [
    JoinRequest(
        name="gpu-1",
        instance_id="0123456789abcdef",
        protocol_version="1.0.0",
        listen_addrs=[ADDR],
        capabilities=CAPS,
    ),
    JoinReply(accepted=True, heartbeat_interval_s=2.0, peers=[PeerRecord(PEER, [ADDR])]),
    JoinReply(accepted=False, reason="identity already connected"),
    Heartbeat(seq=7, uptime_s=12.5, load=0.3),
    Announce(name="gpu-1", listen_addrs=[ADDR], capabilities=CAPS),
    Goodbye(reason="shutdown"),
    PeersRequest(limit=16),
    PeersReply(peers=[PeerRecord(PEER, [ADDR])]),
    LeaseRequest(max_prompts=8, base_model="tiny", adapter_versions={"r-1": 3}),
    LEASE,
    NoLease(retry_after_s=2.0),
    rollout_payload(4096, tokens_per_sample=16),
    ReceiptAck(lease_id="l-1", outcome="counted", counted_examples=2),
    RolloutReceipt(
        lease_id="l-1",
        run_id="r-1",
        policy_version=3,
        payload_hash=H,
        num_samples=12,
        completion_tokens=640,
    ),
    PayloadRequest(payload_hash=H),
    AuditRequest(base_model="tiny", wait_s=5.0),
    AuditAssignment(
        audit_id="a-1",
        lease=LEASE,
        producer=PEER,
        producer_addrs=[ADDR],
        payload_hash=H,
        completion_tokens=640,
        current_version=3,
        max_staleness=1,
        deadline_ms=1,
    ),
    NoAudit(retry_after_s=1.0),
    VerdictAck(audit_id="a-1", outcome="confirming"),
    Verdict(
        audit_id="a-1",
        lease_id="l-1",
        producer=PEER,
        payload_hash=H,
        passed=False,
        failed_check="gumbel_replay",
        detail="token 17 is not the seeded sampler's pick",
        stats={"max_gap": 3.5},
    ),
    AdapterManifest(
        run_id="r-1",
        version=4,
        parent_version=3,
        base_model_hash=H,
        shards=[ShardInfo(H, 1024)],
        total_bytes=1024,
    ),
    ManifestAck(outcome="recorded", version=3),
    VersionsRequest(base_model="tiny"),
    TrainRequest(base_model="tiny"),
    NoTraining(retry_after_s=2.0),
    TrainAssignment(
        run_id="r-1",
        version=2,
        rollouts=[RolloutRef(LEASE, PEER, [ADDR], H)],
        rank=0,
        group_size=2,
        hivemind_peers=[ADDR],
        settings=TrainSettings(
            lora=LoraSpec(rank=4),
            loss=LossSpec(clip_eps=0.0),
            diloco=DilocoSpec(compression="int8"),
        ),
        next_version=5,
        parent=1,
    ),
    RoundCommitment(run_id="r-1", version=2, part_hash=H, lease_ids=["lease-1", "lease-2"]),
    CommitmentAck(accepted=False, detail="round 2 of r-1 is not dealt to you"),
    TrainingPart(run_id="r-1", version=2, levels=63, part=bytes([1, 255, 0, 63])),
    ReplayAssignment(
        audit_id="replay-1",
        run_id="r-1",
        version=2,
        parent=1,
        trainer=PEER,
        parts=[PartRef(PEER, [ADDR], H)],
        manifest=b"frame",
        holders=[PeerRecord(PEER, [ADDR])],
        rollouts=[RolloutRef(LEASE, PEER, [ADDR], H)],
        settings=TrainSettings(),
        deadline_ms=5,
    ),
    ReplayVerdict(
        audit_id="replay-1",
        trainer=PEER,
        passed=False,
        failed_check="part_replay",
        detail="3% of the part is more than a level from the replay",
        stats={"outside_band": 0.03},
    ),
    RoundReport(
        run_id="r-1",
        version=2,
        rewards=[VersionRewards(2, 64, 20.0, 20.0), VersionRewards(1, 32, 8.0, 8.0)],
        counts=[LeaseCount("lease-1", 96)],
        samples=[SampleText(version=2, prompt="1 + 2 =", completion="3", reward=1.0)],
    ),
    ReportAck(recorded=True),
    Deployed(run_id="r-1", version=3),
    VersionsReply(versions=[VersionInfo("r-1", 3, b"frame", [PeerRecord(PEER, [ADDR])], 1)]),
    ShardRequest(sha256=H),
    ShardData(sha256=H, data=b"\x00" * 1024),
    RunStatus(run_id="r-1", state="running", policy_version=4, max_staleness=2, base_model="tiny"),
]
