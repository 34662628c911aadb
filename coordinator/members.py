"""The membership protocol's handlers (``/bazaar/membership/1.0.0``: ``JoinRequest`` →
``JoinReply``, ``PeersRequest`` → ``PeersReply``, ``Goodbye``) and the membership topic
(``Heartbeat``, ``Announce``, ``Goodbye`` on gossip), over the node table
(``coordinator/membership.py``) and its rows in the database.

Joins, departures and status changes are written at once; heartbeats update memory and are
flushed once per interval (a write per heartbeat would cost more than everything else the
coordinator does), so the database is never more than one interval behind and a restarted
coordinator picks up where it was. Nodes dead or gone for ``forget_after_s`` leave the table,
the database, the peerstore and the admission's address table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from coordinator.admission import Admission
from coordinator.db import NodeRow, NodeStore
from coordinator.membership import Membership, Transition
from coordinator.metrics import CoordinatorMetrics
from protocol.codec import Message
from protocol.errors import Forbidden, NotMember, RateLimited
from protocol.gossip import GossipGate
from protocol.membership import Announce, Goodbye, Heartbeat, JoinRequest, PeersReply, PeersRequest
from protocol.p2p import P2PHost

log = logging.getLogger(__name__)


class Members:
    def __init__(
        self,
        table: Membership,
        store: NodeStore,
        admission: Admission,
        gate: GossipGate,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.table = table
        self.store = store
        self.admission = admission
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.host: P2PHost | None = None
        """Set once the coordinator's host is up (addresses of peers, forgetting them)."""
        self._dirty: set[str] = set()

    def restore(self, rows: list[NodeRow]) -> None:
        self.table.restore(rows, self.clock())
        if rows:
            log.info("restored %d nodes from the database", len(rows))

    # -- who may do what ------------------------------------------------------------------------

    def require(self, peer: str, role: str) -> None:
        """``NotMember`` unless ``peer`` is a live member, ``Forbidden`` unless it has ``role``."""
        node = self.table.nodes.get(peer)
        if node is None or node.status in ("left", "dead"):
            raise NotMember(f"{role} work is for live members: join first")
        if role not in node.capabilities.roles:
            raise Forbidden(f"{role} work is for nodes with the {role} role")

    def has_role(self, peer: str, role: str) -> bool:
        node = self.table.nodes.get(peer)
        return node is not None and role in node.capabilities.roles

    def is_member(self, peer: str) -> bool:
        return peer in self.table.nodes

    def live_with(self, role: str) -> list[str]:
        """The live members with ``role``, sorted by peer id."""
        return sorted(p for p, n in self.table.nodes.items()
                      if n.status == "alive" and role in n.capabilities.roles)  # fmt: skip

    def addrs_of(self, peer: str) -> list[str]:
        node = self.table.nodes.get(peer)
        return list(node.addrs) if node else []

    # -- the membership protocol ----------------------------------------------------------------

    async def join(self, peer: str, req: JoinRequest, _: bytes) -> Message:
        assert self.host is not None
        try:
            self.admission.join(peer, self.host.remote_ip(peer))
        except RateLimited:
            self.metrics.joins.labels("rate_limited").inc()
            raise
        reply, transition = self.table.join(peer, req, req.instance_id, self.clock())
        result = "accepted" if reply.accepted else reply.reason.split(":", 1)[0]
        self.metrics.joins.labels(result).inc()
        if reply.accepted:
            await self._apply(transition)
        else:
            log.warning("refused join of %s (%s): %s", req.name, peer, reply.reason)
        return reply

    async def peers(self, peer: str, msg: PeersRequest, _: bytes) -> Message:
        member = self.table.nodes.get(peer)
        if member is None or member.status in ("left", "dead"):
            raise NotMember("the peer list is for live members: join first")
        return PeersReply(peers=self.table.live_peers(peer, self.clock(), limit=msg.limit))

    async def goodbye(self, peer: str, msg: Goodbye, _: bytes) -> None:
        await self._apply(self.table.goodbye(peer))

    # -- gossip, sweeping, persistence ----------------------------------------------------------

    async def gossip_loop(self, sub: object) -> None:
        async for env in sub:  # type: ignore[attr-defined]
            msg, peer = env.message, env.sender
            if isinstance(msg, Heartbeat):
                result = self.table.heartbeat(peer, msg, self.clock())
                if result is False:
                    self.gate.refuse(
                        peer, "unknown_sender", "heartbeat from a node that has not joined"
                    )
                    continue
                self._dirty.add(peer)
                if isinstance(result, Transition):
                    await self._apply(result)
            elif isinstance(msg, Goodbye):
                await self._apply(self.table.goodbye(peer))
            elif isinstance(msg, Announce) and self.table.announce(peer, msg):
                await self._persist(peer)

    async def sweep_loop(self) -> None:
        period = max(0.05, self.table.interval / 10)
        while True:
            for t in self.table.sweep(self.clock()):
                await self._apply(t)
            gone = self.table.forget(self.clock())
            if gone:
                self._dirty.difference_update(gone)
                await trio.to_thread.run_sync(self.store.delete, gone)
                for peer_id in gone:
                    if self.host is not None:
                        self.host.forget(peer_id)
                    self.admission.address_of.pop(peer_id, None)
                log.info("forgot %d nodes dead or gone for %.0fs", len(gone),
                         self.table.config.forget_after_s)  # fmt: skip
            await trio.sleep(period)

    async def flush_loop(self) -> None:
        while True:
            await trio.sleep(self.table.interval)
            await self.flush()

    async def flush(self) -> None:
        """Write the heartbeats seen since the last flush."""
        dirty, self._dirty = self._dirty, set()
        nodes = self.table.nodes
        seen = {p: (nodes[p].last_seen, nodes[p].heartbeats, nodes[p].status) for p in dirty}
        await trio.to_thread.run_sync(self.store.touch, seen)

    async def _persist(self, peer_id: str) -> None:
        """Write a node's current state to the database now."""
        row = self.table.nodes[peer_id].to_row()
        await trio.to_thread.run_sync(self.store.upsert, [row])

    async def _apply(self, t: Transition | None) -> None:
        """Persist a node's new state now, and log and count a change of status."""
        if t is None:
            return
        await self._persist(t.peer_id)
        node = self.table.nodes[t.peer_id]
        if t.old != t.new:
            self.metrics.transitions.labels(t.new).inc()
            log.info("node %s (%s) %s -> %s", node.name, t.peer_id, t.old or "new", t.new,
                     extra={"peer": t.peer_id, "status": t.new})  # fmt: skip

    def refresh_gauges(self) -> None:
        for status, n in self.table.counts().items():
            self.metrics.nodes.labels(status).set(n)
