"""Attacks on a live Bazaar process, at every layer a peer's bytes reach.

A peer's bytes pass, in order: the TCP socket; multistream-select choosing a security protocol;
the security handshake (our hosts offer Noise alone; py-libp2p's default host also offers tls,
secio and plaintext, and the attacks try them all); multistream-select choosing a stream muxer
(ours: yamux; the default also mplex); the muxer's frames; per stream,
multistream-select choosing an application protocol; and that protocol's own framing (gossipsub
RPCs, identify, ping, our ``u32 length || envelope`` requests). Each layer has its attacks here:

- **tcp / multistream**: ``raw_tcp``, ``multistream_garbage`` — bytes before any handshake.
- **security**: ``offered_security``, ``security_garbage``, ``noise_payload``,
  ``plaintext_session_accepted`` — a handshake that is garbage, truncated, oversized, or
  (plaintext) claims someone else's key.
- **muxer**: ``secured_session`` (a real secured, muxer-negotiated connection driven by
  py-libp2p's own upgrader classes, with raw frames written under the muxer), ``muxer_frames``,
  ``yamux_frame`` / ``mplex_frame``, ``yamux_syn_flood``, ``yamux_overrun``.
- **protocols**: ``attacker`` (a real ``P2PHost`` connected to the target), ``served_protocols``,
  ``protocol_stream``.
- **stalls**: ``stall_streams`` / ``stall_across`` hold partial request frames open and record
  when the target lets go of each stream.

Every attack takes the target's full multiaddr (``/ip4/127.0.0.1/tcp/PORT/p2p/PEERID``) and
explicit bytes (or a seeded ``random.Random``); a refused, reset or closed connection is an
``Outcome``, never an exception (``inputs.py`` has seeded inputs for each layer);
``still_serves`` asks whether a coordinator still answers an honest newcomer; ``rss_mb`` and
``open_fds`` read a process's footprint from /proc.

"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.insecure.transport import InsecureSession, make_exchange_message
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.utils.varint import encode_uvarint

from protocol.identity import Identity
from protocol.p2p import P2PHost

MULTISTREAM = "/multistream/1.0.0"
SECURITY_PROTOCOLS = ("/noise", "/tls/1.0.0", "/secio/1.0.0", "/plaintext/2.0.0")
MUXERS = ("/yamux/1.0.0", "/mplex/6.7.0")
MESHSUB = ("/meshsub/1.0.0", "/meshsub/1.1.0", "/meshsub/1.2.0")
IDENTIFY, IDENTIFY_PUSH, PING = "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0"

# yamux: header is version u8, type u8, flags u16, stream id u32, length u32 (big endian)
YAMUX_HEADER = struct.Struct(">BBHII")
DATA, WINDOW_UPDATE, PING_FRAME, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
# mplex flags (header varint is stream_id << 3 | flag)
NEW_STREAM, MSG_INITIATOR, CLOSE_INITIATOR, RESET_INITIATOR = 0, 2, 4, 6

_U32 = struct.Struct(">I")
_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


# -- targets and outcomes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    peer_id: str

    @classmethod
    def parse(cls, addr: str) -> Target:
        ma = multiaddr.Multiaddr(addr)
        return cls(ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp")),
                   ma.value_for_protocol("p2p"))  # fmt: skip

    @property
    def id(self) -> ID:
        return ID.from_base58(self.peer_id)


@dataclass
class Outcome:
    """What one attack saw: bytes sent, the target's answer, and how the exchange ended."""

    attack: str
    sent: int = 0
    reply: bytes = b""
    closed_by_target: bool = False
    """The target closed or reset the connection/stream before we did."""
    error: str | None = None
    """Why the attack could not proceed (dial refused, negotiation refused, ...)."""
    elapsed_s: float = 0.0


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


async def _linger(read: Any, linger_s: float, out: Outcome, cap: int = 1 << 16) -> None:
    """Read what the target says for up to ``linger_s``; note if it hangs up."""
    with trio.move_on_after(linger_s):
        try:
            while len(out.reply) < cap:
                chunk = await read()
                if not chunk:
                    out.closed_by_target = True
                    return
                out.reply += chunk
        except trio.TooSlowError:
            raise
        except Exception as e:  # reset, broken pipe, closed muxer: all mean "hung up"
            out.closed_by_target = True
            out.error = out.error or _describe(e)


