"""Adapter shards between peers, swarm style, over py-libp2p (``/bazaar/shards/1.0.0``).

Every node that holds a version serves its shards from a content-addressed store (the same
store class as rollout payloads: files under their SHA-256). A node fetching a version asks the
peers that hold it, shard ``i`` first from holder ``i mod n`` (so the load spreads and the
trainers' upload does not grow with the network), several shards at once; a shard is stored —
and served onward — only after it matched the manifest's hash. A holder that sends a wrong
shard is reported (``on_bad``: its sender is penalized) and the shard is asked of the next
holder; a holder that does not have it (``not_found``) or cannot be reached is skipped.

Shard answers are the raw bytes, unsigned: the manifest that lists their hashes is signed by
the trainer, and a shard is only as good as that match.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from node.adapters import check_shard
from node.payload_store import PayloadStore
from protocol.adapters import AdapterManifest, ShardRequest
from protocol.codec import MiB
from protocol.envelope import ReplayGuard, open_envelope, seal
from protocol.errors import DecodeError, HashMismatch, NotFound, ProtocolError
from protocol.identity import Identity
from protocol.p2p import P2PHost
from protocol.versions import protocol_id

log = logging.getLogger(__name__)
SHARD_PROTOCOL = protocol_id("shards")
MAX_SHARD = 8 * MiB


def serve_shards(host: P2PHost, store: PayloadStore) -> None:
    """Answer shard requests from ``store``."""
    guard = ReplayGuard()

    async def handle(peer: str, data: bytes) -> bytes:
        env = open_envelope(data, guard)
        if env.sender != peer or not isinstance(env.message, ShardRequest):
            raise DecodeError("a shard request must be a ShardRequest signed by its sender")
        shard = store.get(env.message.sha256)
        if shard is None:
            raise NotFound(f"no shard {env.message.sha256.hex()} here")
        return shard

    host.serve(SHARD_PROTOCOL, handle, max_request_bytes=4096)


async def fetch_version(
    host: P2PHost,
    identity: Identity,
    manifest: AdapterManifest,
    holders: Sequence[str],
    store: PayloadStore,
    on_bad: Callable[[str, str], None] = lambda peer, why: None,
    parallel: int = 4,
    timeout_s: float = 30.0,
) -> dict[bytes, bytes]:
    """Every shard of ``manifest`` (by hash), each checked and stored; ``NotFound`` naming the
    first shard no holder could give."""
    got: dict[bytes, bytes] = {}
    limit = trio.Semaphore(parallel)
    missing: list[bytes] = []

    async def one(index: int) -> None:
        info = manifest.shards[index]
        if (held := store.get(info.sha256)) is not None:
            got[info.sha256] = held
            return
        async with limit:
            for k in range(len(holders)):
                peer = holders[(index + k) % len(holders)]
                try:
                    data = await host.request(
                        peer, SHARD_PROTOCOL, seal(identity, ShardRequest(sha256=info.sha256)),
                        max_response_bytes=MAX_SHARD, timeout_s=timeout_s,
                    )  # fmt: skip
                    check_shard(info, data)
                except HashMismatch as e:
                    log.warning("bad shard from %s: %s", peer, e)
                    on_bad(peer, str(e))
                    continue
                except (ProtocolError, OSError, trio.TooSlowError) as e:
                    log.info("shard %s not from %s: %s", info.sha256.hex()[:16], peer, e)
                    continue
                store.put(data)  # and from now on, served onward
                got[info.sha256] = data
                return
            missing.append(info.sha256)

    async with trio.open_nursery() as nursery:
        for i in range(len(manifest.shards)):
            nursery.start_soon(one, i)
    if missing:
        raise NotFound(f"no holder gave shard {missing[0].hex()} (of {len(missing)} missing)")
    return got
