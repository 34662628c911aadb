"""Property-based fuzzing: no input makes decoding raise anything but the protocol's own errors.

Three sources of input: random bytes; valid frames mutated (bit flips, truncation, insertion,
splices); and frames whose *mutated* header is re-signed, so the fuzzer reaches the body decoder
past the signature check. Each example has a deadline, so a hang fails the test.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode_body, message_types
from protocol.envelope import ReplayGuard, open_envelope, seal, signing_input
from protocol.errors import ProtocolError
from protocol.identity import SIGNATURE_BYTES, Identity
from tests.examples import EXAMPLES

KEY = Identity.generate()
FRAMES = [seal(KEY, m, timestamp_ms=1) for m in EXAMPLES if m.MAX_BYTES <= 64 * 1024]
FUZZ = settings(
    max_examples=400,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
)


def _open(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        open_envelope(frame, ReplayGuard(), now_ms=1)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        pos = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del frame[pos:]
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del frame[pos : pos + draw(st.integers(1, 16))]
        else:
            frame[pos:pos] = draw(st.sampled_from(FRAMES))[: draw(st.integers(0, 64))]
    return bytes(frame)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _open(data)


@FUZZ
@given(mutated())
def test_mutated_frames(frame: bytes) -> None:
    _open(frame)


@FUZZ
@given(mutated())
def test_mutated_headers_re_signed(frame: bytes) -> None:
    header = frame[:-SIGNATURE_BYTES] if len(frame) > SIGNATURE_BYTES else frame
    _open(header + KEY.sign(signing_input(header)))


@FUZZ
@given(st.sampled_from(sorted(message_types())), st.binary(max_size=2048))
def test_random_bodies_for_every_type(type_name: str, body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_body(type_name, body)
