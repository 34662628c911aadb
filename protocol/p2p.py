"""The transport: a py-libp2p host with our identity, gossip, and request/response streams.

This is the only module in the project that imports py-libp2p; the coordinator and the node see
only ``P2PHost`` (publish, subscribe, serve, request). It runs on trio, like py-libp2p.

- **Identity.** The host key is the node's own Ed25519 key, so ``host.peer_id`` is the peer id
  that signs our envelopes.
- **Gossip** is gossipsub. ``subscribe(topic, accept)`` installs ``accept`` as the topic's
  validator, which py-libp2p runs before a message is delivered *or relayed*: a frame that
  ``accept`` refuses (forged, replayed, malformed) goes no further than this host. What ``accept``
  returns is what the subscriber receives, so a frame is opened once.
- **Request/response** streams are named by versioned protocol ids. A request is
  ``u32 length || bytes``; the answer is ``u8 status || u32 length || bytes`` where status 1
  carries ``[code, message]`` of a ``ProtocolError`` raised by the handler. Both directions have a
  size cap checked against the length prefix before reading the body. A peer that only speaks
  another major version of a protocol is refused with ``VersionMismatch`` naming both versions.

>>> async def echo(peer_id: str, data: bytes) -> bytes:
...     return data
>>> async def demo() -> bytes:
...     async with P2PHost.create(Identity.generate()) as alice:
...         async with P2PHost.create(Identity.generate()) as bob:
...             alice.serve("/bazaar/echo/1.0.0", echo)
...             await bob.connect(alice.addrs()[0])
...             return await bob.request(alice.peer_id, "/bazaar/echo/1.0.0", b"hi")
>>> trio.run(demo)
b'hi'
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from protocol.codec import decode_struct, encode_struct
from protocol.errors import DecodeError, ProtocolError, RemoteError, TooLarge
from protocol.identity import Identity
from protocol.versions import check_compatible, parse_protocol_id

log = logging.getLogger(__name__)

GOSSIPSUB_ID = TProtocol("/meshsub/1.1.0")
DEFAULT_MAX_REQUEST = 1 << 20
DEFAULT_MAX_RESPONSE = 1 << 20
_LEN = struct.Struct(">I")
_OK, _ERR = 0, 1

T = TypeVar("T")
Handler = Callable[[str, bytes], Awaitable[bytes]]
"""``async handler(peer_id, request_bytes) -> response_bytes``; may raise ``ProtocolError``."""


class TransportError(ProtocolError):
    """A peer could not be reached, a stream broke, or a request timed out."""

    reason = "transport"


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """gossipsub settings. Measured by scripts/bench_membership.py at 16 nodes: mesh degree 4
    (3..8) with a 2 s gossipsub heartbeat costs half the CPU and bytes per node of degree 6
    (4..12) with 1 s, with lower latency and the same delivery."""

    degree: int = 4
    degree_low: int = 3
    degree_high: int = 8
    heartbeat_interval_s: int = 2
    """gossipsub's own mesh-maintenance tick, not the node heartbeat."""
    max_messages_per_peer_s: float = 2000.0
    """py-libp2p's per-peer, per-topic spam limit (its default: 10/s). A mesh peer *forwards*
    everyone's frames, so at 32 nodes it relays ~32 heartbeats per interval; the default drops
    them and they arrive late through IHAVE/IWANT. Bad frames are stopped by our own gate."""


class Subscription(Generic[T]):
    """Accepted gossip on one topic, as returned by the topic's ``accept`` function."""

    def __init__(self, receive: trio.MemoryReceiveChannel[T]) -> None:
        self._receive = receive

    def __aiter__(self) -> AsyncIterator[T]:
        return self._receive.__aiter__()

    async def get(self) -> T:
        return await self._receive.receive()