# -- layer 1: raw TCP and multistream-select ---------------------------------------------------


def ms_message(text: str | bytes) -> bytes:
    """One multistream-select message: varint length, text, newline."""
    raw = (text.encode() if isinstance(text, str) else text) + b"\n"
    return encode_uvarint(len(raw)) + raw


async def raw_tcp(target: str, data: bytes, linger_s: float = 1.0, chunk: int = 0) -> Outcome:
    """Open a TCP connection and send ``data`` (in ``chunk``-sized writes if set) before any
    handshake."""
    t, out, start = Target.parse(target), Outcome("raw_tcp"), time.monotonic()
    try:
        stream = await trio.open_tcp_stream(t.host, t.port)
    except OSError as e:
        return Outcome("raw_tcp", error=_describe(e))
    async with stream:
        await _send_and_linger(stream, data, linger_s, out, chunk)
    out.elapsed_s = time.monotonic() - start
    return out


async def _send_and_linger(
    stream: trio.SocketStream, data: bytes, linger_s: float, out: Outcome, chunk: int = 0
) -> None:
    """Send ``data`` (in ``chunk``-sized writes if set), then read what comes back."""
    try:
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            await stream.send_all(data[i : i + step])
            out.sent += len(data[i : i + step])
    except _ERRORS as e:
        out.closed_by_target, out.error = True, _describe(e)
    if not out.closed_by_target:
        await _linger(stream.receive_some, linger_s, out)


async def multistream_garbage(target: str, data: bytes, linger_s: float = 1.0) -> Outcome:
    """A valid multistream-select header, then ``data``."""
    out = await raw_tcp(target, ms_message(MULTISTREAM) + data, linger_s)
    out.attack = "multistream_garbage"
    return out


async def multistream_flood(target: str, megabytes: int, declared: int = 1 << 30) -> Outcome:
    """Declare a ``declared``-byte multistream-select message and send ``megabytes`` MiB of it,
    before any handshake: is the length checked before the body is buffered?"""
    out = await raw_tcp(
        target, ms_message(MULTISTREAM) + encode_uvarint(declared) + bytes(megabytes << 20),
        linger_s=1.0, chunk=1 << 20,
    )  # fmt: skip
    out.attack = f"multistream_flood[{megabytes}MiB of {declared}]"
    return out


# -- layer 2: the security handshake -----------------------------------------------------------


async def _read_ms(stream: trio.SocketStream, timeout_s: float = 5.0) -> bytes:
    """Read one multistream-select message from a raw socket (one byte at a time: the rest
    of the bytes belong to the next layer)."""
    n, shift = 0, 0
    with trio.fail_after(timeout_s):
        while True:
            b = await _receive_exactly(stream, 1)
            n |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                return await _receive_exactly(stream, n)


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise trio.BrokenResourceError("closed during multistream-select")
        buf += chunk
    return bytes(buf)


async def _negotiate_raw(target: Target, protocol: str) -> tuple[trio.SocketStream, bool]:
    """Dial and propose ``protocol`` as the security protocol; (stream, accepted)."""
    stream = await trio.open_tcp_stream(target.host, target.port)
    await stream.send_all(ms_message(MULTISTREAM) + ms_message(protocol))
    header = await _read_ms(stream)
    assert header.rstrip(b"\n") == MULTISTREAM.encode(), header
    answer = (await _read_ms(stream)).rstrip(b"\n")
    return stream, answer == protocol.encode()


async def offered_security(target: str) -> list[str]:
    """The security protocols the target accepts, of those py-libp2p knows."""
    t, accepted = Target.parse(target), []
    for protocol in SECURITY_PROTOCOLS:
        try:
            stream, ok = await _negotiate_raw(t, protocol)
            await stream.aclose()
        except (*_ERRORS, AssertionError):
            continue
        if ok:
            accepted.append(protocol)
    return accepted


