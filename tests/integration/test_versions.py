"""Adapter versions at a real coordinator process, from in-process trainer peers: the manifest
of the next version signed by every trainer of the round is recorded and moves the run to it
(leases then name it and go only to nodes that hold it; its trainers are its holders); a
different one for that version is a conflict; anything but the next version is stale; only
trainers may submit, and only those the round was dealt to (another is struck); versions
survive a coordinator restart. A real node process that lacks the
current version fetches it from the trainer's shards, works at it, and becomes a holder; a newer
version's manifest published on gossip makes it fetch that one at once."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
import trio

from node.store.adapters import cut, read_files
from protocol.adapters import (
    AdapterManifest,
    ManifestAck,
    ShardInfo,
    TrainAssignment,
    TrainRequest,
    VersionsReply,
    VersionsRequest,
)
from protocol.envelope import seal
from protocol.errors import RemoteError
from protocol.identity import Identity
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.payload_store import PayloadStore
from protocol.payloads import serve_payloads
from protocol.versions import ADAPTERS, LEASES
from tests.integration.cluster import Cluster
from tests.integration.peer import Peer, peer
from tests.integration.rounds import dealt_round
from tests.lora import random_adapter
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(120)


def manifest(version: int, parent: int, content: bytes = b"v") -> AdapterManifest:
    shard = hashlib.sha256(content + bytes([version])).digest()
    return AdapterManifest(run_id="r1", version=version, parent_version=parent,
                           base_model_hash=bytes(32), shards=[ShardInfo(shard, 100)],
                           total_bytes=100)  # fmt: skip


def test_versions_are_recorded_once_and_move_the_run(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=5.0)
    ids = {name: Identity.generate() for name in ("a", "b", "node", "c")}
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=1"])
        spec = {"name": "r1", "env": {"name": "arith"},
                "rl": {"max_examples": 8, "prompts_per_lease": 2, "group_size": 2},
                "verification": {"trusted_only": False}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)

        async def main() -> list[str]:
            outcomes: list[str] = []
            async with (
                peer(cluster.multiaddr, ids["a"]) as a,
                peer(cluster.multiaddr, ids["b"]) as b,
                peer(cluster.multiaddr, ids["node"]) as node,
                peer(cluster.multiaddr, ids["c"]) as c,
            ):
                await node.join(["inference"], "node")
                with pytest.raises(RemoteError, match="trainer role"):
                    await node.ask(ADAPTERS, manifest(1, 0))
                await a.join(["trainer"], "a")
                await b.join(["trainer"], "b")
                payloads = PayloadStore(tmp_path / "node-payloads")
                serve_payloads(node.host, payloads)
                await dealt_round(cluster, node, payloads, [a, b])
                await c.join(["trainer"], "c")  # a trainer, but not of this round

                async def sign(who: Peer, m: AdapterManifest) -> None:
                    ack = await who.ask(ADAPTERS, m)
                    assert isinstance(ack, ManifestAck)
                    outcomes.append(f"{ack.outcome}@{ack.version}")

                async with trio.open_nursery() as both:  # the round's trainers, at once
                    both.start_soon(sign, a, manifest(1, 0))
                    both.start_soon(sign, b, manifest(1, 0))
                for who, m in [(b, manifest(1, 0, b"other")), (a, manifest(3, 2)),
                               (a, manifest(2, 0)), (c, manifest(2, 1))]:  # fmt: skip
                    await sign(who, m)
                ask = LeaseRequest(max_prompts=2, base_model="tiny")
                assert isinstance(await node.ask(LEASES, ask), NoLease)  # it lacks version 1
                holding = LeaseRequest(max_prompts=2, base_model="tiny",
                                       adapter_versions={"r1": 1})  # fmt: skip
                lease = await node.ask(LEASES, holding)
                assert isinstance(lease, Lease) and lease.policy_version == 1
            return outcomes

        outcomes = trio.run(main)
        assert outcomes == ["recorded@1", "recorded@1", "conflict@1", "stale@1", "stale@1",
                            "not_dealt@1"]  # fmt: skip
        versions = cluster.api("GET", "/v1/runs/r1/versions")["data"]
        assert [v["version"] for v in versions] == [1]
        assert sorted(versions[0]["holders"]) == sorted([ids["a"].peer_id, ids["b"].peer_id])
        assert cluster.nodes()["c"]["trust"]["strikes"] == 1  # the outsider's manifest
        assert cluster.api("GET", "/v1/runs/r1")["policy_version"] == 1
        assert cluster.coordinator is not None
        cluster.coordinator.signal(signal.SIGTERM)
        assert cluster.coordinator.wait(20) == 0
        cluster.start_coordinator()
        assert cluster.api("GET", "/v1/runs/r1")["policy_version"] == 1
        assert cluster.api("GET", "/v1/runs/r1/versions")["data"] == versions
    finally:
        cluster.stop_all()


def test_a_node_fetches_the_current_version_and_works_at_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    files = read_files(random_adapter(tiny_model, tmp_path / "lora", seed=5))
    infos, shards = cut(files, shard_bytes=16384)
    trainer_id = Identity.generate()
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=1"])
        spec = {"name": "r1", "env": {"name": "arith", "args": {"digits": 2}},
                "rl": {"max_examples": 1000, "prompts_per_lease": 2, "group_size": 2},
                "verification": {"trusted_only": False}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)

        async def main() -> None:
            async with (
                peer(cluster.multiaddr, trainer_id) as trainer,
                peer(cluster.multiaddr) as producer,
            ):
                await trainer.join(["trainer"], "trainer")
                await producer.join(["inference"], "producer")
                payloads = PayloadStore(tmp_path / "producer")
                serve_payloads(producer.host, payloads)
                store = PayloadStore(tmp_path / "trainer-shards")
                for s in shards:
                    store.put(s)
                trainer.serve_shards(store)
                await dealt_round(cluster, producer, payloads, [trainer])
                m = AdapterManifest(run_id="r1", version=1, parent_version=0,
                                    base_model_hash=bytes(32), shards=infos,
                                    total_bytes=sum(i.size for i in infos))  # fmt: skip
                ack = await trainer.ask(ADAPTERS, m)
                assert isinstance(ack, ManifestAck) and ack.outcome == "recorded"
                node = cluster.start_node("n", extra=[f"--model_cache={tiny_model.parent.parent}"])
                held = node.home / "adapters" / "r1" / "1" / "adapter_model.safetensors"

                def delivered() -> bool:  # 2 examples by the producer at v0, then the node's
                    return bool(cluster.api("GET", "/v1/runs/r1")["examples_delivered"] >= 4)

                await trio.to_thread.run_sync(lambda: wait_until(delivered, 120, what="work at v1"))
                assert held.read_bytes() == files["adapter_model.safetensors"]
                reply = await trainer.ask(ADAPTERS, VersionsRequest(base_model="tiny"))
                assert isinstance(reply, VersionsReply)
                (info,) = reply.versions
                assert info.version == 1 and info.seeds == 1
                assert info.holders[0].peer_id == trainer_id.peer_id
                assert len(info.holders) == 2  # the node now holds it too, for others to fetch

                # version 2, trained on the node's rollouts, once the run is cancelled: no lease
                # or sync asks for it, only the manifest on gossip tells the node
                await trainer.join(["trainer"], "trainer")  # it sent no heartbeats: dead by now

                async def round_one() -> None:
                    while not isinstance(
                        got := await trainer.ask(ADAPTERS, TrainRequest(base_model="tiny")),
                        TrainAssignment,
                    ):
                        await trio.sleep(0.3)
                    ids = [r.lease.lease_id for r in got.rollouts]
                    assert (await trainer.commit("r1", got.version, ids)).accepted

                with trio.fail_after(60):
                    await round_one()
                cluster.api("POST", "/v1/runs/r1/cancel")
                files2 = read_files(random_adapter(tiny_model, tmp_path / "lora2", seed=6))
                infos2, shards2 = cut(files2, shard_bytes=16384)
                for s in shards2:
                    store.put(s)
                m2 = AdapterManifest(run_id="r1", version=2, parent_version=1,
                                     base_model_hash=bytes(32), shards=infos2,
                                     total_bytes=sum(i.size for i in infos2))  # fmt: skip
                await trainer.join(["trainer"], "trainer")  # it sent no heartbeats: dead by now
                ack = await trainer.ask(ADAPTERS, m2)
                assert isinstance(ack, ManifestAck) and ack.outcome == "recorded"
                await trainer.host.publish(ADAPTERS, seal(trainer_id, m2))
                held2 = node.home / "adapters" / "r1" / "2" / "adapter_model.safetensors"
                await trio.to_thread.run_sync(
                    lambda: wait_until(held2.exists, 15, what="v2 fetched on its manifest")
                )
                assert held2.read_bytes() == files2["adapter_model.safetensors"]

        trio.run(main)
        node_id = cluster.nodes()["n"]["peer_id"]
        rollouts = [r for r in cluster.api("GET", "/v1/runs/r1/rollouts")["data"]
                    if r["producer"] == node_id]  # fmt: skip
        assert rollouts and all(r["lease"]["policy_version"] == 1 for r in rollouts)
    finally:
        cluster.stop_all()
