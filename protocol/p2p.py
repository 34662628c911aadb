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
  carries an ``ErrorAnswer`` (code, message, when to ask again) of a ``ProtocolError`` raised by
  the handler. Both directions have a size cap checked against the length prefix before reading
  the body. A peer that only speaks
  another major version of a protocol is refused with ``VersionMismatch`` naming both versions.
- **Hostile peers** (``protocol/peer_limits.py`` holds the numbers and budgets). Every inbound
  stream of every protocol — ours, gossipsub, identify, ping — is dispatched through one guard
  (``_StreamGuard``): an error a peer's bytes cause in any handler resets that stream (closes
  the connection, for gossip), is counted in ``bazaar_peer_faults_total{layer,reason}`` and
  logged once per peer and reason per minute, and the process keeps serving. The guard also
  caps open streams per connection and notes when each peer was last heard from; connections
  idle past ``idle_connection_s`` are closed. Request streams have a read deadline, a cap per
  peer, and a budget of unfinished request bytes per peer and in all. Only Noise is offered for
  security (py-libp2p's default host also offers plaintext, where a peer *claims* its id, secio
  and TLS) and only yamux as muxer; gossip keeps subscriptions to our topics only.

  py-libp2p 0.8.1 beneath our protocols, and what we guard here, small and from our side; each
  fix belongs upstream, as the guard's docstring says:

  - a handler's exception ends the process (``SwarmConn._handle_muxed_stream`` lets it out;
    the gossipsub reader lets protobuf's ``DecodeError`` out, so 11 bytes on ``/meshsub/1.1.0``
    ended any of our processes): ``_StreamGuard``; ``Pubsub.push_msg`` runs in pubsub's own
    service, so ``_GuardedPubsub`` catches there too;
  - an inbound slot is held for the life of the process per connection that ever shook hands
    (250 of them locked newcomers out), and one address may take them all: ``_InboundSlots``,
    with caps per address on handshakes and open connections;
  - an auto-connector dials every address any peer announced: ``_no_auto_dials``;
  - yamux keeps bytes sent past the receive window: ``_WindowGuard``; and grows a stream's
    window to 16 MiB, all of which a stalled reader holds: ``max_stream_window_bytes``;
  - multistream-select reads a message of any declared length: ``_read_multiselect``.

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
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import msgspec
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.host.exceptions import StreamFailure
from libp2p.io.exceptions import IOException, MessageTooLarge
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectCommunicatorError
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux import yamux as _yamux
from libp2p.stream_muxer.yamux.yamux import MAX_MESSAGE_SIZE, Yamux
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.anyio_service.exceptions import LifecycleError
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from prometheus_client import CollectorRegistry

