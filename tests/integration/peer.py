"""An in-process network peer for tests: a real py-libp2p host with its own identity that
speaks our signed request protocols to a coordinator process (to join, take leases, send
receipts — honestly or not)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from node.store.shards import serve_shards
from protocol.adapters import CommitmentAck, RoundCommitment, TrainingPart
from protocol.codec import Message
from protocol.envelope import open_envelope, seal
from protocol.identity import Identity
from protocol.membership import Capabilities, JoinReply, JoinRequest
from protocol.p2p import P2PHost
from protocol.payload_store import PayloadStore
from protocol.versions import ADAPTERS, MEMBERSHIP, PROTOCOL_VERSION


def capabilities(roles: list[str]) -> Capabilities:
    return Capabilities(
        roles=roles, devices=[], ram_bytes=0, cpu_count=1,  # type: ignore[arg-type]
        torch_version="2.13.0", backends=["torch"], software_version="0.1.0",
    )  # fmt: skip


class Peer:
    def __init__(self, host: P2PHost, identity: Identity, coordinator: str) -> None:
        self.host, self.identity, self.coordinator = host, identity, coordinator
        # one "process" per identity: the same instance id whenever this identity joins
        self.instance_id = hashlib.sha256(identity.peer_id.encode()).hexdigest()[:16]
        self.joined: tuple[list[str], str] | None = None
        self.shards: PayloadStore | None = None

    def serve_shards(self, store: PayloadStore | None = None) -> PayloadStore:
        """Serve adapter shards (and training parts) from ``store`` (a new one if None)."""
        if self.shards is None:
            fresh = PayloadStore(Path(tempfile.mkdtemp(prefix="peer-shards-")))
            self.shards = store if store is not None else fresh  # an empty store is falsy
            serve_shards(self.host, self.shards)
        return self.shards

    async def commit(self, run_id: str, version: int, lease_ids: list[str]) -> CommitmentAck:
        """Commit to a (made-up) part of a round, and serve it: what a trainer does before
        its all-reduce, so that its manifest counts."""
        part = TrainingPart(run_id=run_id, version=version, levels=63, part=bytes(16))
        digest = self.serve_shards().put(seal(self.identity, part))
        commitment = RoundCommitment(run_id, version, digest, lease_ids)
        ack = await self.ask(ADAPTERS, commitment)
        assert isinstance(ack, CommitmentAck), ack
        return ack

    async def ask(self, protocol: str, msg: Message) -> Message:
        """A signed request to the coordinator; its signed answer (``RemoteError`` if refused)."""
        data = await self.host.request(self.coordinator, protocol, seal(self.identity, msg))
        env = open_envelope(data, None)
        assert env.sender == self.coordinator
        return env.message

    async def join(self, roles: list[str], name: str = "test-peer") -> None:
        """Join as one node process: rejoining after a coordinator restart is accepted."""
        req = JoinRequest(
            name=name, instance_id=self.instance_id, protocol_version=PROTOCOL_VERSION,
            listen_addrs=self.host.addrs(), capabilities=capabilities(roles),
        )  # fmt: skip
        reply = await self.ask(MEMBERSHIP, req)
        assert isinstance(reply, JoinReply) and reply.accepted, reply
        self.joined = (roles, name)

    async def rejoin(self) -> None:
        """Join again as before: an in-process peer sends no heartbeats, so a coordinator with
        a short interval soon counts it dead."""
        assert self.joined is not None, "join first"
        await self.join(*self.joined)


@asynccontextmanager
async def peer(coordinator_addr: str, identity: Identity | None = None) -> AsyncIterator[Peer]:
    identity = identity or Identity.generate()
    async with P2PHost.create(identity, ["/ip4/127.0.0.1/tcp/0"]) as host:
        await host.connect(coordinator_addr)
        yield Peer(host, identity, coordinator_addr.rsplit("/p2p/", 1)[1])
