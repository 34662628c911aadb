"""The protocol's one error tree: everything that can go wrong with bytes from a peer.

Decoding, verifying and admitting a frame raises only these (the fuzz tests hold it to that), so
a caller needs one ``except ProtocolError`` to turn any bad input into a recorded, logged outcome::

    ProtocolError                 anything a peer sent that we refuse
    ├── DecodeError               not valid msgpack, truncated, or fields of the wrong type
    ├── TooLarge                  a frame or body over the size cap of its message type
    ├── UnknownMessageType        a type tag no registered message carries
    ├── VersionMismatch           a peer speaks another major version (names both versions)
    ├── BadSignature              the signature does not verify for the claimed sender's key
    ├── ReplayError               this (sender, nonce) was already accepted
    ├── ExpiredError              the timestamp lies outside the acceptance window
    ├── NotFound                  a peer does not have what was asked for (a payload, a shard)
    ├── Forbidden                 the sender may not ask this (lacks the role, banned)
    │   └── NotMember             the sender is no live member (never joined, left, declared dead)
    ├── HashMismatch              content does not hash to the digest it was fetched by
    ├── RateLimited               the sender asks too often, or holds too much; retry_after_s
    └── RemoteError               a peer answered a request with an error of its own

    ConfigError                   a config file or override that does not fit its model
    IdentityError                 a key file that is missing, corrupt or readable by others

``ConfigError`` and ``IdentityError`` are local mistakes, not peer input, so they stand beside the
tree rather than in it; both are ``ValueError`` subclasses whose message says how to fix them.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes from a peer that we refuse. ``reason`` is a short stable label for metrics;
    ``retry_after_s`` is when asking again may succeed (0: not by waiting)."""

    reason = "protocol_error"
    retry_after_s = 0.0


class DecodeError(ProtocolError):
    reason = "decode_error"


class TooLarge(ProtocolError):
    reason = "too_large"


class UnknownMessageType(ProtocolError):
    reason = "unknown_type"


class VersionMismatch(ProtocolError):
    reason = "version_mismatch"


class BadSignature(ProtocolError):
    reason = "bad_signature"


class ReplayError(ProtocolError):
    reason = "replay"


class ExpiredError(ProtocolError):
    reason = "expired"


class NotFound(ProtocolError):
    reason = "not_found"


class Forbidden(ProtocolError):
    reason = "forbidden"


class NotMember(Forbidden):
    """The coordinator does not count the sender as a live member: it never joined, said
    goodbye, or was declared dead (its heartbeats stopped arriving). A node told this joins
    again over a fresh connection."""

    reason = "not_member"


class HashMismatch(ProtocolError):
    reason = "hash_mismatch"


class RateLimited(ProtocolError):
    """The sender asked too often, or holds too much already; it may ask again after
    ``retry_after_s``."""

    reason = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class RemoteError(ProtocolError):
    """A peer answered a request with an error; ``code`` is its reason label, and
    ``retry_after_s`` when it said to ask again (``rate_limited``)."""

    reason = "remote_error"

    def __init__(self, code: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(f"peer refused ({code}): {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class ConfigError(ValueError):
    """A config file or command-line override that does not fit its model."""


class IdentityError(ValueError):
    """A node key file that cannot be used; never answered by silently making a new identity."""
