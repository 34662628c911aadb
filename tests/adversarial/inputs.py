"""Seeded inputs for fuzzing each layer a peer's bytes reach (``attacks.py`` sends them).

``inputs(layer, rng)`` yields, forever: the layer's known troublemakers first (zero lengths,
huge declared lengths, truncations), then valid frames mutated (``mutate``: bit flips,
truncation, duplication, splices) and random bytes. Layers: ``tcp``, ``multistream``, ``noise``,
``secio``, ``tls``, ``plaintext``, ``noise-payload``, ``yamux``, ``mplex``, ``meshsub``,
``bazaar``, ``identify-push``, ``ping``.

>>> import random
>>> [len(b) > 0 for b, _ in zip(inputs("yamux", random.Random(0)), range(3))]
[True, True, True]
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.pubsub.pb import rpc_pb2
from libp2p.security.insecure.transport import make_exchange_message
from libp2p.utils.varint import encode_uvarint

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.membership import Goodbye, Heartbeat, JoinRequest, PeersRequest
from protocol.rollouts import PayloadRequest
from protocol.versions import MEMBERSHIP
from tests.adversarial.attacks import (
    _U32,
    ACK,
    CLOSE_INITIATOR,
    DATA,
    FIN,
    GO_AWAY,
    MSG_INITIATOR,
    MULTISTREAM,
    NEW_STREAM,
    PING,
    PING_FRAME,
    RESET_INITIATOR,
    RST,
    SECURITY_PROTOCOLS,
    SYN,
    WINDOW_UPDATE,
    mplex_frame,
    ms_message,
    yamux_frame,
    yamux_open,
)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random edit: flip bits, truncate, duplicate, splice random bytes, or zero a span."""
    if not data:
        return rng.randbytes(rng.randint(1, 32))
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:
        del b[rng.randrange(len(b)) :]
    elif op == 2:
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 64)] * rng.randint(1, 8)
    elif op == 3:
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 32))
    else:
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 16)] = bytes(min(16, len(b) - i))
    return bytes(b)


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([1, 7, 11, 64, 1000, 70000]))


def meshsub_rpcs(rng: random.Random, topic: str = MEMBERSHIP) -> list[bytes]:
    """Valid gossipsub RPCs (not length-prefixed): subscriptions, a publish, every control."""
    mid = rng.randbytes(20)
    rpcs = [
        rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=topic)]),
        rpc_pb2.RPC(publish=[rpc_pb2.Message(from_id=rng.randbytes(38), data=rng.randbytes(40),
                                             seqno=rng.randbytes(8), topicIDs=[topic])]),
        rpc_pb2.RPC(control=rpc_pb2.ControlMessage(
            ihave=[rpc_pb2.ControlIHave(topicID=topic, messageIDs=[mid] * 10)],
            iwant=[rpc_pb2.ControlIWant(messageIDs=[mid])],
            graft=[rpc_pb2.ControlGraft(topicID=topic)],
            prune=[rpc_pb2.ControlPrune(topicID=topic, backoff=rng.randrange(1 << 40),
                                        peers=[rpc_pb2.PeerInfo(peerID=rng.randbytes(38),
                                                                signedPeerRecord=rng.randbytes(60))])],
        )),
        rpc_pb2.RPC(senderRecord=rng.randbytes(80)),
    ]  # fmt: skip
    return [r.SerializeToString() for r in rpcs]


def bazaar_frames(rng: random.Random, identity: Identity | None = None) -> list[bytes]:
    """Valid request bodies (signed envelopes, not length-prefixed) of several types."""
    me = identity or Identity.generate()
    from tests.integration.peer import capabilities

    join = JoinRequest(name="x" * rng.randint(1, 40), instance_id=rng.randbytes(8).hex(),
                       protocol_version="1.0.0", listen_addrs=[],
                       capabilities=capabilities(["inference"]))  # fmt: skip
    msgs = [join, PeersRequest(limit=rng.randint(0, 1000)), Goodbye(reason="x"),
            Heartbeat(seq=rng.randint(0, 1 << 30), uptime_s=1.0),
            PayloadRequest(payload_hash=rng.randbytes(32))]  # fmt: skip
    return [seal(me, m) for m in msgs]


def _u32_framed(body: bytes) -> bytes:
    return _U32.pack(len(body)) + body


def inputs(layer: str, rng: random.Random) -> Iterator[bytes]:
    """Endless, seeded inputs for one layer, each ready to write as is at that layer:
    ``tcp``, ``multistream`` (after the header), ``noise`` / ``secio`` / ``tls`` / ``plaintext``
    (after negotiating that protocol), ``noise-payload`` (msg#3's payload), ``yamux`` /
    ``mplex`` (muxer frames, concatenated), ``meshsub``, ``bazaar``, ``identify-push``, ``ping``
    (a stream's bytes)."""
    gen = _GENERATORS.get(layer)
    if gen is None:
        raise ValueError(f"unknown layer {layer!r}: one of {sorted(_GENERATORS)}")
    return gen(rng)


