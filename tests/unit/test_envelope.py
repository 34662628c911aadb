"""Each bad frame gets its own specific error; good frames open to the exact message sent."""

from __future__ import annotations

import os
import time

import msgspec
import pytest

from protocol.codec import encode_struct
from protocol.envelope import (
    NONCE_BYTES,
    ReplayGuard,
    max_frame_bytes,
    open_envelope,
    seal,
    signing_input,
)
from protocol.errors import (
    BadSignature,
    DecodeError,
    ExpiredError,
    ReplayError,
    TooLarge,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.identity import SIGNATURE_BYTES, Identity
from protocol.membership import Goodbye, Heartbeat
from tests.examples import EXAMPLES

alice = Identity.generate()
mallory = Identity.generate()


def _signed_header(signer: Identity, fields: list[object], sender: Identity | None = None) -> bytes:
    """A frame with an arbitrary header, properly signed by ``signer``."""
    header = encode_struct(fields)
    return header + signer.sign(signing_input(header))


def _fields(**over: object) -> list[object]:
    base: dict[str, object] = {
        "version": "1.0.0",
        "type": "membership.heartbeat",
        "sender": alice.public_bytes,
        "timestamp_ms": int(time.time() * 1000),
        "nonce": os.urandom(NONCE_BYTES),
        "body": msgspec.msgpack.encode(Heartbeat(seq=1, uptime_s=1.0)),
    }
    base.update(over)
    return list(base.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_every_type_survives_seal_and_open(msg: object) -> None:
    env = open_envelope(seal(alice, msg), ReplayGuard())  # type: ignore[arg-type]
    assert env.message == msg
    assert env.sender == alice.peer_id
    assert env.sender_key == alice.public_bytes


def test_forged_signature() -> None:
    frame = bytearray(seal(alice, Heartbeat(seq=1, uptime_s=1.0)))
    frame[-1] ^= 0x01
    with pytest.raises(BadSignature):
        open_envelope(bytes(frame), ReplayGuard())


def test_tampered_body_fails_signature() -> None:
    frame = seal(alice, Goodbye(reason="aaaa"))
    tampered = frame.replace(b"aaaa", b"bbbb")
    with pytest.raises(BadSignature):
        open_envelope(tampered, ReplayGuard())


def test_signature_by_another_key() -> None:
    # mallory signs a header that claims to be from alice
    frame = _signed_header(mallory, _fields(sender=alice.public_bytes))
    with pytest.raises(BadSignature):
        open_envelope(frame, ReplayGuard())


def test_replayed_envelope() -> None:
    guard = ReplayGuard()
    frame = seal(alice, Heartbeat(seq=1, uptime_s=1.0))
    open_envelope(frame, guard)
    with pytest.raises(ReplayError, match="already received"):
        open_envelope(frame, guard)


def test_same_nonce_from_two_senders_is_not_a_replay() -> None:
    guard, nonce = ReplayGuard(), os.urandom(NONCE_BYTES)
    open_envelope(seal(alice, Goodbye(), nonce=nonce), guard)
    open_envelope(seal(mallory, Goodbye(), nonce=nonce), guard)
    assert len(guard) == 2


@pytest.mark.parametrize("offset_s", [-120, 120])
def test_expired_or_future_timestamp(offset_s: int) -> None:
    ts = int((time.time() + offset_s) * 1000)
    frame = seal(alice, Heartbeat(seq=1, uptime_s=1.0), timestamp_ms=ts)
    with pytest.raises(ExpiredError, match="off our clock"):
        open_envelope(frame, ReplayGuard(window_s=60))


def test_stored_frames_open_without_a_guard() -> None:
    old = seal(alice, Goodbye(), timestamp_ms=1)
    assert open_envelope(old, None).timestamp_ms == 1


def test_frame_over_the_cap() -> None:
    with pytest.raises(TooLarge, match="over the cap"):
        open_envelope(b"\x00" * (max_frame_bytes() + 1), ReplayGuard())


def test_body_over_its_type_cap() -> None:
    frame = _signed_header(alice, _fields(body=b"\x00" * (Heartbeat.MAX_BYTES + 1)))
    with pytest.raises(TooLarge, match=r"membership\.heartbeat"):
        open_envelope(frame, ReplayGuard())


def test_unknown_message_type() -> None:
    frame = _signed_header(alice, _fields(type="membership.bogus"))
    with pytest.raises(UnknownMessageType, match=r"membership\.bogus"):
        open_envelope(frame, ReplayGuard())


def test_wrong_major_version_names_both() -> None:
    frame = _signed_header(alice, _fields(version="2.0.0"))
    with pytest.raises(VersionMismatch, match=r"2\.0\.0.*1\.0\.0"):
        open_envelope(frame, ReplayGuard())


def test_future_header_layout_still_reports_version() -> None:
    frame = _signed_header(alice, ["3.1.0", {"a": "totally new header"}])
    with pytest.raises(VersionMismatch, match=r"3\.1\.0"):
        open_envelope(frame, ReplayGuard())


def test_newer_minor_version_is_accepted() -> None:
    frame = _signed_header(alice, _fields(version="1.7.2"))
    assert open_envelope(frame, ReplayGuard()).sender == alice.peer_id


def test_truncated_frame() -> None:
    frame = seal(alice, Heartbeat(seq=1, uptime_s=1.0))
    with pytest.raises(DecodeError, match="truncated"):
        open_envelope(frame[: SIGNATURE_BYTES - 1], ReplayGuard())
    with pytest.raises((DecodeError, BadSignature)):
        open_envelope(frame[:-10], ReplayGuard())


def test_wrong_field_types_in_header() -> None:
    frame = _signed_header(alice, _fields(timestamp_ms="yesterday"))
    with pytest.raises(DecodeError, match="timestamp"):
        open_envelope(frame, ReplayGuard())


def test_wrong_field_types_in_body() -> None:
    body = msgspec.msgpack.encode({"seq": "one", "uptime_s": 1.0})
    frame = _signed_header(alice, _fields(body=body))
    with pytest.raises(DecodeError, match=r"\$\.seq"):
        open_envelope(frame, ReplayGuard())


def test_bad_frame_leaves_replay_state_intact() -> None:
    guard = ReplayGuard()
    good = seal(alice, Heartbeat(seq=1, uptime_s=1.0))
    open_envelope(good, guard)
    bad = bytearray(seal(alice, Heartbeat(seq=2, uptime_s=1.0)))
    bad[-1] ^= 1
    with pytest.raises(BadSignature):
        open_envelope(bytes(bad), guard)
    assert len(guard) == 1
    with pytest.raises(ReplayError):
        open_envelope(good, guard)


def test_full_replay_cache_forgets_oldest_but_never_admits_a_replay() -> None:
    guard = ReplayGuard(window_s=60, max_entries=3)
    now = int(time.time() * 1000)
    frames = [seal(alice, Goodbye(), timestamp_ms=now - 1000 + i) for i in range(5)]
    for f in frames:
        open_envelope(f, guard, now_ms=now)
    assert len(guard) == 3
    for f in frames:  # forgotten ones are now "older than the replay memory"
        with pytest.raises((ReplayError, ExpiredError)):
            open_envelope(f, guard, now_ms=now)


def test_nonces_leave_memory_with_the_window() -> None:
    guard = ReplayGuard(window_s=1)
    now = int(time.time() * 1000)
    open_envelope(seal(alice, Goodbye(), timestamp_ms=now), guard, now_ms=now)
    open_envelope(seal(alice, Goodbye(), timestamp_ms=now + 1500), guard, now_ms=now + 1500)
    assert len(guard) == 1
