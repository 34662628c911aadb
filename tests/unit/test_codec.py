"""Every message type round-trips; strict decoding refuses wrong shapes with DecodeError."""

from __future__ import annotations

import msgspec
import pytest

from protocol.codec import decode_body, encode_body, message_types
from protocol.errors import DecodeError, TooLarge, UnknownMessageType
from protocol.membership import Goodbye, Heartbeat
from tests.examples import EXAMPLES


def test_examples_cover_every_registered_type() -> None:
    assert {type(m) for m in EXAMPLES} == set(message_types().values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: msgspec.Struct) -> None:
    data = encode_body(msg)  # type: ignore[arg-type]
    assert decode_body(msg.TYPE, data) == msg  # type: ignore[attr-defined]


def test_wrong_field_type_names_the_field() -> None:
    data = msgspec.msgpack.encode({"seq": "seven", "uptime_s": 1.0})
    with pytest.raises(DecodeError, match=r"membership.heartbeat.*\$\.seq"):
        decode_body("membership.heartbeat", data)


def test_unknown_field_is_refused() -> None:
    data = msgspec.msgpack.encode({"seq": 1, "uptime_s": 1.0, "extra": 1})
    with pytest.raises(DecodeError, match="extra"):
        decode_body("membership.heartbeat", data)


def test_missing_field_is_refused() -> None:
    with pytest.raises(DecodeError, match="seq"):
        decode_body("membership.heartbeat", msgspec.msgpack.encode({"uptime_s": 1.0}))


def test_out_of_range_value_is_refused() -> None:
    with pytest.raises(DecodeError, match="seq"):
        decode_body("membership.heartbeat", msgspec.msgpack.encode({"seq": -1, "uptime_s": 0.0}))


def test_truncated_body() -> None:
    data = encode_body(Goodbye(reason="a long enough reason"))
    with pytest.raises(DecodeError, match="truncated"):
        decode_body("membership.goodbye", data[:-3])


def test_unknown_type() -> None:
    with pytest.raises(UnknownMessageType, match=r"no\.such"):
        decode_body("no.such", b"\x80")


def test_body_over_cap_is_refused_before_decoding() -> None:
    with pytest.raises(TooLarge, match="cap of 1024"):
        decode_body("membership.heartbeat", b"\x00" * (Heartbeat.MAX_BYTES + 1))


def test_encoding_over_cap_is_refused() -> None:
    with pytest.raises(TooLarge):
        encode_body(Goodbye(reason="x" * 4096 * 1))  # fits Text, but not Goodbye's 1 KiB cap
