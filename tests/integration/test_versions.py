"""Adapter versions at a real coordinator process, from in-process trainer peers: a trainer's
signed manifest of the next version is recorded and moves the run to it (leases then name it and
go only to nodes that hold it); the same manifest from the round's other trainer adds a holder;
a different one for that version is a conflict; anything but the next version is stale; only
trainers may submit; versions survive a coordinator restart."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
import trio

from protocol.adapters import AdapterManifest, ManifestAck, ShardInfo
from protocol.errors import RemoteError
from protocol.identity import Identity
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.versions import protocol_id
from tests.integration.cluster import Cluster
from tests.integration.peer import LEASES, peer

pytestmark = pytest.mark.timeout(120)
ADAPTERS = protocol_id("adapters")


def manifest(version: int, parent: int, content: bytes = b"v") -> AdapterManifest:
    shard = hashlib.sha256(content + bytes([version])).digest()
    return AdapterManifest(run_id="r1", version=version, parent_version=parent,
                           base_model_hash=bytes(32), shards=[ShardInfo(shard, 100)],
                           total_bytes=100)  # fmt: skip


def test_versions_are_recorded_once_and_move_the_run(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=5.0)
    ids = {name: Identity.generate() for name in ("a", "b", "node")}
    try:
        cluster.start_coordinator()
        spec = {"run_id": "r1", "env": "arith", "total_examples": 8, "prompts_per_lease": 2,
                "group_size": 2}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)

        async def main() -> list[str]:
            outcomes = []
            async with (
                peer(cluster.multiaddr, ids["a"]) as a,
                peer(cluster.multiaddr, ids["b"]) as b,
                peer(cluster.multiaddr, ids["node"]) as node,
            ):
                await node.join(["inference"], "node")
                with pytest.raises(RemoteError, match="trainer role"):
                    await node.ask(ADAPTERS, manifest(1, 0))
                await a.join(["trainer"], "a")
                await b.join(["trainer"], "b")
                for who, m in [(a, manifest(1, 0)), (b, manifest(1, 0)),
                               (b, manifest(1, 0, b"other")), (a, manifest(3, 2)),
                               (a, manifest(2, 0))]:  # fmt: skip
                    ack = await who.ask(ADAPTERS, m)
                    assert isinstance(ack, ManifestAck)
                    outcomes.append(f"{ack.outcome}@{ack.version}")
                ask = LeaseRequest(max_prompts=2, base_model="tiny")
                assert isinstance(await node.ask(LEASES, ask), NoLease)  # it lacks version 1
                holding = LeaseRequest(max_prompts=2, base_model="tiny",
                                       adapter_versions={"r1": 1})  # fmt: skip
                lease = await node.ask(LEASES, holding)
                assert isinstance(lease, Lease) and lease.policy_version == 1
            return outcomes

        outcomes = trio.run(main)
        assert outcomes == ["recorded@1", "duplicate@1", "conflict@1", "stale@1", "stale@1"]
        versions = cluster.api("GET", "/v1/runs/r1/versions")["data"]
        assert [v["version"] for v in versions] == [1]
        assert versions[0]["holders"] == [ids["a"].peer_id, ids["b"].peer_id]
        assert cluster.api("GET", "/v1/runs/r1")["policy_version"] == 1
        assert cluster.coordinator is not None
        cluster.coordinator.signal(signal.SIGTERM)
        assert cluster.coordinator.wait(20) == 0
        cluster.start_coordinator()
        assert cluster.api("GET", "/v1/runs/r1")["policy_version"] == 1
        assert cluster.api("GET", "/v1/runs/r1/versions")["data"] == versions
    finally:
        cluster.stop_all()
