"""A node's membership agent: join, heartbeat, keep a gossip mesh, reconnect, say goodbye.

- **Join.** Dial the coordinator, send a signed ``JoinRequest`` (name, a per-process instance id,
  protocol version, addresses, capabilities) and check the signed ``JoinReply`` comes from the
  coordinator we dialed. A refusal (duplicate identity, other protocol version) is final:
  ``JoinRefused`` carries the coordinator's message for the operator — except one with a
  ``retry_after_s``: this identity's previous instance, not heard from lately, is not declared
  dead yet (the node crashed and was started again), so the join is tried again after that
  wait, for about three such waits (a second live process with the same key stays refused).
  An unreachable coordinator is retried with doubling backoff.
- **Heartbeat** on the membership topic at the interval the coordinator set.
- **Mesh.** Dial the peers the coordinator names and refresh them periodically, so gossip between
  nodes carries on through a short coordinator outage.
- **Reconnect.** A watchdog notices when the coordinator connection is gone and joins again with
  the same instance id, so a restarted coordinator accepts us as the same process. It also
  joins again when the coordinator answers a request with ``not_member`` (it declared this node
  dead: its heartbeats stopped arriving while the connection stayed up, as when another process
  with the same key dialed it and was refused), over a fresh connection, so gossip starts clean.
- **Goodbye** on stop: signed, sent straight to the coordinator and on gossip.
- **Adapter manifests.** The node also keeps the adapters topic, where trainers publish each new
  version's signed manifest; every frame passes the gossip gate (signature, replay, type) and
  goes to the roles' ``on_manifest`` listeners (``node/store/versions.py``).

The node's roles (``node/roles/``, each a ``Role``) run as tasks beside these loops once the node
has joined, and reach the coordinator through ``ask``.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from node.config import NodeConfig
from protocol.adapters import AdapterManifest, Deployed
from protocol.codec import M, Message
from protocol.envelope import Envelope, ReplayGuard, open_envelope, seal
from protocol.errors import (
    DecodeError,
    NotMember,
    ProtocolError,
    RateLimited,
    RemoteError,
    VersionMismatch,
)
from protocol.gossip import GossipGate, GossipMetrics
from protocol.identity import Identity
from protocol.membership import (
    Announce,
    Capabilities,
    Goodbye,
    Heartbeat,
    JoinReply,
    JoinRequest,
    PeerRecord,
    PeersReply,
    PeersRequest,
)
from protocol.p2p import P2PHost, TransportError
from protocol.versions import ADAPTERS as ADAPTERS_TOPIC
from protocol.versions import MEMBERSHIP, PROTOCOL_VERSION

if TYPE_CHECKING:
    from node.roles.base import Role

log = logging.getLogger(__name__)

MESH_TARGET = 8
"""How many other nodes to stay connected to (gossipsub's mesh degree is 6)."""


class JoinRefused(Exception):
    """The coordinator will not have us; the message says why and what to do.
    ``retry_after_s`` > 0: it may yet (this identity's previous instance not declared dead)."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.gossip = GossipMetrics(r)
        self.heartbeats_sent = Counter("bazaar_heartbeats_sent", "Heartbeats published", registry=r)
        self.coordinator_up = Gauge(
            "bazaar_coordinator_connected", "1 while connected to the coordinator", registry=r
        )
        self.peers_connected = Gauge("bazaar_peers_connected", "Open libp2p peers", registry=r)
        self.peers_alive = Gauge(
            "bazaar_peers_alive", "Nodes whose heartbeats this node heard lately", registry=r
        )
        self.rejoins = Counter("bazaar_rejoins", "Joins after losing the coordinator", registry=r)


class NodeAgent:
    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        capabilities: Capabilities,
        coordinator_addrs: list[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not coordinator_addrs:
            raise ValueError("no coordinator address to dial")
        self.config = config
        self.identity = identity
        self.capabilities = capabilities
        self.coordinator_addrs = coordinator_addrs
        self.coordinator_id = _peer_of(coordinator_addrs[0])
        self.clock = clock
        self.name = config.name or os.uname().nodename
        self.instance_id = secrets.token_hex(8)
        self.metrics = NodeMetrics()
        self.gate = GossipGate(MEMBERSHIP, (Heartbeat, Announce, Goodbye), self.metrics.gossip)
        self.manifest_gate = GossipGate(
            ADAPTERS_TOPIC, (AdapterManifest, Deployed), self.metrics.gossip
        )
        self.on_manifest: list[Callable[[Envelope], None]] = []
        """Called with every frame heard on the adapters topic (manifests, deployments)."""
        self.interval = 2.0
        self.peers_heard: dict[str, float] = {}
        """Last heartbeat this node heard from each peer: its own view of the network."""
        self._reply_guard = ReplayGuard()
        self._started = clock()
        self._not_member = False
        """The coordinator answered ``not_member``: the watchdog joins again."""

    async def run(
        self,
        stop: trio.Event,
        roles: Sequence[Role] = (),
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,  # trio-typing's stubs lack TaskStatus
    ) -> None:
        """Join, keep membership, and run each of ``roles`` on this agent until ``stop``."""
        async with P2PHost.create(
            self.identity,
            [self.config.listen],
            limits=self.config.transport,
            registry=self.metrics.registry,
        ) as host:
            self.host = host
            sub = await host.subscribe(MEMBERSHIP, self.gate.accept)
            follows = not roles or any(role.follows_versions for role in roles)
            manifests = (await host.subscribe(ADAPTERS_TOPIC, self.manifest_gate.accept)
                         if follows else None)  # fmt: skip
            await self._join(first=True)
            async with trio.open_nursery() as nursery:
                for role in roles:
                    nursery.start_soon(role.run, self, name=f"role {role.name}")
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._gossip_loop, sub)
                if manifests is not None:
                    nursery.start_soon(self._manifest_loop, manifests)
                nursery.start_soon(self._watchdog_loop)
                nursery.start_soon(self._peers_loop)
                task_status.started(self)
                await stop.wait()
                nursery.cancel_scope.cancel()  # no rejoin may race the goodbye
            with trio.move_on_after(3):
                await self._goodbye()

    # -- joining ------------------------------------------------------------------------------

    async def _join(self, first: bool) -> None:
        backoff = 0.25
        patience: float | None = None  # until when a refusal that may pass is waited out
        while True:
            try:
                reply = await self._try_join()
                break
            except JoinRefused as e:
                # a node started again after a crash: its previous instance is still deemed
                # alive for a few heartbeats. A second process with the same key keeps it
                # alive: after three such waits that refusal is final.
                now = trio.current_time()
                patience = patience or now + 3 * e.retry_after_s + 5
                if e.retry_after_s <= 0 or now + e.retry_after_s > patience:
                    raise
                log.warning("%s; joining again in %.1fs", e, e.retry_after_s)
                await trio.sleep(e.retry_after_s)
                continue
            except (TransportError, DecodeError) as e:
                log.warning("coordinator unreachable (%s); retrying in %.1fs", e, backoff)
            except RemoteError as e:
                if e.code != RateLimited.reason:
                    raise
                log.warning("join rate-limited: %s", e.message)
                await trio.sleep(e.retry_after_s)
                continue
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)
        self.interval = reply.heartbeat_interval_s
        self.metrics.coordinator_up.set(1)
        if not first:
            self.metrics.rejoins.inc()
        log.info(
            "%s coordinator %s as '%s' (%s)",
            "joined" if first else "rejoined",
            self.coordinator_id,
            self.name,
            self.identity.peer_id,
            extra={"peer_id": self.identity.peer_id, "peers_offered": len(reply.peers)},
        )
        await self._dial_peers(reply.peers)

    async def _try_join(self) -> JoinReply:
        await self._connect_coordinator()
        req = JoinRequest(
            name=self.name,
            instance_id=self.instance_id,
            protocol_version=PROTOCOL_VERSION,
            listen_addrs=self.host.addrs(),
            capabilities=self.capabilities,
        )
        try:
            reply = await self.ask(req, JoinReply)
        except VersionMismatch as e:
            raise JoinRefused(str(e)) from None
        except RemoteError as e:
            if e.code == "version_mismatch":
                raise JoinRefused(e.message) from None
            raise
        if not reply.accepted:
            raise JoinRefused(reply.reason, reply.retry_after_s)
        return reply

    async def _connect_coordinator(self) -> None:
        errors = []
        for addr in self.coordinator_addrs:
            try:
                await self.host.connect(addr, timeout_s=5)
                return
            except TransportError as e:
                errors.append(str(e))
        raise TransportError("; ".join(errors))

    async def ask(
        self, msg: Message, expect: type[M] | tuple[type[M], ...], protocol: str = MEMBERSHIP
    ) -> M:
        """Send a signed request to the coordinator and open its signed answer.

        Roles' requests never dial a lost coordinator themselves: reconnecting is the watchdog's
        job, which also joins again (a restarted coordinator must hear the join)."""
        if protocol != MEMBERSHIP and self.coordinator_id not in self.host.connected_peers():
            raise TransportError("not connected to the coordinator (reconnecting)")
        try:
            data = await self.host.request(self.coordinator_id, protocol, seal(self.identity, msg))
        except RemoteError as e:
            self._not_member |= e.code == NotMember.reason
            raise
        env = open_envelope(data, self._reply_guard)
        if env.sender != self.coordinator_id or not isinstance(env.message, expect):
            raise DecodeError(f"unexpected {env.message.TYPE} from {env.sender}")
        return env.message

    async def announce(self, capabilities: Capabilities) -> None:
        """Tell the network this node's capabilities changed (gossip; a rejoin carries them too)."""
        self.capabilities = capabilities
        msg = Announce(name=self.name, listen_addrs=self.host.addrs(), capabilities=capabilities)
        await self.host.publish(MEMBERSHIP, seal(self.identity, msg))

    # -- loops --------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        seq = 0
        while True:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            hb = Heartbeat(seq=seq, uptime_s=self.clock() - self._started, load=load)
            await self.host.publish(MEMBERSHIP, seal(self.identity, hb))
            self.metrics.heartbeats_sent.inc()
            seq += 1
            await trio.sleep(self.interval)

    async def _gossip_loop(self, sub: object) -> None:
        async for env in sub:  # type: ignore[attr-defined]
            if env.sender == self.coordinator_id:
                continue
            if isinstance(env.message, Goodbye):
                self.peers_heard.pop(env.sender, None)
            else:
                self.peers_heard[env.sender] = self.clock()

    async def _manifest_loop(self, sub: object) -> None:
        async for env in sub:  # type: ignore[attr-defined]
            for listener in self.on_manifest:
                listener(env)

    async def publish_manifest(self, manifest: AdapterManifest) -> None:
        """Tell the network a new adapter version exists (its trainer's signed manifest)."""
        await self.host.publish(ADAPTERS_TOPIC, seal(self.identity, manifest))

    async def _watchdog_loop(self) -> None:
        while True:
            await trio.sleep(self.interval)
            now = self.clock()
            fresh = [p for p, t in self.peers_heard.items() if now - t < 3 * self.interval]
            self.metrics.peers_alive.set(len(fresh))
            self.metrics.peers_connected.set(len(self.host.connected_peers()))
            lost = self.coordinator_id not in self.host.connected_peers()
            if not (lost or self._not_member):
                continue
            self.metrics.coordinator_up.set(0)
            if lost:
                log.warning("lost the coordinator; reconnecting")
            else:
                log.warning("the coordinator no longer counts this node as a live member; "
                            "joining again over a fresh connection")  # fmt: skip
                await self.host.disconnect(self.coordinator_id)
            await self._join(first=False)
            self._not_member = False

    async def _peers_loop(self) -> None:
        while True:
            await trio.sleep(self.config.peers_refresh_s)
            try:
                reply = await self.ask(PeersRequest(limit=32), PeersReply)
            except ProtocolError as e:
                log.debug("peer refresh failed: %s", e)
                continue
            await self._dial_peers(reply.peers)

    async def _dial_peers(self, peers: list[PeerRecord]) -> None:
        connected = set(self.host.connected_peers())
        for rec in peers:
            if len(connected) > MESH_TARGET:
                return
            if rec.peer_id in connected or rec.peer_id == self.identity.peer_id:
                continue
            for addr in rec.addrs:
                try:
                    await self.host.connect(addr, timeout_s=3)
                    connected.add(rec.peer_id)
                    break
                except ProtocolError as e:
                    log.debug("could not dial peer %s at %s: %s", rec.peer_id, addr, e)

    async def _goodbye(self) -> None:
        bye = Goodbye(reason="shutdown")
        try:
            await self.host.request(
                self.coordinator_id, MEMBERSHIP, seal(self.identity, bye), timeout_s=2
            )
        except ProtocolError as e:
            log.info("goodbye to the coordinator not delivered: %s", e)
        await self.host.publish(MEMBERSHIP, seal(self.identity, bye))
        log.info("said goodbye")


def _peer_of(addr: str) -> str:
    _, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer:
        raise ValueError(f"coordinator address {addr!r} must end in /p2p/<peer id>")
    return peer