async def security_garbage(
    target: str, protocol: str, data: bytes, linger_s: float = 1.0
) -> Outcome:
    """Negotiate ``protocol`` as the security protocol, then send ``data`` as its handshake."""
    out, start = Outcome(f"security_garbage[{protocol}]"), time.monotonic()
    try:
        stream, ok = await _negotiate_raw(Target.parse(target), protocol)
    except (*_ERRORS, AssertionError) as e:
        return Outcome(out.attack, error=_describe(e))
    async with stream:
        if not ok:
            out.error = f"{protocol} refused"
            return out
        await _send_and_linger(stream, data, linger_s, out)
    out.elapsed_s = time.monotonic() - start
    return out


class _RawPayload:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data


async def noise_payload(target: str, payload: bytes, linger_s: float = 1.0) -> Outcome:
    """A cryptographically valid noise XX handshake whose final message carries ``payload``
    instead of a signed NoiseHandshakePayload (a protobuf with our key and signature)."""
    t, out = Target.parse(target), Outcome("noise_payload")
    key = create_new_key_pair()
    transport = NoiseTransport(key, noise_privkey=create_new_x25519_key_pair().private_key)
    pattern: Any = transport.get_pattern()  # PatternXX; IPattern lacks the payload hook
    real = pattern.make_handshake_payload
    calls = 0

    def crafted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1  # the initiator makes one payload: msg#3
        return _RawPayload(payload) if calls == 1 else real(*args, **kwargs)

    pattern.make_handshake_payload = crafted
    try:
        stream, _ok = await _negotiate_raw(t, "/noise")
    except (*_ERRORS, AssertionError) as e:
        return Outcome(out.attack, error=_describe(e))
    raw = RawConnection(TrioTCPStream(stream), True)
    try:
        with trio.fail_after(5):
            conn = await pattern.handshake_outbound(raw, t.id)
        out.sent = len(payload)
        await _linger(lambda: conn.read(65536), linger_s, out)
    except trio.TooSlowError:
        out.error = "handshake timed out"
    except Exception as e:
        out.closed_by_target, out.error = True, _describe(e)
    finally:
        await stream.aclose()
    return out


def _claimed_key(peer_id: str) -> PublicKey:
    """An Ed25519 peer id carries its public key inline (identity multihash)."""
    raw = ID.from_base58(peer_id).to_bytes()
    assert raw[:2] == b"\x00\x24", "only identity-hashed (ed25519) peer ids carry their key"
    return deserialize_public_key(raw[2:])


@dataclass
class RawSession:
    """A secured connection with a negotiated muxer, driven by hand: ``write`` puts raw bytes
    under the muxer (yamux or mplex frames), ``read`` returns what the target sent."""

    target: Target
    secured: Any
    muxer: str
    security: str
    claimed_peer_id: str

    async def write(self, data: bytes) -> None:
        await self.secured.write(data)

    async def read(self) -> bytes:
        return bytes(await self.secured.read(None))  # one message, however long


@asynccontextmanager
async def secured_session(
    target: str,
    *,
    security: str = "/noise",
    muxer: str = "/yamux/1.0.0",
    key_pair: KeyPair | None = None,
    claim_peer_id: str | None = None,
) -> AsyncIterator[RawSession]:
    """A real connection up to the muxer, through py-libp2p's own security and multistream
    classes; then it is ours. ``claim_peer_id`` (plaintext only) announces that peer's key
    instead of ours: plaintext trusts whatever key the dialer sends."""
    t = Target.parse(target)
    key_pair = key_pair or create_new_key_pair()
    stream, ok = await _negotiate_raw(t, security)
    try:
        if not ok:
            raise ConnectionRefusedError(f"{security} refused")
        raw = RawConnection(TrioTCPStream(stream), True)
        with trio.fail_after(10):
            if security == "/plaintext/2.0.0":
                secured = await _plaintext_handshake(raw, key_pair, t.id, claim_peer_id)
            else:
                transport = _security_transport(security, key_pair)
                secured = await transport.secure_outbound(raw, t.id)
            await MultiselectClient().select_one_of(
                [TProtocol(muxer)], MultiselectCommunicator(secured)
            )
        claimed = claim_peer_id or ID.from_pubkey(key_pair.public_key).to_base58()
        yield RawSession(t, secured, muxer, security, claimed)
    finally:
        await stream.aclose()


