from __future__ import annotations

import pytest

from protocol.errors import DecodeError, VersionMismatch
from protocol.versions import check_compatible, check_version, parse_protocol_id, protocol_id


def test_ids_carry_versions() -> None:
    assert protocol_id("join") == "/bazaar/join/1.0.0"
    assert parse_protocol_id("/bazaar/join/1.2.3") == ("join", (1, 2, 3))
    with pytest.raises(ValueError):
        protocol_id("Bad Name")
    with pytest.raises(DecodeError):
        parse_protocol_id("/ipfs/id/1.0.0")


def test_major_mismatch_names_both_versions() -> None:
    with pytest.raises(VersionMismatch, match=r"/bazaar/join/2\.0\.0.*/bazaar/join/1\.0\.0"):
        check_compatible("/bazaar/join/2.0.0", "/bazaar/join/1.0.0")
    with pytest.raises(VersionMismatch, match=r"2\.1\.0 \(major 2\).*1\.0\.0 \(major 1\)"):
        check_version("2.1.0", "1.0.0")
    check_compatible("/bazaar/join/1.9.0", "/bazaar/join/1.0.0")
    check_version("1.4.0", "1.0.0")
    with pytest.raises(DecodeError):
        check_version("x.y", "1.0.0")