def _tcp(rng: random.Random) -> Iterator[bytes]:
    fixed = [b"\x00", b"\xff" * 11, b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01",
             encode_uvarint(1 << 40) + b"x" * 100, encode_uvarint(0), b"\x80" * 20,
             ms_message("/multistream/9.9.9"), ms_message(MULTISTREAM)[:3]]  # fmt: skip
    yield from fixed
    while True:
        yield mutate(ms_message(MULTISTREAM) + ms_message("/noise"), rng) if rng.random() < 0.5 \
            else _random_bytes(rng)  # fmt: skip


def _multistream(rng: random.Random) -> Iterator[bytes]:
    fixed = [ms_message("ls"), ms_message("na"), ms_message("/unknown"), ms_message(b"\xff\xfe"),
             ms_message("/noise" * 2000), encode_uvarint(1 << 30) + b"/noi",
             b"".join(ms_message(f"/p{i}") for i in range(2000)),
             encode_uvarint(5) + b"/nois"]  # fmt: skip
    yield from fixed
    while True:
        yield mutate(ms_message(rng.choice(SECURITY_PROTOCOLS)), rng)


def _sized(rng: random.Random, header: struct.Struct) -> Iterator[bytes]:
    limit = (1 << (8 * header.size)) - 1
    yield from [header.pack(0), header.pack(1) + b"\x00", header.pack(limit) + bytes(100),
                header.pack(31) + bytes(31), header.pack(33) + bytes(33),
                header.pack(32) + bytes(32), header.pack(32) + bytes(10),
                header.pack(limit)]  # fmt: skip
    while True:
        body = _random_bytes(rng)[: rng.randint(0, 2000)]
        yield header.pack(min(len(body) + rng.randint(-5, 5) % (limit + 1), limit)) + body


def _noise(rng: random.Random) -> Iterator[bytes]:
    return _sized(rng, struct.Struct(">H"))


def _secio(rng: random.Random) -> Iterator[bytes]:
    return _sized(rng, _U32)


def _plaintext(rng: random.Random) -> Iterator[bytes]:
    exchange = make_exchange_message(create_new_key_pair().public_key).SerializeToString()
    yield from [encode_uvarint(len(exchange)) + exchange[:-3], encode_uvarint(1 << 20),
                encode_uvarint(1 << 16) + bytes(1 << 16), encode_uvarint(3) + b"\x0a\x01\x00",
                encode_uvarint(0)]  # fmt: skip
    while True:
        m = mutate(exchange, rng)
        yield encode_uvarint(len(m)) + m


def _tls(rng: random.Random) -> Iterator[bytes]:
    hello = bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    yield from [hello, b"\x16\x03\x01\xff\xff" + bytes(100), b"\x15\x03\x03\x00\x02\x02\x28"]
    while True:
        yield mutate(hello, rng)


def _noise_payload(rng: random.Random) -> Iterator[bytes]:
    yield from [b"", b"\x0a\xff\xff\x03", b"\x0a", b"\x12\x05hello", rng.randbytes(60000)]
    while True:
        yield _random_bytes(rng)[:60000]


def _yamux(rng: random.Random) -> Iterator[bytes]:
    f = yamux_frame
    fixed = [
        f(DATA, SYN, 1, 0, version=7),                    # bad version
        f(9, 0, 1, 0),                                    # bad type
        f(DATA, SYN, 1, 0xFFFFFFFF),                      # huge declared length
        f(DATA, SYN, 1, (16 << 20)) + bytes(1000),        # length at the window cap, short body
        f(WINDOW_UPDATE, SYN, 1, 0) + f(WINDOW_UPDATE, 0, 1, 0xFFFFFFFF) * 64,  # window overflow
        f(WINDOW_UPDATE, SYN, 0, 0),                      # stream 0 (the session)
        f(WINDOW_UPDATE, SYN, 2, 0),                      # even id from the dialer
        f(WINDOW_UPDATE, SYN, 1, 0) * 2,                  # duplicate SYN
        f(DATA, 0, 12345, 5, b"hello"),                   # data on an unknown stream
        f(WINDOW_UPDATE, RST, 777, 0),                    # reset of an unknown stream
        f(PING_FRAME, SYN, 0, 1) * 2000,                  # ping flood
        f(PING_FRAME, ACK, 0, 1),                         # unsolicited ping ack
        f(GO_AWAY, 0, 0, 0xFFFFFFFF),                     # go away, unknown code
        f(DATA, SYN | ACK | FIN | RST, 1, 0),             # every flag
        f(WINDOW_UPDATE, 0xFFFF, 3, 0),
        b"".join(f(WINDOW_UPDATE, SYN, 2 * i + 1, 0) for i in range(3000)),  # stream flood
        yamux_open(1, PING) + f(DATA, 0, 1, 32, bytes(32)),
        yamux_open(1, "/no/such/protocol"),
    ]  # fmt: skip
    yield from fixed
    while True:
        yield b"".join(mutate(rng.choice(fixed)[:4096], rng) for _ in range(rng.randint(1, 4)))