def _security_transport(security: str, key_pair: KeyPair) -> Any:
    if security == "/noise":
        return NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    if security == "/tls/1.0.0":
        from libp2p.security.tls.transport import TLSTransport

        return TLSTransport(key_pair)
    if security == "/secio/1.0.0":
        import libp2p.security.secio.transport as secio

        return secio.Transport(key_pair)
    raise ValueError(f"unknown security protocol {security!r}: one of {SECURITY_PROTOCOLS}")


async def _plaintext_handshake(raw: Any, key_pair: KeyPair, target: ID, claim: str | None) -> Any:
    from libp2p.security.insecure.transport import PlaintextHandshakeReadWriter

    pubkey = _claimed_key(claim) if claim else key_pair.public_key
    rw = PlaintextHandshakeReadWriter(raw)
    await rw.write_msg(make_exchange_message(pubkey).SerializeToString())
    await rw.read_msg()  # the target's own exchange; we check nothing in it
    return InsecureSession(
        local_peer=ID.from_pubkey(pubkey), local_private_key=key_pair.private_key,
        remote_peer=target, remote_permanent_pubkey=pubkey, is_initiator=True, conn=raw,
    )  # fmt: skip


async def plaintext_session_accepted(target: str, claim_peer_id: str) -> Outcome:
    """Whether the target lets a dialer with no key at all claim ``claim_peer_id``: a plaintext
    handshake announcing that peer's public key, then a yamux ping the target must answer."""
    out = Outcome("plaintext_impersonation")
    try:
        async with secured_session(target, security="/plaintext/2.0.0",
                                   claim_peer_id=claim_peer_id) as s:  # fmt: skip
            await s.write(yamux_frame(PING_FRAME, SYN, 0, 7))
            await _linger(s.read, 1.0, out)
    except Exception as e:
        out.error = _describe(e)
    return out


# -- layer 3: the stream muxer -----------------------------------------------------------------


def yamux_frame(
    typ: int, flags: int, stream_id: int, length: int, body: bytes = b"", version: int = 0
) -> bytes:
    """A yamux frame; ``length`` is the header field, which need not match ``body``."""
    return YAMUX_HEADER.pack(version & 0xFF, typ & 0xFF, flags & 0xFFFF,
                             stream_id & 0xFFFFFFFF, length & 0xFFFFFFFF) + body  # fmt: skip


def mplex_frame(stream_id: int, flag: int, data: bytes = b"", length: int | None = None) -> bytes:
    return (encode_uvarint(stream_id << 3 | flag)
            + encode_uvarint(len(data) if length is None else length) + data)  # fmt: skip


def yamux_open(stream_id: int, protocol: str, payload: bytes = b"") -> bytes:
    """Open a yamux stream and select ``protocol`` on it, with ``payload`` after."""
    body = ms_message(MULTISTREAM) + ms_message(protocol) + payload
    return yamux_frame(WINDOW_UPDATE, SYN, stream_id, 0) + yamux_frame(
        DATA, 0, stream_id, len(body), body
    )


async def muxer_frames(
    target: str,
    frames: list[bytes],
    muxer: str = "/yamux/1.0.0",
    linger_s: float = 1.0,
    security: str = "/noise",
) -> Outcome:
    """Send ``frames`` raw under a freshly negotiated muxer; see what the target does."""
    out, start = Outcome(f"muxer_frames[{muxer}]"), time.monotonic()
    try:
        async with secured_session(target, security=security, muxer=muxer) as s:
            try:
                for f in frames:
                    await s.write(f)
                    out.sent += len(f)
            except Exception as e:
                out.closed_by_target, out.error = True, _describe(e)
            if not out.closed_by_target:
                await _linger(s.read, linger_s, out)
    except Exception as e:
        out.error = out.error or _describe(e)
    out.elapsed_s = time.monotonic() - start
    return out


