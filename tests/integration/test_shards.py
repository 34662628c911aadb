"""Adapter shards over real py-libp2p hosts: a node assembles a version from several holders,
shard by shard; a holder sending a tampered shard is reported and the shard comes from another;
what a node fetched, it serves onward (swarm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.adapters import assemble, cut
from node.payload_store import PayloadStore
from node.shards import fetch_version, serve_shards
from protocol.adapters import AdapterManifest
from protocol.errors import NotFound
from protocol.identity import Identity
from protocol.p2p import P2PHost

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
    reported: list[str] = []
    c_root = tmp_path / "c"

    async def main() -> None:
        async with (
            P2PHost.create(ids["trainer"]) as trainer, P2PHost.create(ids["liar"]) as liar,
            P2PHost.create(ids["a"]) as a, P2PHost.create(ids["b"]) as b,
        ):  # fmt: skip
            serve_shards(trainer, trainer_store)
            serve_shards(liar, liar_store)  # it serves the tampered bytes under true hashes
            a_store, b_store = PayloadStore(tmp_path / "a"), PayloadStore(tmp_path / "b")
            serve_shards(a, a_store)
            for node in (a, b):
                for other in (trainer, liar):
                    await node.connect(other.addrs()[0])
            await b.connect(a.addrs()[0])
            holders = [trainer.peer_id, liar.peer_id]
            got = await fetch_version(a, ids["a"], manifest, holders, a_store,
                                      on_bad=lambda peer, why: reported.append(peer))  # fmt: skip
            assert assemble(manifest, got) == FILES
            # b asks only a, which now holds what it fetched
            from_a = await fetch_version(b, ids["b"], manifest, [a.peer_id], b_store)
            assert assemble(manifest, from_a) == FILES
            with pytest.raises(NotFound):  # nobody honest to ask
                await fetch_version(b, ids["b"], manifest, [liar.peer_id], PayloadStore(c_root))

    trio.run(main)
    assert reported and set(reported) == {ids["liar"].peer_id}
