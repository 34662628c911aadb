"""The coordinator process: a py-libp2p host, the REST API, one trio loop.

Nodes reach it by four request protocols and the membership topic, and every request type is
dispatched by one table (``_handlers``: type → protocol and handler), so a message on the wrong
protocol is refused like an unknown one. The handlers live with what they are about:
membership (joins, peers, goodbyes, heartbeats on gossip) in ``coordinator/members.py``; leases
and receipts in ``rollouts.py``; audits and verdicts in ``auditing.py``; training rounds and
adapter versions in ``rounds.py`` — the last three over one shared state (``state.py``). What
stays here is who may ask: work goes to live members with the role, and never to a banned
producer or verifier; unaudited producers' leases are capped by address (``admission.py``).

Lifecycle: ``run()`` starts everything and reports ``started``; setting ``stop`` flushes state,
drains HTTP within a few seconds, and closes the host.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from coordinator import views
from coordinator.admission import Admission
from coordinator.api import create_app
from coordinator.auditing import Auditing
from coordinator.config import CoordinatorConfig
from coordinator.db import LeaseState, NodeStore, default_url, open_database
from coordinator.gateways import Gateways, GatewayStore
from coordinator.hivemind_dht import DhtBootstrap
from coordinator.lifecycle import RunLifecycle
from coordinator.members import Members
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.recount import Recounter, Tokenizers
from coordinator.replaying import Replaying
from coordinator.rollouts import Rollouts
from coordinator.rounds import Rounds
from coordinator.runlog import RunLog
from coordinator.state import State
from protocol.accounts import KeyStore
from protocol.accounts import open_database as open_accounts
from protocol.adapters import (
    AdapterManifest,
    Deployed,
    RoundCommitment,
    RoundReport,
    TrainingPart,
    TrainRequest,
    VersionsRequest,
)
from protocol.codec import Message
from protocol.envelope import Envelope, ReplayGuard, open_envelope, seal
from protocol.errors import (
    DecodeError,
    Forbidden,
    NotMember,
    ProtocolError,
    UnknownMessageType,
)
from protocol.gossip import GossipGate
from protocol.identity import Identity
from protocol.leases import LeaseRequest
from protocol.membership import (
    Announce,
    Goodbye,
    Heartbeat,
    JoinRequest,
    PeersRequest,
)
from protocol.p2p import P2PHost, request_cap
from protocol.payload_store import PayloadStore
from protocol.payloads import fetch_part, fetch_payload, serve_payloads
from protocol.peer_limits import RateLimit
from protocol.rollouts import RolloutReceipt
from protocol.service.http import bind_tcp, parse_host_port, serve_http
from protocol.verification import AuditRequest, ReplayVerdict, Verdict
from protocol.versions import ADAPTERS as ADAPTERS_PROTOCOL
from protocol.versions import AUDITS as AUDITS_PROTOCOL
from protocol.versions import LEASES as LEASES_PROTOCOL
from protocol.versions import MEMBERSHIP as MEMBERSHIP_PROTOCOL
from protocol.versions import MEMBERSHIP as MEMBERSHIP_TOPIC
from protocol.versions import SOFTWARE_VERSION

log = logging.getLogger(__name__)

_FRAME_CAPS = {
    MEMBERSHIP_PROTOCOL: request_cap(JoinRequest.MAX_BYTES),
    LEASES_PROTOCOL: request_cap(RolloutReceipt.MAX_BYTES),
    AUDITS_PROTOCOL: request_cap(Verdict.MAX_BYTES),
    ADAPTERS_PROTOCOL: request_cap(RoundReport.MAX_BYTES),
}
"""The request protocols the coordinator serves, each capped at its largest request."""
Handler = Callable[[str, Any, bytes], Awaitable[Message | None]]
"""``handler(peer, message, frame)``: the answer, or None for no answer."""
COORDINATOR_FILE = "coordinator.json"
"""Written to the data directory: how local nodes and the CLI find this coordinator."""


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        identity: Identity,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.identity = identity
        self.peer_id = identity.peer_id
        self.data_dir = data_dir
        self.clock = clock
        self.software_version = SOFTWARE_VERSION
        self.membership = Membership(config.membership)
        self.metrics = CoordinatorMetrics()
        engine = open_database(config.db or default_url(data_dir))
        self.accounts = KeyStore(
            open_accounts(config.accounts_db or f"sqlite:///{data_dir / 'gateway.db'}")
        )
        self.state = State(engine, config.leases, config.audits, self.metrics, clock, self.accounts,
                           config.replays)  # fmt: skip
        self.gateways = Gateways(GatewayStore(engine), identity, config.serving_token_ttl_s, clock)
        self.runs = RunLifecycle(self.state)
        self.rounds = Rounds(self.state, self.runs, self._keep_part, self._instance_of)
        self.state.replays.empty_part = self._empty_part
        self.tokenizers = tokenizers = Tokenizers(config.tokenizers)
        self.state.can_score = tokenizers.has
        self.payloads = PayloadStore(data_dir / "payloads", config.payloads_max_bytes,
                                     config.payloads_retention_s)  # fmt: skip
        self.auditing = Auditing(self.state, self.payloads)
        self.recounter = Recounter(self.state, self.auditing, self.runs, self.payloads,
                                   self.peer_id, tokenizers, config.leases.payload_deadline_s,
                                   clock)  # fmt: skip
        self.rollouts = Rollouts(self.state, self.runs, self.recounter.submit)
        self.replaying = Replaying(self.state, self.rounds, lambda p: self.members.addrs_of(p),
                                   self._sources, self.announce_deployment)  # fmt: skip
        self.gate = GossipGate(
            MEMBERSHIP_TOPIC, (Heartbeat, Announce, Goodbye), self.metrics.gossip
        )
        self.manifest_gate = GossipGate(
            ADAPTERS_PROTOCOL, (AdapterManifest, Deployed), self.metrics.gossip
        )
        self._request_guard = ReplayGuard()
        self.admission = Admission(config.admission)
        self.members = Members(
            self.membership, NodeStore(engine), self.admission, self.gate, self.metrics, clock
        )
        self._dispatch = self._handlers()
        self._log_limit = RateLimit(60.0)
        self.multiaddrs: list[str] = []
        self.http_url = ""
        self.dht = DhtBootstrap(host=_listen_host(config.listen))
        self.runlog = RunLog()
        self._dht_lock = trio.Lock()

    async def hivemind_peers(self) -> list[str]:
        """The multiaddrs of the run's hivemind DHT, started on first use (trainers join it to
        find each other for all-reduce); ``RuntimeError`` if it cannot start."""
        async with self._dht_lock:
            if not self.dht.addrs:
                # abandoned when the coordinator stops: it closes the DHT, starting or not
                await trio.to_thread.run_sync(self.dht.start, abandon_on_cancel=True)  # type: ignore[call-arg]
                log.info("hivemind DHT bootstrap at %s", " ".join(self.dht.addrs))
            return self.dht.addrs

    async def run(
        self,
        stop: trio.Event,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,  # trio-typing's stubs lack TaskStatus
    ) -> None:
        logging.getLogger("coordinator").addHandler(self.runlog)
        try:
            await self._run(stop, task_status)
        finally:
            logging.getLogger("coordinator").removeHandler(self.runlog)

    async def _run(self, stop: trio.Event, task_status: Any) -> None:
        rows = await trio.to_thread.run_sync(self.members.store.load_all)
        await trio.to_thread.run_sync(self.state.restore)
        self.auditing.pin_references()
        self.runs.resume()
        self.recounter.restore()
        self.members.restore(rows)
        host_, port = parse_host_port(self.config.http)
        sock = bind_tcp(host_, port)
        self.http_url = f"http://{_dialable(host_)}:{sock.getsockname()[1]}"
        async with P2PHost.create(
            self.identity,
            [self.config.listen],
            limits=self.config.transport,
            registry=self.metrics.registry,
        ) as host:
            self.host = self.members.host = host
            self.multiaddrs = _loopback_first(host.addrs())
            for protocol, cap in _FRAME_CAPS.items():
                host.serve(protocol, functools.partial(self._on_request, protocol), cap)
            serve_payloads(host, self.payloads)  # the copies it kept, for known-answer audits
            sub = await host.subscribe(MEMBERSHIP_TOPIC, self.gate.accept)
            manifests = await host.subscribe(ADAPTERS_PROTOCOL, self._accept_manifest)
            self._write_discovery_file()
            http_stop = trio.Event()
            async with trio.open_nursery() as http, trio.open_nursery() as loops:
                loops.start_soon(self.members.gossip_loop, sub)
                loops.start_soon(_drain, manifests)
                loops.start_soon(self.members.sweep_loop)
                loops.start_soon(self.members.flush_loop)
                loops.start_soon(self.rollouts.expire_loop)
                loops.start_soon(self.rounds.close_loop)
                loops.start_soon(self.recounter.run, self._fetch_payload)
                loops.start_soon(self._fingerprint_tokenizers)
                loops.start_soon(self.auditing.keep_references, self._fetch_payload)
                http.start_soon(serve_http, create_app(self), sock, http_stop)
                log.info(
                    "coordinator %s listening on %s; REST API on %s",
                    self.peer_id,
                    " ".join(self.multiaddrs),
                    self.http_url,
                    extra={"peer_id": self.peer_id, "http": self.http_url},
                )
                task_status.started(self)
                await stop.wait()
                loops.cancel_scope.cancel()
                http_stop.set()  # open HTTP requests get hypercorn's graceful timeout
                http.cancel_scope.deadline = trio.current_time() + 5
            with trio.move_on_after(5):
                await self.members.flush()
            self.dht.close()
            self.state.close()

    # -- requests --------------------------------------------------------------------------

    def _handlers(self) -> dict[type[Message], tuple[str, Handler]]:
        """Each request type: the protocol it arrives on, and its handler."""
        return {
            JoinRequest: (MEMBERSHIP_PROTOCOL, self.members.join),
            PeersRequest: (MEMBERSHIP_PROTOCOL, self.members.peers),
            Goodbye: (MEMBERSHIP_PROTOCOL, self.members.goodbye),
            LeaseRequest: (LEASES_PROTOCOL, self._lease),
            RolloutReceipt: (LEASES_PROTOCOL, self._receipt),
            AuditRequest: (AUDITS_PROTOCOL, self._audit),
            Verdict: (AUDITS_PROTOCOL, self._verdict),
            TrainRequest: (ADAPTERS_PROTOCOL, self._train),
            AdapterManifest: (ADAPTERS_PROTOCOL, self._manifest),
            RoundReport: (ADAPTERS_PROTOCOL, self._report),
            RoundCommitment: (ADAPTERS_PROTOCOL, self._commitment),
            ReplayVerdict: (AUDITS_PROTOCOL, self._replay_verdict),
            VersionsRequest: (ADAPTERS_PROTOCOL, self._versions),
        }

    async def _on_request(self, protocol: str, peer: str, data: bytes) -> bytes:
        """Open a signed request, hand it to its type's handler, answer it signed; refusals
        are counted and logged by reason."""
        try:
            env = open_envelope(data, self._request_guard)
            if env.sender != peer:
                raise DecodeError(f"frame signed by {env.sender} arrived from {peer}")
            on, handler = self._dispatch.get(type(env.message), ("", None))
            if on != protocol or handler is None:
                raise UnknownMessageType(f"{env.message.TYPE} is not a request on {protocol}")
            self.metrics.requests.labels(env.message.TYPE).inc()
            reply = await handler(peer, env.message, data)
        except ProtocolError as e:
            self.metrics.requests_refused.labels(e.reason).inc()
            if self._log_limit.allow((peer, e.reason)):
                log.warning("refused request from %s: %s", peer, e, extra={"peer": peer})
            raise
        return seal(self.identity, reply) if reply is not None else b""

    # -- leases --

    async def _lease(self, peer: str, msg: LeaseRequest, _: bytes) -> Message:
        self._check_member(peer, "inference")
        self.admission.lease(peer, self.host.remote_ip(peer))
        if not self._audited(peer):
            holders = views.lease_holders(self.state)
            unaudited = {h for h in holders if not self._audited(h)}
            self.admission.unaudited_lease(peer, holders, unaudited)
        trainers = len(self.members.live_with("trainer"))
        return await self.rollouts.lease(peer, msg, trainers)

    async def _receipt(self, peer: str, msg: RolloutReceipt, _: bytes) -> Message:
        return await self.rollouts.receipt(peer, msg)

    # -- audits --

    async def _audit(self, peer: str, msg: AuditRequest, _: bytes) -> Message:
        self._check_member(peer, "verifier")
        replay = self.replaying.request(peer, msg)  # trainers' rounds first: they are rarer
        if replay is not None:
            return replay
        return await self.auditing.request(peer, msg, self._sources)

    async def _replay_verdict(self, peer: str, msg: ReplayVerdict, _: bytes) -> Message:
        return await self.replaying.verdict(peer, msg)

    def _sources(self, producer: str) -> list[str]:
        """Where a payload may be fetched: its producer while it is up, then this coordinator
        (the same for every audit, so a known answer looks like any other)."""
        node = self.membership.nodes.get(producer)
        up = node is not None and node.status in ("alive", "suspect")
        return (list(node.addrs)[:12] if node and up else []) + self.multiaddrs[:4]

    async def _verdict(self, peer: str, msg: Verdict, data: bytes) -> Message:
        return await self.auditing.verdict(peer, msg, data)

    # -- training rounds and adapter versions --

    async def _train(self, peer: str, msg: TrainRequest, _: bytes) -> Message:
        self._check_member(peer, "trainer")
        # a banned trainer gets no share: a round dealt to it would wait for it in vain
        trainers = [t for t in self.members.live_with("trainer")
                    if not views.ban_reason(self.state, t)]  # fmt: skip
        try:
            dht = await self.hivemind_peers() if len(trainers) > 1 else []
        except RuntimeError as e:
            log.error("no hivemind DHT for trainers: %s", e)
            dht = []
        return await self.rounds.train(peer, msg, trainers, self.members.addrs_of, dht,
                                       self._sources)  # fmt: skip

    async def _manifest(self, peer: str, msg: AdapterManifest, data: bytes) -> Message:
        self._check_member(peer, "trainer")

        def alive(t: str) -> bool:  # asked again each second while the manifest waits
            return t in self.members.live_with("trainer") and not views.ban_reason(self.state, t)

        return await self.rounds.manifest(peer, msg, data, alive)

    def _instance_of(self, peer: str) -> str:
        node = self.membership.nodes.get(peer)
        return node.instance_id if node else ""

    async def _commitment(self, peer: str, msg: RoundCommitment, _: bytes) -> Message:
        self._check_member(peer, "trainer")
        return self.rounds.commit(peer, msg)

    async def _report(self, peer: str, msg: RoundReport, _: bytes) -> Message:
        self._check_member(peer, "trainer")
        return await self.rounds.report(peer, msg)

    async def _versions(self, peer: str, msg: VersionsRequest, _: bytes) -> Message:
        if not self.members.is_member(peer):
            raise NotMember("adapter versions are for members: join first")
        return self.rounds.versions(msg, self.members.addrs_of)

    def _empty_part(self, digest: bytes) -> bool:
        """Whether a kept part is all zeros: a round without learning signal."""
        frame = self.payloads.get(digest)
        if frame is None:
            return False
        part = open_envelope(frame, None).message
        return isinstance(part, TrainingPart) and not any(part.part)

    async def _keep_part(self, trainer: str, digest: bytes) -> bool:
        """Fetch a trainer's committed part and keep it with the payloads (served to verifiers
        replaying its round, whether or not the trainer is still up)."""
        if digest in self.payloads:
            return True
        try:
            with trio.fail_after(30):
                await self.host.connect_any(self.members.addrs_of(trainer)[:4])
                _, frame = await fetch_part(self.host, self.identity, trainer, digest, 20)
        except (ProtocolError, OSError, trio.TooSlowError) as e:
            log.warning("part %s of trainer %s not fetched: %s", digest.hex()[:12], trainer, e,
                        extra={"peer": trainer})  # fmt: skip
            return False
        self.payloads.put(frame)
        return True

    async def _fingerprint_tokenizers(self) -> None:
        """The configured tokenizers' fingerprints, for gateways (slow: a stop does not wait)."""
        fingerprint = self.tokenizers.compute_fingerprints
        await trio.to_thread.run_sync(fingerprint, abandon_on_cancel=True)  # type: ignore[call-arg]

    async def _fetch_payload(self, lease: LeaseState) -> bytes:
        """A rollout's payload frame, from its producer (for the coordinator's own count)."""
        with trio.fail_after(15):
            await self.host.connect_any(self.members.addrs_of(lease.node)[:4])
            env = await fetch_payload(self.host, self.identity, lease.node,
                                      lease.payload_hash or b"", timeout_s=10)  # fmt: skip
        return env.frame

    def _check_member(self, peer: str, role: str) -> None:
        """Work is for live members with the role, and never for a banned producer or
        verifier."""
        self.members.require(peer, role)
        banned = views.ban_reason(self.state, peer)
        if banned:
            raise Forbidden(banned)

    def _audited(self, peer: str) -> bool:
        """Has ``peer`` passed an audit (and is it not banned)?"""
        return views.has_passed_an_audit(self.state, peer)

    # -- gossip ---------------------------------------------------------------------------------

    async def announce_deployment(self, run_id: str, version: int) -> None:
        """Tell serving nodes on gossip that a run deploys a version (they sync at once)."""
        msg = Deployed(run_id=run_id, version=version)
        await self.host.publish(ADAPTERS_PROTOCOL, seal(self.identity, msg))

    def _accept_manifest(self, forwarder: str, data: bytes) -> Envelope | None:
        """Relay a trainer's manifest; one from anyone else stops here (a node's own gate
        checks the signature, the coordinator also that a trainer signed it)."""
        env = self.manifest_gate.accept(forwarder, data)
        if env is None:
            return None
        if isinstance(env.message, Deployed):
            return env if env.sender == self.peer_id else None
        if not self.members.has_role(env.sender, "trainer"):
            self.manifest_gate.refuse(forwarder, "not_a_trainer", "a manifest not from a trainer")
            return None
        return env

    def refresh_gauges(self) -> None:
        self.runs.refresh_gauges()
        self.members.refresh_gauges()

    def _write_discovery_file(self) -> None:
        path = self.data_dir / COORDINATOR_FILE
        info = {"peer_id": self.peer_id, "multiaddrs": self.multiaddrs, "http": self.http_url}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(path)


def _listen_host(multiaddr: str) -> str:
    """The IPv4 host of ``/ip4/HOST/tcp/PORT`` (where the hivemind DHT listens too)."""
    parts = multiaddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] == "ip4" else "127.0.0.1"


def _dialable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


def _loopback_first(addrs: list[str]) -> list[str]:
    return sorted(addrs, key=lambda a: not a.startswith("/ip4/127."))


async def _drain(sub: object) -> None:
    """Consume a topic this process only relays."""
    async for _ in sub:  # type: ignore[attr-defined]
        pass
