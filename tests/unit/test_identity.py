"""Key files: created 0600, reloaded to the same peer id, refused when corrupt or exposed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import DecodeError, IdentityError
from protocol.identity import (
    Identity,
    load_identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_created_with_private_modes(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.key"
    ident, created = load_or_create_identity(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, created_again = load_or_create_identity(path)
    assert not created_again
    assert again.peer_id == ident.peer_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    before = path.read_bytes()
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)
    assert path.read_bytes() == before  # never replaced


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key at all", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_corrupt_key_file_is_refused_not_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="will not replace it"):
        load_or_create_identity(path)
    assert path.read_bytes() == content


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        load_identity(path)


def test_peer_id_embeds_the_key_and_rejects_others() -> None:
    ident = Identity.generate()
    assert ident.peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(ident.peer_id) == ident.public_bytes
    with pytest.raises(DecodeError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # sha256 id
    with pytest.raises(DecodeError):
        public_key_from_peer_id("0OIl")  # not base58
    with pytest.raises(DecodeError):
        peer_id_from_public_key(b"short")


def test_seed_round_trip_and_signatures() -> None:
    ident = Identity.generate()
    clone = Identity.from_seed(ident.seed())
    assert clone.peer_id == ident.peer_id
    sig = ident.sign(b"data")
    assert verify_signature(ident.public_bytes, sig, b"data")
    assert not verify_signature(ident.public_bytes, sig, b"other")
    assert not verify_signature(Identity.generate().public_bytes, sig, b"data")
    assert not verify_signature(ident.public_bytes, sig[:10], b"data")