class P2PHost:
    """A running py-libp2p host. Build it with ``async with P2PHost.create(identity) as host``."""

    def __init__(self, identity: Identity, host: Any, pubsub: Pubsub, nursery: trio.Nursery):
        self.identity = identity
        self.peer_id = identity.peer_id
        self._host = host
        self._pubsub = pubsub
        self._nursery = nursery
        assert host.get_id().to_base58() == self.peer_id, "libp2p derived another peer id"

    @classmethod
    @asynccontextmanager
    async def create(
        cls,
        identity: Identity,
        listen: list[str] | None = None,
        gossip: GossipConfig | None = None,
    ) -> AsyncIterator[P2PHost]:
        gossip = gossip or GossipConfig()
        key = Ed25519PrivateKey.from_bytes(identity.seed())
        host = new_host(key_pair=KeyPair(key, key.get_public_key()))
        router = GossipSub(
            protocols=[GOSSIPSUB_ID],
            degree=gossip.degree,
            degree_low=gossip.degree_low,
            degree_high=gossip.degree_high,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=gossip.heartbeat_interval_s,
            max_messages_per_topic_per_second=gossip.max_messages_per_peer_s,
        )
        pubsub = Pubsub(host, router)
        addrs = [multiaddr.Multiaddr(a) for a in (listen or ["/ip4/127.0.0.1/tcp/0"])]
        # An error from the body is held while the host shuts down and raised after: cancelling
        # our nursery with it in flight would let a Cancelled from py-libp2p's service exits
        # replace it, and the nursery's scope would then absorb that Cancelled — losing the
        # error entirely. A cancellation from outside still propagates as it should.
        body_error: BaseException | None = None
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(host.run(listen_addrs=addrs))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            nursery = await stack.enter_async_context(trio.open_nursery())
            await pubsub.wait_until_ready()
            try:
                yield cls(identity, host, pubsub, nursery)
            except BaseException as e:
                body_error = e
            nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    # -- addresses and connections ---------------------------------------------------------

    def addrs(self) -> list[str]:
        """Full multiaddrs others can dial, each ending in ``/p2p/<peer id>``."""
        out = []
        for a in self._host.get_addrs():
            s = str(a)
            out.append(s if "/p2p/" in s else f"{s}/p2p/{self.peer_id}")
        return out

    async def connect(self, addr: str, timeout_s: float = 10.0) -> str:
        """Dial a full multiaddr; returns the remote peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:
            raise DecodeError(f"not a dialable multiaddr with /p2p/: {addr!r} ({e})") from None
        # py-libp2p refuses for 60 s to re-dial a peer whose addresses all failed; an explicit
        # connect is a caller's decision (with its own backoff), so lift that block first.
        self._host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(timeout_s):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise TransportError(f"dialing {addr} timed out after {timeout_s:.0f}s") from None
        except Exception as e:
            raise TransportError(f"could not dial {addr}: {e}") from None
        return str(info.peer_id.to_base58())

    async def connect_any(self, addrs: list[str], timeout_s: float = 5.0) -> bool:
        """Dial a peer at the first of its ``addrs`` that answers; False if none did (the
        caller goes on: the peer may be reachable already, or not at all)."""
        for addr in addrs:
            try:
                await self.connect(addr, timeout_s)
                return True
            except ProtocolError:
                continue
        return False

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``; the next dial starts clean (streams, gossip)."""
        await self._host.disconnect(ID.from_base58(peer_id))

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_connected_peers()]

    def gossip_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to ``topic``."""
        return [p.to_base58() for p in self._pubsub.peer_topics.get(topic, set())]

    # -- gossip ------------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        await self._pubsub.publish(topic, data)

    async def subscribe(
        self, topic: str, accept: Callable[[str, bytes], T | None], buffer: int = 1024
    ) -> Subscription[T]:
        """Receive gossip on ``topic`` that ``accept(forwarder_peer_id, data)`` turns into a
        value; a ``None`` from ``accept`` drops the message here and stops its relay."""
        accepted: dict[bytes, T] = {}

        def validator(forwarder: ID, msg: Any) -> bool:
            value = accept(forwarder.to_base58(), bytes(msg.data))
            if value is None:
                return False
            accepted[bytes(msg.from_id) + bytes(msg.seqno)] = value
            return True

        self._pubsub.set_topic_validator(topic, validator, False)
        raw = await self._pubsub.subscribe(topic)
        send, receive = trio.open_memory_channel[T](buffer)

        async def pump() -> None:
            async with send:
                while True:
                    msg = await raw.get()
                    value = accepted.pop(bytes(msg.from_id) + bytes(msg.seqno), None)
                    if value is not None:
                        await send.send(value)

        self._nursery.start_soon(pump)
        return Subscription(receive)

    # -- request / response -------------------------------------------------------------------

    def serve(self, protocol: str, handler: Handler, max_request_bytes: int = DEFAULT_MAX_REQUEST):
        """Answer requests on a versioned protocol id with ``handler``."""
        parse_protocol_id(protocol)

        async def on_stream(stream: Any) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            try:
                request = await _read_frame(stream, max_request_bytes, "request")
                try:
                    body, status = await handler(peer, request), _OK
                except ProtocolError as e:
                    body, status = encode_struct([e.reason, str(e)]), _ERR
                await stream.write(bytes([status]) + _LEN.pack(len(body)) + body)
                await stream.close()
            except Exception as e:
                log.info("request on %s from %s failed: %s", protocol, peer, e)
                await _reset(stream)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def request(
        self,
        peer_id: str,
        protocol: str,
        data: bytes,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE,
        timeout_s: float = 10.0,
    ) -> bytes:
        """Send one request and return the answer; a handler's refusal is ``RemoteError``."""
        pid = ID.from_base58(peer_id)
        try:
            with trio.fail_after(timeout_s):
                try:
                    stream = await self._host.new_stream(pid, [TProtocol(protocol)])
                except StreamFailure:
                    self._raise_version_mismatch(pid, protocol)
                    raise
                try:
                    await stream.write(_LEN.pack(len(data)) + data)
                    status = await _read_exactly(stream, 1)
                    body = await _read_frame(stream, max_response_bytes, "response")
                    await stream.close()
                except BaseException:
                    await _reset(stream)
                    raise
        except trio.TooSlowError:
            raise TransportError(f"{protocol} to {peer_id} timed out after {timeout_s}s") from None
        except ProtocolError:
            raise
        except Exception as e:
            raise TransportError(f"{protocol} to {peer_id} failed: {e}") from None
        if status[0] == _OK:
            return body
        code, message = decode_struct(body, tuple[str, str], "error answer")
        raise RemoteError(code, message)

    def _raise_version_mismatch(self, pid: ID, protocol: str) -> None:
        name, _ = parse_protocol_id(protocol)
        try:
            theirs = self._host.get_peerstore().get_protocols(pid)
        except Exception:
            return
        for other in theirs:
            if other.startswith(f"/bazaar/{name}/"):
                check_compatible(other, protocol)  # raises VersionMismatch naming both


async def _read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise DecodeError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _read_frame(stream: Any, cap: int, what: str) -> bytes:
    (length,) = _LEN.unpack(await _read_exactly(stream, _LEN.size))
    if length > cap:
        raise TooLarge(f"{what} of {length} bytes is over the cap of {cap}")
    return await _read_exactly(stream, length)


async def _reset(stream: Any) -> None:
    # Shielded so a cancelled request still releases its stream, bounded so a dead peer cannot
    # hold us here.
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception as e:
            log.debug("stream reset failed: %s", e)
