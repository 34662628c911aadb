"""Adapter shards between peers, swarm style, over py-libp2p (``/bazaar/shards/1.0.0``).

Every node that holds a version serves its shards from a content-addressed store (the same
store class as rollout payloads: files under their SHA-256). The nodes fetching a version split
it: each takes its share of the shards from a seed (a trainer) and the rest from the node whose
share they are, so the trainers' upload stays about one copy however many nodes there are
(``fetch_version``); several shards move at once, and a shard is stored — and served onward —
only after it matched the manifest's hash. A peer that sends a wrong shard is penalized
(``Penalties``: not asked again for a while) and the shard is asked of another; a peer that does
not have it (``not_found``) or cannot be reached is skipped.

Shard answers are the raw bytes, unsigned: the manifest that lists their hashes is signed by
the trainer, and a shard is only as good as that match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from node.store.adapters import check_shard
from protocol.adapters import AdapterManifest, ShardRequest
from protocol.codec import MiB
from protocol.envelope import seal
from protocol.errors import HashMismatch, NotFound, ProtocolError
from protocol.identity import Identity
from protocol.p2p import P2PHost
from protocol.payload_store import PayloadStore
from protocol.payloads import serve_by_hash
from protocol.versions import SHARDS as SHARD_PROTOCOL

log = logging.getLogger(__name__)
MAX_SHARD = 8 * MiB


class Penalties:
    """Peers this node will not fetch from for a while, and why."""

    def __init__(self, ban_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.ban_s, self.clock = ban_s, clock
        self.until: dict[str, float] = {}
        self.strikes: dict[str, int] = {}

    def penalize(self, peer: str, why: str) -> None:
        self.strikes[peer] = self.strikes.get(peer, 0) + 1
        self.until[peer] = self.clock() + self.ban_s * self.strikes[peer]
        log.warning("peer %s banned from fetches for %.0fs: %s", peer,
                    self.until[peer] - self.clock(), why, extra={"peer": peer})  # fmt: skip

    def banned(self, peer: str) -> bool:
        return self.until.get(peer, 0.0) > self.clock()


def serve_shards(
    host: P2PHost, store: PayloadStore, on_served: Callable[[int], None] = lambda n: None
) -> None:
    """Answer shard requests from ``store``; ``on_served(bytes)`` counts the upload."""
    serve_by_hash(host, SHARD_PROTOCOL, store, ShardRequest, "shard", on_served)


async def fetch_version(
    host: P2PHost,
    identity: Identity,
    manifest: AdapterManifest,
    store: PayloadStore,
    seeds: Sequence[str],
    swarm: Sequence[str] = (),
    penalties: Penalties | None = None,
    parallel: int = 4,
    timeout_s: float = 30.0,
    patience_s: float = 10.0,
) -> dict[bytes, bytes]:
    """Every shard of ``manifest`` (by hash), each checked and stored; ``NotFound`` naming the
    first shard nobody gave.

    ``seeds`` hold the whole version (its trainers); ``swarm`` are the nodes fetching it now,
    this one included. Shard ``i`` is assigned to ``sorted(swarm)[i mod n]``: that node takes it
    from a seed, every other node from that node (waiting up to ``patience_s`` for it to have
    it), so each shard leaves the seeds about once however many nodes there are; a seed is the
    fallback for everything."""
    got: dict[bytes, bytes] = {}
    limit = trio.Semaphore(parallel)
    missing: list[bytes] = []
    members = sorted(set(swarm) | {host.peer_id}) if swarm else [host.peer_id]
    penalties = penalties or Penalties()

    async def ask(peer: str, index: int) -> bytes | None:
        info = manifest.shards[index]
        if penalties.banned(peer):
            return None
        try:
            data = await host.request(
                peer, SHARD_PROTOCOL, seal(identity, ShardRequest(sha256=info.sha256)),
                max_response_bytes=MAX_SHARD, timeout_s=timeout_s,
            )  # fmt: skip
            check_shard(info, data)
        except HashMismatch as e:
            penalties.penalize(peer, f"bad shard: {e}")
            return None
        except (ProtocolError, OSError, trio.TooSlowError) as e:
            log.debug("shard %s not from %s: %s", info.sha256.hex()[:16], peer, e)
            return None
        return data

    async def patiently(peer: str, index: int) -> bytes | None:
        deadline = trio.current_time() + patience_s
        delay = 0.02
        while trio.current_time() < deadline:
            if (data := await ask(peer, index)) is not None:
                return data
            await trio.sleep(delay)  # it has not got the shard yet: ask again shortly
            delay = min(delay * 2, 0.5)
        return None

    async def one(index: int) -> None:
        info = manifest.shards[index]
        if (held := store.get(info.sha256)) is not None:
            got[info.sha256] = held
            return
        owner = members[index % len(members)]
        rotated_seeds = [seeds[(index + k) % len(seeds)] for k in range(len(seeds))]
        others = [m for m in members if m not in (owner, host.peer_id)]
        async with limit:
            data = None
            if owner != host.peer_id:
                data = await patiently(owner, index)
            for peer in [*rotated_seeds, *others] if data is None else []:
                if (data := await ask(peer, index)) is not None:
                    break
            if data is None:
                missing.append(info.sha256)
                return
            store.put(data)  # and from now on, served onward
            got[info.sha256] = data

    async with trio.open_nursery() as nursery:
        for i in range(len(manifest.shards)):
            nursery.start_soon(one, i)
    if missing:
        raise NotFound(f"no holder gave shard {missing[0].hex()} (of {len(missing)} missing)")
    return got
