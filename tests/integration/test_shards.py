"""Adapter shards over real py-libp2p hosts: a node assembles a version from several holders,
shard by shard; a holder sending a tampered shard is banned and the shard comes from another;
what a node fetched, it serves onward (swarm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.store.adapters import assemble, cut
from node.store.shards import Penalties, fetch_version, serve_shards
from protocol.adapters import AdapterManifest
from protocol.errors import NotFound
from protocol.identity import Identity
from protocol.p2p import P2PHost
from protocol.payload_store import PayloadStore

pytestmark = pytest.mark.timeout(120)
FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes(range(256)) * 400}


def test_a_version_comes_together_from_several_holders(tmp_path: Path) -> None:
    infos, shards = cut(FILES, shard_bytes=8192)
    manifest = AdapterManifest(run_id="demo", version=1, parent_version=0,
                               base_model_hash=bytes(32), shards=infos,
                               total_bytes=sum(i.size for i in infos))  # fmt: skip
    trainer_store = PayloadStore(tmp_path / "trainer")
    for s in shards:
        trainer_store.put(s)
    liar_store = PayloadStore(tmp_path / "liar")  # holds every shard, each one tampered with
    for s in shards:
        digest = liar_store.put(s)
        path = liar_store.root / digest.hex()[:2] / digest.hex()
        path.write_bytes(bytes([s[0] ^ 1]) + s[1:])
    ids = {name: Identity.generate() for name in ("trainer", "liar", "a", "b")}
    penalties, served = Penalties(), []
    c_root = tmp_path / "c"

    async def main() -> None:
        async with (
            P2PHost.create(ids["trainer"]) as trainer, P2PHost.create(ids["liar"]) as liar,
            P2PHost.create(ids["a"]) as a, P2PHost.create(ids["b"]) as b,
        ):  # fmt: skip
            serve_shards(trainer, trainer_store)
            serve_shards(liar, liar_store, on_served=lambda n: served.append(n))  # tampered bytes
            a_store, b_store = PayloadStore(tmp_path / "a"), PayloadStore(tmp_path / "b")
            serve_shards(a, a_store)
            for node in (a, b):
                for other in (trainer, liar):
                    await node.connect(other.addrs()[0])
            await b.connect(a.addrs()[0])
            seeds = [trainer.peer_id, liar.peer_id]
            got = await fetch_version(a, ids["a"], manifest, a_store, seeds, penalties=penalties)
            assert assemble(manifest, got) == FILES
            assert penalties.banned(ids["liar"].peer_id)
            assert not penalties.banned(ids["trainer"].peer_id)
            # a banned peer is not asked again by this node
            asked = len(served)
            with pytest.raises(NotFound):
                await fetch_version(a, ids["a"], manifest, PayloadStore(tmp_path / "a2"),
                                    [ids["liar"].peer_id], penalties=penalties)  # fmt: skip
            assert len(served) == asked
            # b asks only a, which now holds what it fetched
            from_a = await fetch_version(b, ids["b"], manifest, b_store, [a.peer_id])
            assert assemble(manifest, from_a) == FILES
            with pytest.raises(NotFound):  # nobody honest to ask
                await fetch_version(b, ids["b"], manifest, PayloadStore(c_root), [liar.peer_id])

    trio.run(main)
    assert set(penalties.strikes) == {ids["liar"].peer_id}


def test_a_swarm_takes_about_one_copy_from_the_trainer(tmp_path: Path) -> None:
    infos, shards = cut(FILES, shard_bytes=4096)
    manifest = AdapterManifest(run_id="demo", version=2, parent_version=1,
                               base_model_hash=bytes(32), shards=infos,
                               total_bytes=sum(i.size for i in infos))  # fmt: skip
    seed_store = PayloadStore(tmp_path / "trainer")
    for s in shards:
        seed_store.put(s)
    uploaded = [0]

    def count(n: int) -> None:
        uploaded[0] += n

    async def main() -> None:
        ids = [Identity.generate() for _ in range(4)]
        async with (
            P2PHost.create(Identity.generate()) as trainer,
            P2PHost.create(ids[0]) as n0, P2PHost.create(ids[1]) as n1,
            P2PHost.create(ids[2]) as n2, P2PHost.create(ids[3]) as n3,
        ):  # fmt: skip
            nodes = [n0, n1, n2, n3]
            serve_shards(trainer, seed_store, on_served=count)
            stores = [PayloadStore(tmp_path / f"n{k}") for k in range(4)]
            for node, store in zip(nodes, stores, strict=True):
                serve_shards(node, store)
            everyone = [trainer, *nodes]
            for i, a in enumerate(everyone):
                for b in everyone[i + 1 :]:
                    await a.connect(b.addrs()[0])
            swarm = [n.peer_id for n in nodes]
            results: list[dict[bytes, bytes]] = []

            async def fetch(k: int) -> None:
                results.append(await fetch_version(nodes[k], ids[k], manifest, stores[k],
                                                   [trainer.peer_id], swarm))  # fmt: skip

            async with trio.open_nursery() as nursery:
                for k in range(4):
                    nursery.start_soon(fetch, k)
            assert all(assemble(manifest, got) == FILES for got in results) and len(results) == 4

    trio.run(main)
    size = sum(i.size for i in infos)
    assert size <= uploaded[0] <= 1.5 * size  # each shard left the trainer about once, not 4x