from protocol.codec import decode_struct, encode_struct
from protocol.errors import (
    BadSignature,
    DecodeError,
    ExpiredError,
    ProtocolError,
    RemoteError,
    ReplayError,
    TooLarge,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.identity import Identity
from protocol.peer_limits import PeerFaults, StreamBudget, TransportLimits, decrement
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


class ErrorAnswer(msgspec.Struct, array_like=True, frozen=True):
    """A handler's refusal on the wire: ``[code, message, retry_after_s]``; the last is left
    out when it is 0 (as peers before it sent, and expect)."""

    code: str
    message: str
    retry_after_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 0.0


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

    def __init__(
        self,
        identity: Identity,
        host: Any,
        pubsub: Pubsub,
        nursery: trio.Nursery,
        limits: TransportLimits,
        faults: PeerFaults,
        budget: StreamBudget,
    ):
        self.identity = identity
        self.peer_id = identity.peer_id
        self._host = host
        self._pubsub = pubsub
        self._nursery = nursery
        self.limits = limits
        self.faults = faults
        """What peers did wrong, by layer and reason (also ``bazaar_peer_faults_total``)."""
        self.budget = budget
        assert host.get_id().to_base58() == self.peer_id, "libp2p derived another peer id"

    @classmethod
    @asynccontextmanager
    async def create(
        cls,
        identity: Identity,
        listen: list[str] | None = None,
        gossip: GossipConfig | None = None,
        limits: TransportLimits | None = None,
        registry: CollectorRegistry | None = None,
    ) -> AsyncIterator[P2PHost]:
        """``registry`` receives ``bazaar_peer_faults_total`` (none: counted in ``faults``)."""
        gossip = gossip or GossipConfig()
        limits = limits or TransportLimits()
        faults = PeerFaults(registry or CollectorRegistry())
        budget = StreamBudget(limits)
        key = Ed25519PrivateKey.from_bytes(identity.seed())
        key_pair = KeyPair(key, key.get_public_key())
        host = new_host(
            key_pair=key_pair,
            # Noise only: py-libp2p also offers plaintext (where a peer *claims* any peer id),
            # secio (deprecated) and a TLS it calls limited, each one more parser for a peer
            sec_opt={
                TProtocol(NOISE_ID): NoiseTransport(
                    key_pair, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_opt={TProtocol(YAMUX_ID): Yamux},  # not mplex too: one parser less
            negotiate_timeout=max(1, round(limits.handshake_timeout_s)),
            connection_config=ConnectionConfig(
                inbound_upgrade_timeout=limits.handshake_timeout_s,
                inbound_stream_protocol_negotiation_timeout=limits.handshake_timeout_s,
            ),
        )
        _yamux.MAX_WINDOW_SIZE = limits.max_stream_window_bytes  # read at each window growth
        _StreamGuard(host, faults, budget)
        _InboundSlots(host.get_network(), faults, limits)
        _no_auto_dials(host.get_network())
        host.get_network().register_notifee(_WindowGuard(faults))
        router = GossipSub(
            protocols=[GOSSIPSUB_ID],
            degree=gossip.degree,
            degree_low=gossip.degree_low,
            degree_high=gossip.degree_high,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=gossip.heartbeat_interval_s,
            max_messages_per_topic_per_second=gossip.max_messages_per_peer_s,
        )
        pubsub = _GuardedPubsub(
            host,
            router,
            faults=faults,
            max_inbound_rpc_size=limits.max_gossip_rpc_bytes,
            max_subscriptions_per_peer=_MAX_TOPICS,
        )
        # a peer's subscriptions are kept for our topics only: it cannot grow our topic tables
        pubsub.allowed_topics = _OurTopics()  # type: ignore[assignment]
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
            self = cls(identity, host, pubsub, nursery, limits, faults, budget)
            nursery.start_soon(self._close_idle_loop)
            try:
                yield self
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

    def forget(self, peer_id: str) -> None:
        """Drop what py-libp2p keeps of a peer we are done with (keys, addresses, protocols)."""
        try:
            self._host.get_peerstore().clear_peerdata(ID.from_base58(peer_id))
        except Exception as e:
            log.debug("nothing to forget of %s: %s", peer_id, e)

    def remote_ip(self, peer_id: str) -> str:
        """The IP address ``peer_id`` is connected from (its first connection's); empty if
        not connected. What admission limits per address key on: a peer id is free to make,
        an address is not."""
        try:
            conns = self._host.get_network().get_connections(ID.from_base58(peer_id))
        except Exception:
            return ""
        for conn in conns:
            try:
                addr = conn.muxed_conn.get_remote_address()
            except Exception:
                continue
            if addr:
                return str(addr[0])
        return ""

    async def _close_idle_loop(self) -> None:
        """Close connections over which the peer sent nothing for ``idle_connection_s``."""
        period = min(10.0, self.limits.idle_connection_s / 4)
        while True:
            await trio.sleep(period)
            for peer in self.budget.idle(self.connected_peers()):
                log.info("closing connection to %s: idle", peer, extra={"peer": peer})
                with trio.move_on_after(5):
                    await _quietly(self.disconnect(peer))

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
        """Answer requests on a versioned protocol id with ``handler``. ``max_request_bytes``
        is the largest frame any request of this protocol can be (see ``request_cap``)."""
        parse_protocol_id(protocol)

        async def on_stream(stream: Any) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            if not self.budget.open_request(peer):
                self.faults.record(
                    peer, "bazaar", "too_many_streams",
                    f"over {self.limits.max_streams_per_peer} open requests",
                )  # fmt: skip
                await _reset(stream)
                return
            try:
                request = await self._read_request(stream, peer, protocol, max_request_bytes)
                if request is None:
                    return
                try:
                    body, status = await handler(peer, request), _OK
                except ProtocolError as e:
                    if isinstance(e, _BAD_FRAME):  # not a refusal of a well-formed request
                        self.faults.record(peer, "bazaar", e.reason, str(e))
                    answer = [e.reason, str(e)] + ([e.retry_after_s] if e.retry_after_s else [])
                    body, status = encode_struct(answer), _ERR
                await stream.write(bytes([status]) + _LEN.pack(len(body)) + body)
                await stream.close()
            except Exception as e:
                log.info("request on %s from %s failed: %s", protocol, peer, e)
                await _reset(stream)
            finally:
                self.budget.close_request(peer)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def _read_request(self, stream: Any, peer: str, protocol: str, cap: int) -> bytes | None:
        """One request frame within the read deadline and the peer's byte budget; ``None``
        (the stream reset, the fault counted) if the peer overstepped either."""
        reason, detail, reserved = "", "", 0
        with trio.move_on_after(self.limits.request_timeout_s):
            try:
                (length,) = _LEN.unpack(await _read_exactly(stream, _LEN.size))
                if length > cap:
                    raise TooLarge(f"request of {length} bytes is over {protocol}'s cap of {cap}")
                if not self.budget.reserve(peer, length):
                    reason, detail = "inflight_bytes", f"no room for a {length}-byte request"
                else:
                    reserved = length
                    return await _read_exactly(stream, length)
            except ProtocolError as e:
                reason, detail = e.reason, str(e)
            finally:
                if reserved:
                    self.budget.release(peer, reserved)
        if not reason:
            reason = "read_timeout"
            detail = f"no whole request on {protocol} in {self.limits.request_timeout_s:g}s"
        self.faults.record(peer, "bazaar", reason, detail)
        await _reset(stream)
        return None

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
        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:  # an address a peer announced, not ours to trust
            raise DecodeError(f"not a peer id: {peer_id[:64]!r} ({e})") from None
        self.budget.touch(peer_id)
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
        err = decode_struct(body, ErrorAnswer, "error answer")
        raise RemoteError(err.code, err.message, err.retry_after_s)

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


_BAD_FRAME = (
    DecodeError, TooLarge, UnknownMessageType, VersionMismatch, BadSignature, ReplayError,
    ExpiredError,
)  # fmt: skip
"""What a handler raises for a frame no honest peer sends (a peer fault), as opposed to a
refusal of a well-formed request (not a member, not found, rate-limited)."""

_MAX_TOPICS = 8
"""Topics one peer may be subscribed to in our tables (we have two)."""


class _OurTopics:
    """The topics whose subscriptions pubsub keeps: ours (``/bazaar/...``), whichever a process
    subscribes to or only publishes on (a publisher must learn who subscribes)."""

    def __contains__(self, topic: object) -> bool:
        return isinstance(topic, str) and topic.startswith("/bazaar/") and len(topic) <= 64


def request_cap(max_message_bytes: int) -> int:
    """The largest request frame of a protocol whose largest message body is this big: the
    signed envelope adds its header and signature."""
    return max_message_bytes + 1024


_LAYERS = {"/meshsub/": "gossipsub", "/ipfs/id/": "identify", "/ipfs/ping/": "ping"}


def _layer_of(protocol: str | None) -> str:
    if not protocol:
        return "negotiation"
    if protocol.startswith("/bazaar/"):
        return "bazaar"
    return next((layer for p, layer in _LAYERS.items() if protocol.startswith(p)), "stream")


class _StreamGuard:
    """Every inbound stream of every protocol passes here: it counts the connection's open
    streams (over the cap, the stream is reset), notes that the peer was heard from whenever
    the stream delivers bytes, and contains any error the handler lets out — py-libp2p would
    let it end the process (see the module docstring)."""

    def __init__(self, host: Any, faults: PeerFaults, budget: StreamBudget) -> None:
        self._inner = host._swarm_stream_handler
        self._host = host
        self._faults = faults
        self._budget = budget
        host.get_network().set_stream_handler(self)

    async def __call__(self, stream: Any) -> None:
        conn = stream.muxed_conn
        peer = conn.peer_id.to_base58()
        self._budget.touch(peer)
        if not self._budget.open_connection_stream(id(conn)):
            limit = self._budget.limits.max_streams_per_connection
            self._faults.record(peer, "muxer", "too_many_streams", f"over {limit} streams open")
            await _reset(stream)
            return
        read = stream.read

        async def read_and_note(n: int | None = None) -> bytes:
            data = await read(n)
            self._budget.touch(peer)
            return data

        stream.read = read_and_note
        try:
            await self._inner(stream)
        except Exception as e:
            layer = _layer_of(stream.get_protocol())
            self._faults.record(peer, layer, _reason(e), f"{type(e).__name__}: {e}")
            await _reset(stream)
            if layer == "gossipsub":  # its one stream to us is broken: start it clean
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await _quietly(self._host.disconnect(conn.peer_id))
        finally:
            self._budget.close_connection_stream(id(conn))


class _GuardedPubsub(Pubsub):
    """py-libp2p's pubsub, with the messages a peer sends handled so that an error in one
    (``push_msg`` runs in pubsub's own service, where an error ends the service and the host)
    drops that message and counts a fault."""

    def __init__(self, *args: Any, faults: PeerFaults, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._faults = faults

    async def push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as e:
            peer = msg_forwarder.to_base58()
            self._faults.record(peer, "gossipsub", _reason(e), f"{type(e).__name__}: {e}")


def _reason(e: Exception) -> str:
    if isinstance(e, ProtocolError):
        return e.reason
    name = type(e).__name__
    return {"DecodeError": "decode_error", "ParseError": "decode_error"}.get(name, "handler_error")


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as e:
        log.debug("ignored while closing a peer's connection: %s", e)


class _InboundSlots:
    """Inbound connections through the handshake, with py-libp2p's slot for each held only
    while it lasts. py-libp2p (``Swarm._handle_inbound_connection``) holds a slot of its
    250 for an upgraded connection until the *swarm* stops, closed connection or not: 250
    connections that shook hands and left locked every newcomer out until a restart. Here the
    slot is given back once the handshake ends; the handler then lives as long as its
    connection (trio closes the socket when the handler returns). A failed handshake is a
    counted fault. Upstream: ``_do_handle_inbound_connection`` should wait for the connection
    to close, not for ``manager.wait_finished()``, and release the slot after the upgrade."""

    def __init__(self, swarm: Any, faults: PeerFaults, limits: TransportLimits) -> None:
        self._swarm = swarm
        self._faults = faults
        self._limits = limits
        self._handshaking: Tally[str] = Tally()
        self._open: Tally[str] = Tally()
        swarm._handle_inbound_connection = self

    async def __call__(self, read_write_closer: Any, maddr: Any) -> None:
        address = _remote_ip(read_write_closer)
        refusal = ""
        if self._handshaking[address] >= self._limits.max_handshakes_per_address:
            refusal = "too_many_handshakes"
        elif self._open[address] >= self._limits.max_connections_per_address:
            refusal = "too_many_connections"
        else:
            try:
                self._swarm._inbound_limiter.acquire_nowait()
            except trio.WouldBlock:
                refusal = "no_handshake_slot"
        if refusal:
            self._faults.record(address, "transport", refusal, f"from {address}")
            await _quietly(read_write_closer.close())
            return
        self._handshaking[address] += 1
        raw = RawConnection(read_write_closer, False)
        try:
            muxed = await self._swarm.upgrade_inbound_raw_conn(raw, maddr)
        except Exception as e:
            if not isinstance(e, LifecycleError):  # not the peer: this host is stopping
                detail = f"{type(e).__name__}: {e}"
                self._faults.record(address, "security", "handshake_failed", detail)
            await _quietly(raw.close())
            return
        finally:
            self._swarm._inbound_limiter.release()
            decrement(self._handshaking, address)
        self._open[address] += 1
        try:
            await muxed.event_closed.wait()
        finally:
            decrement(self._open, address)


def _remote_ip(read_write_closer: Any) -> str:
    try:
        return str(read_write_closer.get_remote_address()[0])
    except Exception:
        return ""


def _no_auto_dials(swarm: Any) -> None:
    """Turn off py-libp2p's auto-connector, which dials every peer in the peerstore until the
    host has 200 connections, and again after each disconnect: addresses any peer announced
    (identify) included, dead Sybil identities and third parties alike. Whom to dial is ours to
    decide (a node dials the peers the coordinator names)."""

    async def never() -> None:
        return None

    swarm.auto_connector.maybe_connect = never


_MULTISELECT_MAX = 1024
"""Longest multistream-select message read: protocol ids are under 100 bytes."""


async def _read_multiselect(self: MultiselectCommunicator) -> str:
    """``MultiselectCommunicator.read`` with a cap on the length the peer declares: py-libp2p
    reads whatever length it is told (a peer sent 64 MiB of one "protocol id" before any
    handshake, and the process kept much of it). Installed on the class, as the security,
    muxer and stream negotiations each build their own communicator. Upstream: ``read_delim``
    should take a maximum."""
    try:
        data = await read_varint_prefixed_bytes_limited(self.read_writer, _MULTISELECT_MAX)
    except (ParseError, IOException, MessageTooLarge, ValueError) as e:
        raise MultiselectCommunicatorError("fail to read from multiselect communicator") from e
    if not data.endswith(b"\n"):
        raise MultiselectCommunicatorError("multiselect message not delimited by newline")
    return data[:-1].decode(errors="replace")


MultiselectCommunicator.read = _read_multiselect  # type: ignore[method-assign]


class _WindowGuard(INotifee):
    """Keeps yamux streams from buffering past the receive window they were given: py-libp2p's
    yamux logs a peer that sends beyond the window and keeps the bytes (a peer filled 280 MB
    of a process through one ping stream nobody read). Past the window plus one frame, the
    connection is closed and the fault counted. Installed as a notifee on every new connection,
    both directions, since py-libp2p builds ``Yamux`` by name whatever muxer class it is given.
    Upstream: ``Yamux.handle_incoming`` should close the connection on a window violation, as
    the yamux spec says."""

    def __init__(self, faults: PeerFaults) -> None:
        self._faults = faults

    async def connected(self, network: Any, conn: Any) -> None:
        muxer = conn.muxed_conn
        if isinstance(muxer, Yamux) and not isinstance(muxer.stream_buffers, _WindowedBuffers):
            muxer.stream_buffers = _WindowedBuffers(muxer, self._faults)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class _WindowOverrun(Exception):
    pass


class _WindowedBuffers(dict[int, bytearray]):
    """yamux's per-stream receive buffers, each refusing to grow past its stream's window."""

    def __init__(self, muxer: Yamux, faults: PeerFaults) -> None:
        super().__init__()
        self._muxer = muxer
        self._faults = faults
        for stream_id, buffer in muxer.stream_buffers.items():  # frames read before we came
            self[stream_id] = buffer

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        super().__setitem__(stream_id, _WindowedBuffer(buffer, self, stream_id))

    def overrun(self, stream_id: int, size: int) -> None:
        peer = self._muxer.peer_id.to_base58()
        self._faults.record(peer, "muxer", "window_overrun", f"stream {stream_id}: {size} bytes")
        self._muxer.event_shutting_down.set()  # handle_incoming then closes the connection
        raise _WindowOverrun(f"stream {stream_id} past its receive window")


class _WindowedBuffer(bytearray):
    def __init__(self, data: bytes | bytearray, owner: _WindowedBuffers, stream_id: int) -> None:
        super().__init__(data)
        self._owner = owner
        self._stream_id = stream_id
        self._excess = 0
        """Bytes the peer sent beyond the credit it had."""

    def extend(self, data: Any) -> None:
        # what the peer may still send is the credit we granted (``recv_window``, which only
        # grows as our reader consumes); one frame past it, in all, is slack for py-libp2p's
        # own accounting
        stream = self._owner._muxer.streams.get(self._stream_id)
        credit = stream.recv_window if stream is not None else 0
        self._excess += max(0, len(data) - credit)
        if self._excess > MAX_MESSAGE_SIZE:
            self._owner.overrun(self._stream_id, len(self) + len(data))
        super().extend(data)
