"""The membership table: who is in the network and whether they are alive.

Pure logic over an injected clock, so its rules are tested without sockets. A node is

    alive    heartbeats arriving
    suspect  no heartbeat for ``suspect_after_missed`` intervals
    dead     no heartbeat for ``dead_after_missed`` intervals (a heartbeat revives it)
    left     it said goodbye; it must join again to come back

A join is refused when the node speaks another major protocol version, or when its peer id is
already held by a live node process with another instance id (two processes sharing one key
file). After a coordinator restart, nodes restored from the database get a full detection window,
counted from the restart, to reconnect before anyone is declared dead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from coordinator.config import MembershipConfig
from coordinator.db import NodeRow
from protocol.errors import VersionMismatch
from protocol.membership import (
    Announce,
    Capabilities,
    Heartbeat,
    JoinReply,
    JoinRequest,
    PeerRecord,
)
from protocol.versions import check_version

Status = Literal["alive", "suspect", "dead", "left"]


@dataclass
class NodeState:
    peer_id: str
    name: str
    instance_id: str
    capabilities: Capabilities
    addrs: list[str]
    protocol_version: str
    status: Status
    first_seen: float
    last_seen: float
    heartbeats: int = 0
    live_since: float = field(default=0.0)
    """Liveness is measured from max(last_seen, live_since): a restart's grace window."""

    def to_row(self) -> NodeRow:
        return NodeRow(
            peer_id=self.peer_id,
            name=self.name,
            instance_id=self.instance_id,
            roles=list(self.capabilities.roles),
            capabilities=msgspec.to_builtins(self.capabilities),
            addrs=self.addrs,
            protocol_version=self.protocol_version,
            software_version=self.capabilities.software_version,
            status=self.status,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            heartbeats=self.heartbeats,
        )

    @classmethod
    def from_row(cls, row: NodeRow) -> NodeState:
        return cls(
            peer_id=row.peer_id,
            name=row.name,
            instance_id=row.instance_id,
            capabilities=msgspec.convert(row.capabilities, Capabilities),
            addrs=list(row.addrs),
            protocol_version=row.protocol_version,
            status=row.status,  # type: ignore[arg-type]
            first_seen=row.first_seen,
            last_seen=row.last_seen,
            heartbeats=row.heartbeats,
        )

    def view(self, now: float) -> dict[str, object]:
        """The JSON shape served at ``/v1/network/nodes`` (open to anyone: the serving URL is
        left out, it is for admitted gateways, ``/v1/network/routes``)."""
        caps = self.capabilities
        gpus = [d for d in caps.devices if d.kind == "cuda"]
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "status": self.status,
            "roles": list(caps.roles),
            "device": gpus[0].name if gpus else "cpu",
            "devices": msgspec.to_builtins(caps.devices),
            "ram_bytes": caps.ram_bytes,
            "backends": list(caps.backends),
            "torch_version": caps.torch_version,
            "version": caps.software_version,
            "protocol_version": self.protocol_version,
            "addrs": self.addrs,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "last_seen_ago_s": round(max(0.0, now - self.last_seen), 3),
            "heartbeats": self.heartbeats,
            "serving_models": list(caps.serving_models),
        }


@dataclass(frozen=True)
class Transition:
    peer_id: str
    old: Status | None
    new: Status


