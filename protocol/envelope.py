"""Signed envelopes: every message between peers travels as one.

A frame is ``header || signature``: the header is a msgpack array ``[version, type, sender,
timestamp_ms, nonce, body]`` and the signature is Ed25519 by ``sender`` over a domain tag plus the
SHA-256 of the exact header bytes, so what is verified is exactly what was received, and a
signature made for anything else cannot be replayed into a frame. Signing the digest rather than
the bytes themselves is one SHA-256 pass (hardware-accelerated) instead of the three SHA-512
passes Ed25519 makes over its input when signing and verifying: about 3x faster on MiB-sized
rollout payloads and adapter shards, and just as binding.

The sender's peer id is derived from the key in the header, as libp2p derives it, so the receiver
knows who sent a frame from the frame alone; a stored frame (a rollout receipt, a verdict) can be
re-verified by anyone later.

Opening a frame checks, cheapest first and all before decoding the body: total size, the version
(always the first header element, so even a future header layout is refused with both versions
named), the type, the body's cap, the signature, the timestamp window, then the body, and last
the replay cache. Any failure raises the matching ``ProtocolError``.

>>> from protocol.identity import Identity
>>> from protocol.membership import Goodbye
>>> alice = Identity.generate()
>>> env = open_envelope(seal(alice, Goodbye(reason="bye")), ReplayGuard())
>>> env.sender == alice.peer_id, env.message
(True, Goodbye(reason='bye'))
"""

from __future__ import annotations

import hashlib
import heapq
import os
import time
from dataclasses import dataclass
from typing import Annotated

import msgspec

from protocol.codec import (
    Message,
    decode_body,
    decode_struct,
    encode_body,
    encode_struct,
    max_body_bytes,
    message_class,
)
from protocol.errors import BadSignature, DecodeError, ExpiredError, ReplayError, TooLarge
from protocol.identity import SIGNATURE_BYTES, Identity, peer_id_from_public_key, verify_signature
from protocol.versions import PROTOCOL_VERSION, check_version

SIGNING_DOMAIN = b"bazaar/envelope/v1\x00"
NONCE_BYTES = 16
HEADER_OVERHEAD = 256
"""Upper bound on header bytes besides the body (version, type, key, time, nonce, framing)."""
DEFAULT_WINDOW_S = 60.0


class _Header(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    version: Annotated[str, msgspec.Meta(max_length=16)]
    type: Annotated[str, msgspec.Meta(max_length=64)]
    sender: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    timestamp_ms: int
    nonce: Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
    body: bytes


class _VersionProbe(msgspec.Struct, array_like=True):
    """Reads only the first header element, whatever follows it."""

    version: Annotated[str, msgspec.Meta(max_length=16)]


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified frame."""

    sender: str
    """Peer id of the signer, derived from ``sender_key``."""
    sender_key: bytes
    timestamp_ms: int
    nonce: bytes
    message: Message
    frame: bytes
    """The exact bytes received; what to store or forward so others can re-verify."""


def signing_input(header: bytes) -> bytes:
    """What the signature covers: the domain tag and the SHA-256 of the exact header bytes."""
    return SIGNING_DOMAIN + hashlib.sha256(header).digest()


def max_frame_bytes() -> int:
    return max_body_bytes() + HEADER_OVERHEAD + SIGNATURE_BYTES


def seal(
    identity: Identity,
    message: Message,
    *,
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Encode and sign ``message`` as ``identity``; the result is a frame ready to send."""
    header = encode_struct(
        _Header(
            version=PROTOCOL_VERSION,
            type=message.TYPE,
            sender=identity.public_bytes,
            timestamp_ms=int(time.time() * 1000) if timestamp_ms is None else timestamp_ms,
            nonce=os.urandom(NONCE_BYTES) if nonce is None else nonce,
            body=encode_body(message),
        )
    )
    return header + identity.sign(signing_input(header))


def open_envelope(
    frame: bytes,
    guard: ReplayGuard | None,
    *,
    now_ms: int | None = None,
) -> Envelope:
    """Verify and decode a frame. ``guard=None`` skips replay and time checks (stored frames)."""
    if len(frame) > max_frame_bytes():
        raise TooLarge(f"frame is {len(frame)} bytes, over the cap of {max_frame_bytes()}")
    if len(frame) <= SIGNATURE_BYTES:
        raise DecodeError(f"frame of {len(frame)} bytes is truncated: no room for a signature")
    header_bytes, signature = frame[:-SIGNATURE_BYTES], frame[-SIGNATURE_BYTES:]
    probe = decode_struct(header_bytes, _VersionProbe, "envelope header")
    check_version(probe.version, what="envelope version")
    header: _Header = decode_struct(header_bytes, _Header, "envelope header")
    cls = message_class(header.type)
    if len(header.body) > cls.MAX_BYTES:
        raise TooLarge(f"{header.type} body is {len(header.body)} bytes, cap {cls.MAX_BYTES}")
    if not verify_signature(header.sender, signature, signing_input(header_bytes)):
        raise BadSignature(f"{header.type} signature does not verify for its sender key")
    sender = peer_id_from_public_key(header.sender)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if guard is not None:
        skew_ms = header.timestamp_ms - now
        if abs(skew_ms) > guard.window_ms:
            raise ExpiredError(
                f"{header.type} from {sender} is {skew_ms / 1000:+.1f}s off our clock "
                f"(window ±{guard.window_ms / 1000:.0f}s)"
            )
    message = decode_body(header.type, header.body)
    if guard is not None:
        guard.admit(header.sender, header.nonce, header.timestamp_ms, now, sender)
    return Envelope(sender, header.sender, header.timestamp_ms, header.nonce, message, frame)


class ReplayGuard:
    """Remembers the (sender, nonce) of every frame admitted within the time window.

    A frame outside the window is refused as expired before it gets here, so a nonce need only
    be kept until its timestamp leaves the window. Memory is bounded: past ``max_entries`` the
    oldest nonces are forgotten and the low-water mark rises to their timestamp, so anything that
    old is refused as expired — a full cache never lets a replay through.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_entries: int = 1_000_000) -> None:
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._seen: set[bytes] = set()
        self._by_time: list[tuple[int, bytes]] = []
        self.low_water_ms = 0

    def __len__(self) -> int:
        return len(self._seen)

    def admit(
        self, sender_key: bytes, nonce: bytes, timestamp_ms: int, now_ms: int, who: str = ""
    ) -> None:
        key = sender_key + nonce
        self._prune(now_ms)
        if timestamp_ms <= self.low_water_ms:
            raise ExpiredError(f"frame from {who} is older than the replay memory")
        if key in self._seen:
            raise ReplayError(f"frame from {who} was already received (nonce {nonce.hex()})")
        self._seen.add(key)
        heapq.heappush(self._by_time, (timestamp_ms, key))
        while len(self._seen) > self.max_entries:
            ts, old = heapq.heappop(self._by_time)
            self._seen.discard(old)
            self.low_water_ms = max(self.low_water_ms, ts)

    def _prune(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        while self._by_time and self._by_time[0][0] < horizon:
            _, old = heapq.heappop(self._by_time)
            self._seen.discard(old)