async def yamux_syn_flood(target: str, n: int, protocol: str | None = None,
                          hold_s: float = 3.0) -> Outcome:  # fmt: skip
    """Open ``n`` yamux streams on one connection (selecting ``protocol`` on each if given) and
    hold them for ``hold_s``: is there any cap on streams per connection?"""
    out = Outcome(f"yamux_syn_flood[{n}]")
    try:
        async with secured_session(target) as s:
            batch = bytearray()
            for i in range(n):
                sid = 2 * i + 1
                batch += yamux_open(sid, protocol) if protocol else yamux_frame(
                    WINDOW_UPDATE, SYN, sid, 0)  # fmt: skip
                if len(batch) > 32768:
                    await s.write(bytes(batch))
                    out.sent += len(batch)
                    batch.clear()
            await s.write(bytes(batch))
            out.sent += len(batch)
            await _linger(s.read, hold_s, out, cap=1 << 24)
    except Exception as e:
        out.closed_by_target, out.error = True, _describe(e)
    return out


async def yamux_overrun(target: str, megabytes: int, protocol: str = PING,
                        hold_s: float = 2.0) -> Outcome:  # fmt: skip
    """Open one stream, select ``protocol``, then send ``megabytes`` MiB on it without ever
    reading or granting window: yamux buffers what arrives past the receive window."""
    out = Outcome(f"yamux_overrun[{megabytes}MiB]")
    chunk = bytes(65536 - 12)
    try:
        async with secured_session(target) as s:
            await s.write(yamux_open(1, protocol))
            for _ in range(megabytes * 16):
                await s.write(yamux_frame(DATA, 0, 1, len(chunk), chunk))
                out.sent += len(chunk)
            with trio.move_on_after(hold_s):
                await trio.sleep_forever()
    except Exception as e:
        out.closed_by_target, out.error = True, _describe(e)
    return out


# -- layer 4: per-protocol streams -------------------------------------------------------------


@asynccontextmanager
async def attacker(target: str, identity: Identity | None = None) -> AsyncIterator[P2PHost]:
    """A real P2PHost (our transport, gossipsub included), connected to the target."""
    async with P2PHost.create(identity or Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        await host.connect(target)
        yield host


async def served_protocols(host: P2PHost, peer_id: str, timeout_s: float = 5.0) -> list[str]:
    """The protocols the target announced in identify (read from our peerstore)."""
    store, pid = host._host.get_peerstore(), ID.from_base58(peer_id)
    with trio.move_on_after(timeout_s):
        while True:
            try:
                protocols = list(store.get_protocols(pid))
                if protocols:
                    return sorted(protocols)
            except Exception:
                pass
            await trio.sleep(0.1)
    return []


async def protocol_stream(
    host: P2PHost, peer_id: str, protocol: str, data: bytes, linger_s: float = 1.0,
    close_write: bool = False,
) -> Outcome:  # fmt: skip
    """Open a stream on ``protocol``, write ``data``, read the answer until EOF/reset/linger."""
    out, start = Outcome(f"stream[{protocol}]"), time.monotonic()
    try:
        with trio.fail_after(10):
            stream = await host._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
    except Exception as e:
        return Outcome(out.attack, error=_describe(e))
    try:
        await stream.write(data)
        out.sent = len(data)
        if close_write:
            await stream.close()
    except Exception as e:
        out.closed_by_target, out.error = True, _describe(e)
    if not out.closed_by_target:
        await _linger(lambda: stream.read(65536), linger_s, out)
    with trio.move_on_after(2):
        with suppress(Exception):
            await stream.reset()
    out.elapsed_s = time.monotonic() - start
    return out


async def raw_protocol_stream(
    target: str, protocol: str, data: bytes, linger_s: float = 1.0, muxer: str = "/yamux/1.0.0"
) -> Outcome:
    """``data`` on a ``protocol`` stream over a fresh hand-driven connection: no host of ours
    runs alongside (no gossipsub, no identify), so nothing of ours interferes and each input
    meets a fresh connection."""
    out, start = Outcome(f"raw_stream[{protocol}]"), time.monotonic()
    body = ms_message(MULTISTREAM) + ms_message(protocol) + data
    if muxer == "/yamux/1.0.0":
        frames = [yamux_frame(WINDOW_UPDATE, SYN, 1, 0)] + [
            yamux_frame(DATA, 0, 1, len(c), c) for c in _chunks(body, 60000)
        ]
    else:
        frames = [mplex_frame(1, NEW_STREAM)] + [
            mplex_frame(1, MSG_INITIATOR, c) for c in _chunks(body, 60000)
        ]
    o = await muxer_frames(target, frames, muxer=muxer, linger_s=linger_s)
    out.sent, out.reply, out.closed_by_target, out.error = (
        o.sent,
        o.reply,
        o.closed_by_target,
        o.error,
    )
    out.elapsed_s = time.monotonic() - start
    return out


def _chunks(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)] or [b""]