class Membership:
    def __init__(self, config: MembershipConfig) -> None:
        self.config = config
        self.nodes: dict[str, NodeState] = {}

    @property
    def interval(self) -> float:
        return self.config.heartbeat_interval_s

    def restore(self, rows: list[NodeRow], now: float) -> None:
        for row in rows:
            node = NodeState.from_row(row)
            node.live_since = now
            self.nodes[node.peer_id] = node

    def join(
        self, peer_id: str, req: JoinRequest, instance_id: str, now: float
    ) -> tuple[JoinReply, Transition | None]:
        try:
            check_version(req.protocol_version)
        except VersionMismatch as e:
            return JoinReply(accepted=False, reason=f"version_mismatch: {e}"), None
        old = self.nodes.get(peer_id)
        if old is not None and old.instance_id != instance_id and self._live(old, now):
            # another process with this key, or this one's previous instance that crashed and
            # has not been silent for long enough yet. One already overdue (suspect) is likely
            # the latter: the answer says when it will no longer count. One beating on time is
            # a twin: final (a twin told to retry would displace its connection, silence its
            # beats, and take its place).
            ago = now - old.last_seen
            wait = self._window - (now - max(old.last_seen, old.live_since))
            overdue = ago > self.interval * self.config.suspect_after_missed
            return JoinReply(
                accepted=False,
                reason=(
                    f"duplicate_identity: peer id {peer_id} is already connected as "
                    f"'{old.name}' (last heartbeat {ago:.1f}s ago). Is another node running "
                    f"with the same key file? Stop it, or wait {wait:.0f}s for it to be "
                    f"declared dead."
                ),
                retry_after_s=min(max(wait, 0.0) + 0.5, 3600.0) if overdue else 0.0,
            ), None
        node = NodeState(
            peer_id=peer_id,
            name=req.name,
            instance_id=instance_id,
            capabilities=req.capabilities,
            addrs=list(req.listen_addrs),
            protocol_version=req.protocol_version,
            status="alive",
            first_seen=old.first_seen if old else now,
            last_seen=now,
            heartbeats=old.heartbeats if old else 0,
        )
        self.nodes[peer_id] = node
        reply = JoinReply(
            accepted=True,
            heartbeat_interval_s=self.interval,
            peers=self.live_peers(exclude=peer_id, now=now),
        )
        return reply, Transition(peer_id, old.status if old else None, "alive")

    def heartbeat(self, peer_id: str, hb: Heartbeat, now: float) -> Transition | bool | None:
        """Record a beat. False for an unknown (or departed) sender; a Transition on revival."""
        node = self.nodes.get(peer_id)
        if node is None or node.status == "left":
            return False
        node.last_seen = now
        node.heartbeats += 1
        if node.status != "alive":
            old, node.status = node.status, "alive"
            return Transition(peer_id, old, "alive")
        return None

    def announce(self, peer_id: str, msg: Announce) -> bool:
        """New capabilities or addresses of a known node; False for an unknown sender."""
        node = self.nodes.get(peer_id)
        if node is None:
            return False
        node.capabilities, node.addrs = msg.capabilities, list(msg.listen_addrs)
        return True

    def goodbye(self, peer_id: str) -> Transition | None:
        node = self.nodes.get(peer_id)
        if node is None or node.status == "left":
            return None
        old, node.status = node.status, "left"
        return Transition(peer_id, old, "left")

    def sweep(self, now: float) -> list[Transition]:
        """Move silent nodes to suspect and dead."""
        out = []
        for node in self.nodes.values():
            if node.status in ("left", "dead"):
                continue
            silent = now - max(node.last_seen, node.live_since)
            new: Status = "alive"
            if silent > self.interval * self.config.dead_after_missed:
                new = "dead"
            elif silent > self.interval * self.config.suspect_after_missed:
                new = "suspect"
            if new != node.status:
                out.append(Transition(node.peer_id, node.status, new))
                node.status = new
        return out

    def forget(self, now: float) -> list[str]:
        """Drop nodes dead or gone for ``forget_after_s``; their peer ids."""
        gone = [
            n.peer_id
            for n in self.nodes.values()
            if n.status in ("left", "dead") and now - n.last_seen > self.config.forget_after_s
        ]
        for peer_id in gone:
            del self.nodes[peer_id]
        return gone

    def live_peers(self, exclude: str, now: float, limit: int | None = None) -> list[PeerRecord]:
        live = [n for n in self.nodes.values() if n.peer_id != exclude and self._live(n, now)]
        random.shuffle(live)
        limit = self.config.peers_per_reply if limit is None else limit
        return [PeerRecord(n.peer_id, n.addrs) for n in live[:limit]]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("alive", "suspect", "dead", "left"), 0)
        for n in self.nodes.values():
            out[n.status] += 1
        return out

    @property
    def _window(self) -> float:
        """How long a live node may stay silent."""
        return self.interval * self.config.dead_after_missed

    def _live(self, node: NodeState, now: float) -> bool:
        silent = now - max(node.last_seen, node.live_since)
        return node.status in ("alive", "suspect") and silent <= self._window