def _mplex(rng: random.Random) -> Iterator[bytes]:
    m = mplex_frame
    body = ms_message(MULTISTREAM) + ms_message(PING)
    fixed = [
        m(1, NEW_STREAM, b"s"), m(1, 7), m(1, NEW_STREAM, length=1 << 40), encode_uvarint(1 << 70),
        m(1, NEW_STREAM) + m(1, MSG_INITIATOR, length=1 << 30) + bytes(100),
        m(1, NEW_STREAM) + m(1, MSG_INITIATOR, body) + m(1, MSG_INITIATOR, bytes(32)),
        m(99, MSG_INITIATOR, b"orphan"), m(99, RESET_INITIATOR), m(99, CLOSE_INITIATOR),
        b"".join(m(i, NEW_STREAM) for i in range(3000)), m(1, NEW_STREAM) * 2,
        m(1, NEW_STREAM, b"x" * 70000),
    ]  # fmt: skip
    yield from fixed
    while True:
        yield mutate(rng.choice(fixed)[:4096], rng)


def _varint_framed(valid: list[bytes], rng: random.Random) -> Iterator[bytes]:
    yield from (encode_uvarint(len(v)) + v for v in valid)
    yield from [encode_uvarint(1 << 40) + b"x", encode_uvarint(4 << 20) + bytes(1000),
                encode_uvarint(100) + bytes(10), b"\x80" * 12, encode_uvarint(0),
                encode_uvarint(3) + b"\xff\xff\xff"]  # fmt: skip
    while True:
        r = rng.random()
        if r < 0.4:
            m = mutate(rng.choice(valid), rng)
            yield encode_uvarint(len(m)) + m
        elif r < 0.7:
            yield mutate(encode_uvarint(len(v := rng.choice(valid))) + v, rng)
        else:
            yield _random_bytes(rng)


def _meshsub(rng: random.Random) -> Iterator[bytes]:
    return _varint_framed(meshsub_rpcs(rng), rng)


def _identify_push(rng: random.Random) -> Iterator[bytes]:
    from libp2p.identity.identify.pb.identify_pb2 import Identify

    valid = [Identify(protocol_version="x", agent_version="y" * 100,
                      listen_addrs=[rng.randbytes(20)], protocols=["/a"] * 50,
                      observed_addr=rng.randbytes(8), signedPeerRecord=rng.randbytes(100)
                      ).SerializeToString()]  # fmt: skip
    return _varint_framed(valid, rng)


def _ping(rng: random.Random) -> Iterator[bytes]:
    yield from [bytes(31), bytes(33), bytes(32 * 1000), b""]
    while True:
        yield rng.randbytes(rng.choice([1, 31, 32, 64, 4096]))


def _bazaar(rng: random.Random) -> Iterator[bytes]:
    valid = bazaar_frames(rng)
    yield from (_u32_framed(v) for v in valid)
    yield from [_U32.pack(0), _U32.pack(0xFFFFFFFF) + bytes(100), _U32.pack(1 << 20) + bytes(100),
                _U32.pack((1 << 20) + 1), _U32.pack(100) + bytes(10), b"\x00\x00",
                _u32_framed(b"\x96" + b"\xc0" * 5), _u32_framed(bytes(64))]  # fmt: skip
    while True:
        r = rng.random()
        if r < 0.5:
            yield _u32_framed(mutate(rng.choice(valid), rng))
        elif r < 0.8:
            yield mutate(_u32_framed(rng.choice(valid)), rng)
        else:
            yield _random_bytes(rng)


_GENERATORS = {
    "tcp": _tcp, "multistream": _multistream, "noise": _noise, "secio": _secio, "tls": _tls,
    "plaintext": _plaintext, "noise-payload": _noise_payload, "yamux": _yamux, "mplex": _mplex,
    "meshsub": _meshsub, "bazaar": _bazaar, "identify-push": _identify_push, "ping": _ping,
}  # fmt: skip