# -- layer 5: stalls ---------------------------------------------------------------------------


@dataclass
class Stall:
    """Streams holding a partial request frame; ``released_s[i]`` is when the target let go
    of stream ``i`` (seconds after it opened), None while it still holds it."""

    protocol: str
    opened_at: float
    streams: list[Any] = field(default_factory=list)
    released_s: list[float | None] = field(default_factory=list)
    refused: int = 0
    """Streams the target would not open at all."""

    @property
    def held(self) -> int:
        return sum(r is None for r in self.released_s)

    async def close(self) -> None:
        for s in self.streams:
            with trio.move_on_after(1):
                with suppress(Exception):
                    await s.reset()


async def stall_streams(
    host: P2PHost, peer_id: str, protocol: str, n: int, nursery: trio.Nursery,
    declared: int = 1 << 20, sent: int = 100,
) -> Stall:  # fmt: skip
    """Open ``n`` streams on ``protocol`` over ``host``'s connection, each declaring a
    ``declared``-byte request and sending only ``sent`` bytes of it; a watcher per stream (in
    ``nursery``) records when the target resets or closes it. Close with ``Stall.close``."""
    stall = Stall(protocol, time.monotonic())
    frame = _U32.pack(declared) + bytes(sent)

    async def watch(i: int, stream: Any) -> None:
        try:
            while await stream.read(65536):
                pass
        except Exception:
            pass
        stall.released_s[i] = time.monotonic() - stall.opened_at

    for _ in range(n):
        try:
            with trio.fail_after(10):
                s = await host._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
                await s.write(frame)
        except Exception:
            stall.refused += 1
            continue
        stall.streams.append(s)
        stall.released_s.append(None)
        nursery.start_soon(watch, len(stall.streams) - 1, s)
    return stall


@asynccontextmanager
async def stall_across(
    target: str, protocol: str, connections: int, per_connection: int, **kw: Any
) -> AsyncIterator[list[Stall]]:
    """``stall_streams`` from ``connections`` attacker hosts (one identity each)."""
    async with trio.open_nursery() as nursery:
        stalls: list[Stall] = []
        peer = Target.parse(target).peer_id
        async with _hosts(target, connections) as hosts:
            for h in hosts:
                stalls.append(await stall_streams(h, peer, protocol, per_connection, nursery, **kw))
            try:
                yield stalls
            finally:
                for s in stalls:
                    await s.close()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _hosts(target: str, n: int) -> AsyncIterator[list[P2PHost]]:
    if n == 0:
        yield []
        return
    async with attacker(target) as h, _hosts(target, n - 1) as rest:
        yield [h, *rest]


# -- is the target still well? -----------------------------------------------------------------


async def still_serves(coordinator: str, timeout_s: float = 15.0) -> bool:
    """Does the coordinator still let a fresh identity dial in and join?"""
    from tests.integration.peer import peer

    with trio.move_on_after(timeout_s):
        try:
            async with peer(coordinator) as p:
                await p.join(["inference"], name="still-serves")
                return True
        except Exception:
            return False
    return False


def rss_mb(pid: int) -> float:
    """Resident memory of a live process, in MB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))
