"""A hostile peer cannot crash, stall or exhaust a coordinator or a node.

Real processes, attacked from real py-libp2p hosts in the test process:

- the malformed gossipsub frame that used to end any of our processes (11 bytes on
  ``/meshsub/1.1.0``), and random bytes on the same stream: each is a counted fault
  (``bazaar_peer_faults_total{layer="gossipsub"}``), the attacker's connection is closed, the
  process keeps serving an honest peer;
- hundreds of request streams that stop part-way through a frame, on one connection and across
  many (200 on one, 250 across ten, 48 of 1 MiB across eight): every one is let go within the
  read deadline, the process's memory comes back under the bound, and the attacker's streams
  over the per-peer cap are refused at once;
- a connection that sends nothing is closed once idle;
- what py-libp2p let through beneath our protocols: 300 connections that shake hands and leave
  (py-libp2p kept a slot of its 250 for each, for good), a yamux stream sent far past its
  receive window, a multistream-select message declared at 1 GiB.
"""

from __future__ import annotations

import random

import pytest
import trio

from protocol.versions import ADAPTERS, MEMBERSHIP
from tests.adversarial.attacks import (
    GO_AWAY,
    MESHSUB,
    attacker,
    multistream_flood,
    muxer_frames,
    offered_security,
    plaintext_session_accepted,
    protocol_stream,
    rss_mb,
    secured_session,
    stall_across,
    stall_streams,
    still_serves,
    yamux_frame,
    yamux_overrun,
)
from tests.conftest import free_port
from tests.integration.cluster import Cluster, Proc
from tests.integration.peer import peer
from tests.wait import await_until, wait_until

pytestmark = pytest.mark.timeout(240)

DEADLINE_S = 2.0
"""The read deadline the processes under attack run with (``transport.request_timeout_s``)."""
RSS_BOUND_MB = 50.0
"""How much a process may grow under these attacks and keep after them."""
CRASH_FRAME = b"\x0a\x0b\x0a\x09\x12\x07garbage"[:11]
"""An 11-byte gossipsub frame that is not a protobuf RPC (the one that killed processes)."""
LIMITS = [f"--transport.request_timeout_s={DEADLINE_S}", "--transport.idle_connection_s=3"]


def _faults(cluster: Cluster, layer: str, reason: str = "", url: str | None = None) -> float:
    labels = f'layer="{layer}"' + (f',reason="{reason}"' if reason else "")
    if reason:
        return cluster.metric("bazaar_peer_faults_total", labels, url)
    text = cluster.metric_lines("bazaar_peer_faults_total", url)
    return sum(v for k, v in text.items() if f'layer="{layer}"' in k)


def _node(cluster: Cluster) -> tuple[Proc, str, str]:
    """A node with metrics on; its process, multiaddr and metrics URL."""
    port = free_port()
    proc = cluster.start_node("n1", extra=[f"--metrics-listen=127.0.0.1:{port}", *LIMITS])
    cluster.wait_status({"n1": "alive"}, 60)
    addr = next(a for a in cluster.nodes()["n1"]["addrs"] if a.startswith("/ip4/127."))
    return proc, addr, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("target", ["coordinator", "node"])
def test_malformed_gossip_is_a_counted_fault_not_a_crash(cluster: Cluster, target: str) -> None:
    coordinator = cluster.start_coordinator(extra=LIMITS)
    proc, addr, url = coordinator, cluster.multiaddr, None
    if target == "node":
        proc, addr, url = _node(cluster)
    rng = random.Random(16)

    async def attack() -> None:
        peer = addr.rsplit("/p2p/", 1)[1]
        frames = [CRASH_FRAME] + [rng.randbytes(rng.choice([11, 64, 900])) for _ in range(4)]
        for frame in frames:
            async with attacker(addr) as host:
                out = await protocol_stream(host, peer, MESHSUB[1], frame)
                assert out.sent == len(frame), out
                # the attacker's connection is closed after the fault
                await await_until(lambda: peer not in host.connected_peers(), 10)
        assert await still_serves(cluster.multiaddr)

    trio.run(attack)
    assert proc.alive() and coordinator.alive()
    wait_until(lambda: _faults(cluster, "gossipsub", url=url) >= 1, 10, what="faults counted")
    if target == "node":
        assert cluster.statuses()["n1"] == "alive"
    lines = [line for line in proc.output().splitlines() if "gossipsub fault" in line]
    assert 1 <= len(lines) <= 12, lines  # once per (peer, reason) a minute: one peer each time


