"""Membership messages: how a node joins, stays alive and leaves.

A node sends ``JoinRequest`` to the coordinator over the join protocol and gets a ``JoinReply``;
then it publishes ``Heartbeat`` on the membership gossip topic every interval, and ``Goodbye`` on
shutdown. ``Capabilities`` describes what a node can do; it rides in the join request and is
re-announced with ``Announce`` when it changes.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from protocol.codec import KiB, Message, Multiaddr, Name, NonNegInt, PeerIdStr, Text
from protocol.rollouts import ComputeProfile

Role = Literal["inference", "trainer", "verifier"]
ROLES: tuple[Role, ...] = ("inference", "trainer", "verifier")


class Device(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One compute device: ``cpu`` or a CUDA GPU."""

    kind: Literal["cpu", "cuda"]
    name: Name
    memory_bytes: NonNegInt


class Capabilities(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a node offers: devices, memory, software and the roles it takes."""

    roles: Annotated[list[Role], msgspec.Meta(max_length=3)]
    devices: Annotated[list[Device], msgspec.Meta(max_length=64)]
    ram_bytes: NonNegInt
    cpu_count: NonNegInt
    torch_version: Annotated[str, msgspec.Meta(max_length=64)]
    backends: Annotated[list[Name], msgspec.Meta(max_length=8)]
    software_version: Annotated[str, msgspec.Meta(max_length=64)]
    serving_url: Annotated[str, msgspec.Meta(max_length=256)] = ""
    """The node's OpenAI-compatible endpoint (``--serve``); empty when it does not serve."""
    serving_models: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]],
                              msgspec.Meta(max_length=256)] = []  # fmt: skip
    """What that endpoint serves: the base model, and ``<run>@<version>`` for adapters."""
    compute: ComputeProfile | None = None
    """How its model computes, once loaded (announced then)."""


class JoinRequest(Message):
    """Node → coordinator (join protocol): who I am, where I listen, what I can do."""

    TYPE: ClassVar[str] = "membership.join"
    MAX_BYTES: ClassVar[int] = 16 * KiB
    name: Name
    instance_id: Annotated[str, msgspec.Meta(min_length=8, max_length=64)]
    """Random per process: tells a re-join of the same process from a second process that
    shares the key file."""
    protocol_version: Annotated[str, msgspec.Meta(max_length=16)]
    listen_addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=16)]
    capabilities: Capabilities


class PeerRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A peer another node may dial to keep the gossip mesh without the coordinator."""

    peer_id: PeerIdStr
    addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=16)]


class JoinReply(Message):
    """Coordinator → node: accepted (with liveness settings and peers to dial) or refused."""

    TYPE: ClassVar[str] = "membership.join_reply"
    MAX_BYTES: ClassVar[int] = 256 * KiB
    accepted: bool
    reason: Text = ""
    heartbeat_interval_s: float = 2.0
    peers: Annotated[list[PeerRecord], msgspec.Meta(max_length=1024)] = []
    retry_after_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0
    """A refusal that may pass (another instance of this identity, overdue with its heartbeats:
    likely a node that crashed and was started again): join again after this long. 0: final."""


class Heartbeat(Message):
    """Node → gossip: I am alive. ``seq`` grows by one per beat."""

    TYPE: ClassVar[str] = "membership.heartbeat"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    seq: NonNegInt
    uptime_s: Annotated[float, msgspec.Meta(ge=0)]
    load: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class Announce(Message):
    """Node → gossip: my capabilities or addresses changed."""

    TYPE: ClassVar[str] = "membership.announce"
    MAX_BYTES: ClassVar[int] = 16 * KiB
    name: Name
    listen_addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=16)]
    capabilities: Capabilities


class Goodbye(Message):
    """Node → gossip: I am leaving now; count me gone without waiting for missed beats."""

    TYPE: ClassVar[str] = "membership.goodbye"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    reason: Text = ""


class PeersRequest(Message):
    """Node → coordinator (peers protocol): whom else may I dial?"""

    TYPE: ClassVar[str] = "membership.peers_request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    limit: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64


class PeersReply(Message):
    """Coordinator → node: live peers and their addresses."""

    TYPE: ClassVar[str] = "membership.peers_reply"
    MAX_BYTES: ClassVar[int] = 256 * KiB
    peers: Annotated[list[PeerRecord], msgspec.Meta(max_length=1024)]
