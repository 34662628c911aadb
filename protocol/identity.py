"""Node identity: an Ed25519 key, its libp2p-compatible peer id, and the key file.

The peer id is derived exactly as libp2p derives it for Ed25519 keys: the public key is wrapped
in libp2p's ``PublicKey`` protobuf (``KeyType=Ed25519``, ``Data=<32 bytes>``), that 36-byte
encoding is put in an *identity* multihash (the key is short enough to be embedded, not hashed),
and the result is base58btc. So the same key file serves as the py-libp2p host key, and the host's
peer id equals ours; a signature in an envelope is checked against the key embedded in the id.

The key file is PKCS#8 PEM with mode 0600 in the data directory. A key file that is corrupt or
readable by others is an error with a fix in the message, never a reason to quietly mint a new
identity: a node's peer id carries its reputation and credits.

>>> ident = Identity.generate()
>>> public_key_from_peer_id(ident.peer_id) == ident.public_bytes
True
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import DecodeError, IdentityError

KEY_FILE_NAME = "identity.key"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# libp2p PublicKey protobuf for Ed25519: field 1 (Type) varint = 1, field 2 (Data) bytes, len 32.
_PB_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, PUBLIC_KEY_BYTES])
# Identity multihash: code 0x00, then the digest length (36 = the protobuf above).
_MH_IDENTITY_PREFIX = bytes([0x00, len(_PB_ED25519_PREFIX) + PUBLIC_KEY_BYTES])
_PEER_ID_PREFIX = _MH_IDENTITY_PREFIX + _PB_ED25519_PREFIX


def peer_id_from_public_key(public_bytes: bytes) -> str:
    """The libp2p peer id (base58btc, ``12D3KooW...``) of a raw 32-byte Ed25519 public key."""
    if len(public_bytes) != PUBLIC_KEY_BYTES:
        raise DecodeError(f"an Ed25519 public key is 32 bytes, got {len(public_bytes)}")
    return base58.b58encode(_PEER_ID_PREFIX + public_bytes).decode("ascii")


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key embedded in a peer id; DecodeError for any other id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as e:
        raise DecodeError(f"peer id {peer_id!r} is not base58: {e}") from None
    if len(raw) != len(_PEER_ID_PREFIX) + PUBLIC_KEY_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise DecodeError(f"peer id {peer_id!r} does not embed an Ed25519 key")
    return raw[len(_PEER_ID_PREFIX) :]


@functools.lru_cache(maxsize=4096)
def _public_key(public_bytes: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_bytes)


def verify_signature(public_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by that key."""
    if len(public_bytes) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(public_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair and the peer id it stands for."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_from_public_key(self.public_bytes)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """From the 32-byte private seed (what libp2p's Ed25519 key serializes to)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The raw 32-byte private seed, for handing the same key to the libp2p host."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def load_identity(path: Path) -> Identity:
    """Read a key file, refusing one that others can read or that is not an Ed25519 key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"no key file at {path}; `bazaar identity show` creates one") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"key file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"anyone who reads it can act as this node. Fix it with: chmod 600 {path}"
        )
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(_corrupt(path, f"not a readable PEM private key ({e})")) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(_corrupt(path, f"holds a {type(key).__name__}, not an Ed25519 key"))
    return Identity(key)


def _corrupt(path: Path, what: str) -> str:
    return (
        f"key file {path} is {what}. Bazaar will not replace it with a new identity, because the "
        f"peer id carries this node's reputation and credits: restore the file from a backup, or "
        f"move it away to start as a new node."
    )


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """The identity in ``path``, created (mode 0600, parent 0700) if the file does not exist.

    Returns ``(identity, created)``.
    """
    if path.exists():
        return load_identity(path), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity.generate()
    # O_EXCL: two processes starting at once cannot both write a key; the loser reads the winner's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_identity(path), False
    with os.fdopen(fd, "wb") as f:
        f.write(ident.to_pem())
    return ident, True