def test_stalled_streams_are_released_within_the_deadline(cluster: Cluster) -> None:
    coordinator = cluster.start_coordinator(extra=LIMITS)
    peer = cluster.peer_id
    before = rss_mb(coordinator.pid)
    released: list[float] = []
    refused: list[int] = []
    peak = [before]

    async def attack() -> None:
        async with trio.open_nursery() as nursery:
            # 200 streams on one connection: the per-peer cap (32) holds, the rest are reset
            async with attacker(cluster.multiaddr) as host:
                stall = await stall_streams(
                    host, peer, MEMBERSHIP, 200, nursery, declared=16_000, sent=8_000
                )
                await await_until(lambda: stall.held == 0, DEADLINE_S + 10)
                released.extend(r for r in stall.released_s if r is not None)
                refused.append(stall.refused)  # reset before the frame could be sent
                await stall.close()
            nursery.cancel_scope.cancel()
        # 250 across 10 connections (10 identities), each under the per-peer cap: all held
        # until the deadline
        async with stall_across(
            cluster.multiaddr, MEMBERSHIP, 10, 25, declared=16_000, sent=8_000
        ) as stalls:
            await await_until(lambda: all(s.held == 0 for s in stalls), DEADLINE_S + 10)
            for s in stalls:
                released.extend(r for r in s.released_s if r is not None)
                refused.append(s.refused)
        # and across 8 connections, 1 MiB declared, 900 kB sent on each
        async with stall_across(
            cluster.multiaddr, ADAPTERS, 8, 6, declared=1 << 20, sent=900_000
        ) as stalls:
            peak.append(rss_mb(coordinator.pid))
            await await_until(lambda: all(s.held == 0 for s in stalls), DEADLINE_S + 10)
            for s in stalls:
                released.extend(r for r in s.released_s if r is not None)
                refused.append(s.refused)
        assert await still_serves(cluster.multiaddr)

    trio.run(attack)
    assert coordinator.alive()
    assert len(released) + sum(refused) == 200 + 250 + 8 * 6
    # released by the deadline, not held: 1 s over it alone, 3 s left for a CPU shared with
    # another job (without a deadline they were held for as long as the attacker liked)
    assert max(released) <= DEADLINE_S + 3.0, sorted(released)[-5:]
    # the per-peer cap (32 requests), then the per-peer byte budget (4 x 1 MiB) held
    assert _faults(cluster, "bazaar", "read_timeout") == 32 + 250 + 8 * 4
    assert _faults(cluster, "bazaar", "too_many_streams") == 200 - 32
    assert _faults(cluster, "bazaar", "inflight_bytes") == 8 * 2
    assert max(peak) - before <= RSS_BOUND_MB, (before, peak)
    wait_until(
        lambda: rss_mb(coordinator.pid) - before <= RSS_BOUND_MB, 10, what="memory given back"
    )


def test_an_idle_connection_is_closed(cluster: Cluster) -> None:
    cluster.start_coordinator(extra=LIMITS)

    async def idle() -> None:
        async with attacker(cluster.multiaddr) as host:
            assert cluster.peer_id in host.connected_peers()
            await await_until(lambda: cluster.peer_id not in host.connected_peers(), 15)

    trio.run(idle)


def test_connection_floods_are_bounded(cluster: Cluster) -> None:
    coordinator = cluster.start_coordinator(extra=LIMITS)
    before = rss_mb(coordinator.pid)
    peak = [before]

    async def attack() -> None:
        for _ in range(300):  # more than py-libp2p's 250 inbound slots
            async with secured_session(cluster.multiaddr) as s:
                await s.write(yamux_frame(GO_AWAY, 0, 0, 0))
        assert await still_serves(cluster.multiaddr)
        overrun = await yamux_overrun(cluster.multiaddr, 64)
        peak.append(rss_mb(coordinator.pid))
        assert overrun.closed_by_target and overrun.sent < 32 << 20, overrun
        flood = await multistream_flood(cluster.multiaddr, 32)
        peak.append(rss_mb(coordinator.pid))
        assert flood.closed_by_target and flood.sent < 8 << 20, flood
        assert await still_serves(cluster.multiaddr)

    trio.run(attack)
    assert coordinator.alive()
    assert _faults(cluster, "muxer", "window_overrun") == 1
    assert _faults(cluster, "security", "handshake_failed") >= 1  # the flood's negotiation
    assert max(peak) - before <= RSS_BOUND_MB, (before, peak)


def test_only_noise_and_yamux_are_offered(cluster: Cluster) -> None:
    """Plaintext security lets a peer claim any peer id; secio, TLS and mplex are parsers
    more for nothing."""
    cluster.start_coordinator()

    async def probe() -> None:
        assert await offered_security(cluster.multiaddr) == ["/noise"]
        claim = await plaintext_session_accepted(cluster.multiaddr, cluster.peer_id)
        assert claim.error, claim
        mplex = await muxer_frames(cluster.multiaddr, [], muxer="/mplex/6.7.0")
        assert mplex.error, mplex

    trio.run(probe)


def test_one_address_cannot_hold_every_handshake_slot(cluster: Cluster) -> None:
    """Silent TCP connections, each holding a handshake open: one address gets 16 at once
    (``max_handshakes_per_address``), not py-libp2p's 250; once they time out or close, the
    address is served again."""
    cluster.start_coordinator(extra=LIMITS)
    host, port = cluster.multiaddr.split("/")[2], int(cluster.multiaddr.split("/")[4])

    async def hold() -> None:
        silent = [await trio.open_tcp_stream(host, port) for _ in range(40)]
        try:
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: _faults(cluster, "transport", "too_many_handshakes") >= 40 - 16,
                    10, what="handshakes over the cap refused",
                )
            )  # fmt: skip
        finally:
            for s in silent:
                await s.aclose()
        assert await still_serves(cluster.multiaddr)

    trio.run(hold)
    assert _faults(cluster, "transport", "too_many_handshakes") == 40 - 16


def test_identities_that_joined_and_vanished_are_forgotten(cluster: Cluster) -> None:
    """A Sybil's one-time identities do not pile up: a node dead for ``forget_after_s`` leaves
    the coordinator's table (and database), and may join again as new."""
    cluster.start_coordinator(extra=["--membership.forget_after_s=2"])

    async def join_and_vanish() -> None:
        for i in range(3):
            async with peer(cluster.multiaddr) as p:
                await p.join(["inference"], name=f"once-{i}")

    trio.run(join_and_vanish)
    assert len(cluster.nodes()) == 3
    wait_until(lambda: cluster.nodes() == {}, 20, what="vanished identities forgotten")
    assert cluster.coordinator is not None and "forgot" in cluster.coordinator.output()
    assert trio.run(still_serves, cluster.multiaddr)
