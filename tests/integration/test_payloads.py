"""Fetching rollout payloads from their producer over real py-libp2p hosts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from protocol.envelope import seal
from protocol.errors import BadSignature, HashMismatch, NotFound, RemoteError
from protocol.identity import Identity
from protocol.p2p import P2PHost
from protocol.payload_store import PayloadStore
from protocol.payloads import (
    PAYLOAD_PROTOCOL,
    Unserved,
    fetch_payload,
    fetch_rollout,
    serve_payloads,
)
from protocol.rollouts import PayloadRequest
from tests.examples import rollout_payload


def test_fetch_checks_hash_signature_and_type(tmp_path: Path) -> None:
    producer_id, consumer_id, impostor = (
        Identity.generate(),
        Identity.generate(),
        Identity.generate(),
    )
    store = PayloadStore(tmp_path / "payloads")
    payload = rollout_payload(256 * 1024)
    good = store.put(seal(producer_id, payload))
    forged = store.put(seal(impostor, payload))  # the right content, the wrong signer

    async def main() -> None:
        async with P2PHost.create(producer_id) as producer, P2PHost.create(consumer_id) as consumer:
            serve_payloads(producer, store)
            await consumer.connect(producer.addrs()[0])
            env = await fetch_payload(consumer, consumer_id, producer.peer_id, good)
            assert env.message == payload and env.sender == producer_id.peer_id

            with pytest.raises(BadSignature, match="not by its producer"):
                await fetch_payload(consumer, consumer_id, producer.peer_id, forged)
            with pytest.raises(RemoteError, match="not_found"):
                await fetch_payload(consumer, consumer_id, producer.peer_id, bytes(32))

            # the producer's file is tampered with on disk: the consumer refuses it
            path = store.root / good.hex()[:2] / good.hex()
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            with pytest.raises(HashMismatch, match=r"hashes to [0-9a-f]{64}, not"):
                await fetch_payload(consumer, consumer_id, producer.peer_id, good)

            # a request not signed by the peer that sends it is refused
            relayed = seal(impostor, PayloadRequest(payload_hash=good))
            with pytest.raises(RemoteError, match="decode_error"):
                await consumer.request(producer.peer_id, PAYLOAD_PROTOCOL, relayed)

    trio.run(main)
    assert hashlib.sha256(store.get(forged) or b"").digest() == forged  # the store is intact


def test_a_rollout_outlives_its_producer_at_the_peer_that_kept_it(tmp_path: Path) -> None:
    """``fetch_rollout`` asks the producer, then the keeper named in the reference's addresses
    (the coordinator keeps every rollout it counted): a crashed producer loses no rollout, and
    a keeper's copy is checked as the producer's own would be."""
    producer_id, keeper_id, consumer_id = (Identity.generate() for _ in range(3))
    payload = rollout_payload(4 * 1024)
    kept = PayloadStore(tmp_path / "kept")
    good = kept.put(seal(producer_id, payload))
    forged = kept.put(seal(keeper_id, payload))  # the keeper's own, passed off as the producer's

    async def main() -> None:
        async with P2PHost.create(producer_id) as producer:
            gone = [str(a) for a in producer.addrs()]  # its addresses outlive it
        async with P2PHost.create(keeper_id) as keeper, P2PHost.create(consumer_id) as consumer:
            serve_payloads(keeper, kept)
            addrs = [*gone, *keeper.addrs()]
            env = await fetch_rollout(consumer, consumer_id, producer_id.peer_id, addrs, good, 5)
            assert env.message == payload and env.sender == producer_id.peer_id
            with pytest.raises(NotFound, match="no source served") as e:
                await fetch_rollout(consumer, consumer_id, producer_id.peer_id, addrs, forged, 5)
            assert "BadSignature" in str(e.value)  # why each source failed is named
            kinds = [kind for kind, _ in e.value.failures]
            assert kinds == ["unavailable", "forged"] and e.value.forged  # gone; then forged
            with pytest.raises(Unserved) as e:  # no copy anywhere: nothing was forged
                await fetch_rollout(consumer, consumer_id, producer_id.peer_id, addrs, b"0" * 32, 5)
            assert [kind for kind, _ in e.value.failures] == ["unavailable"] * 2
            assert not e.value.forged
            bad = [*addrs, "/ip4/127.0.0.1/tcp/1/p2p/not-a-peer-id"]  # a lie in the addresses
            with pytest.raises(Unserved) as e:
                await fetch_rollout(consumer, consumer_id, producer_id.peer_id, bad, b"0" * 32, 5)
            assert "not a peer id" in str(e.value) and not e.value.forged

    trio.run(main)
