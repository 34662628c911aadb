"""Bad gossip and bad requests against a real coordinator process, from a real py-libp2p host.

The attacker runs in the test process: it joins the gossip mesh, captures a real node's
heartbeat, and sends forged, replayed, malformed, unknown-sender and off-topic frames, plus joins
with a wrong protocol version. Each is dropped and counted by reason; the coordinator logs each
(peer, reason) once per minute and keeps serving the honest node throughout.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from protocol.codec import encode_struct
from protocol.envelope import open_envelope, seal, signing_input
from protocol.errors import RemoteError
from protocol.identity import Identity
from protocol.membership import (
    Capabilities,
    Heartbeat,
    JoinReply,
    JoinRequest,
    PeersReply,
    PeersRequest,
)
from protocol.p2p import P2PHost
from protocol.rollouts import PayloadRequest
from protocol.versions import MEMBERSHIP
from tests.integration.cluster import Cluster
from tests.wait import await_until, wait_until

pytestmark = pytest.mark.timeout(180)


def _rejected(cluster: Cluster, reason: str) -> float:
    return cluster.metric("bazaar_gossip_rejected_total", f'reason="{reason}"')


def _forge(attacker: Identity, victim_key: bytes) -> bytes:
    """A heartbeat that claims to come from the victim, signed with the attacker's key."""
    header = encode_struct(
        ["1.0.0", "membership.heartbeat", victim_key, int(time.time() * 1000), os.urandom(16),
         encode_struct(Heartbeat(seq=99, uptime_s=1.0))]
    )  # fmt: skip
    return header + attacker.sign(signing_input(header))


def test_forged_replayed_and_malformed_gossip_is_dropped_and_counted(cluster: Cluster) -> None:
    cluster.start_coordinator()
    honest = cluster.start_node("honest")
    cluster.wait_status({"honest": "alive"}, 90)
    attacker = Identity.generate()
    captured: list[bytes] = []

    async def attack() -> None:
        async with P2PHost.create(attacker) as host:

            def capture(forwarder: str, data: bytes) -> bytes:
                captured.append(data)
                return data

            await host.subscribe(MEMBERSHIP, capture)
            await host.connect(cluster.multiaddr)
            await await_until(lambda: cluster.peer_id in host.gossip_peers(MEMBERSHIP), 20)
            await await_until(lambda: len(captured) >= 1, 20)  # a real heartbeat, relayed
            real = open_envelope(captured[0], None)

            for _ in range(5):
                await host.publish(MEMBERSHIP, _forge(attacker, real.sender_key))
            await host.publish(MEMBERSHIP, captured[0])  # replay
            await host.publish(MEMBERSHIP, b"\x93not an envelope")
            await host.publish(MEMBERSHIP, seal(attacker, Heartbeat(seq=1, uptime_s=1.0)))
            await host.publish(MEMBERSHIP, seal(attacker, PayloadRequest(payload_hash=bytes(32))))
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: (
                        _rejected(cluster, "bad_signature") >= 5
                        and _rejected(cluster, "replay") >= 1
                        and _rejected(cluster, "decode_error") >= 1
                        and _rejected(cluster, "unknown_sender") >= 1
                        and _rejected(cluster, "wrong_topic") >= 1
                    ),
                    30,
                    what="every bad frame counted",
                )
            )

    trio.run(attack)
    assert _rejected(cluster, "bad_signature") == 5
    assert cluster.coordinator is not None and cluster.coordinator.alive()
    assert cluster.statuses() == {"honest": "alive"}  # never confused with the forger
    assert honest.alive()
    # one log line per (peer, reason) per minute, however many frames
    forged_lines = [
        line
        for line in cluster.coordinator.output().splitlines()
        if "dropped gossip" in line and "signature does not verify" in line
    ]
    assert len(forged_lines) == 1, forged_lines


def test_bad_requests_are_refused_with_their_reason(cluster: Cluster) -> None:
    cluster.start_coordinator()
    attacker = Identity.generate()
    caps = Capabilities(
        roles=["inference"], devices=[], ram_bytes=0, cpu_count=1,
        torch_version="2.13.0", backends=["torch"], software_version="9.0.0",
    )  # fmt: skip

    def join(version: str) -> JoinRequest:
        return JoinRequest(
            name="v2-node", instance_id="feedfacecafebeef", protocol_version=version,
            listen_addrs=[], capabilities=caps,
        )  # fmt: skip

    async def probe() -> None:
        async with P2PHost.create(attacker) as host:
            await host.connect(cluster.multiaddr)
            # a node of another major version: refused, both versions named
            answer = await host.request(cluster.peer_id, MEMBERSHIP, seal(attacker, join("2.0.0")))
            reply = open_envelope(answer, None).message
            assert isinstance(reply, JoinReply) and not reply.accepted
            assert "version_mismatch" in reply.reason
            assert "2.0.0" in reply.reason and "1.0.0" in reply.reason
            # a frame signed by someone else than the stream's peer
            other = seal(Identity.generate(), join("1.0.0"))
            with pytest.raises(RemoteError, match="decode_error"):
                await host.request(cluster.peer_id, MEMBERSHIP, other)
            # a replayed request
            frame = seal(attacker, join("1.0.0"))
            await host.request(cluster.peer_id, MEMBERSHIP, frame)
            with pytest.raises(RemoteError, match="replay"):
                await host.request(cluster.peer_id, MEMBERSHIP, frame)
            with pytest.raises(RemoteError, match="decode_error"):
                await host.request(cluster.peer_id, MEMBERSHIP, b"garbage")
            # the peer list is for members only
            stranger = Identity.generate()
            async with P2PHost.create(stranger) as other:
                await other.connect(cluster.multiaddr)
                ask = seal(stranger, PeersRequest(limit=10))
                with pytest.raises(RemoteError, match=r"not_member.*members"):
                    await other.request(cluster.peer_id, MEMBERSHIP, ask)
            answer = await host.request(
                cluster.peer_id, MEMBERSHIP, seal(attacker, PeersRequest(limit=10))
            )
            assert isinstance(open_envelope(answer, None).message, PeersReply)

    trio.run(probe)
    assert cluster.metric("bazaar_joins_total", 'result="version_mismatch"') == 1
    assert cluster.metric("bazaar_requests_refused_total", 'reason="replay"') == 1
    assert cluster.statuses() == {"v2-node": "alive"}  # the one good join counted once
