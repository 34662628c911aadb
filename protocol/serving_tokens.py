"""Serving tokens: the coordinator's signed word that one gateway may use one node's serving
endpoint until a given time.

A node's OpenAI-compatible endpoint (``node/roles/serving.py``) answers only requests that carry
such a token, so no client can skip the gateway and its metering. The coordinator hands them to
the gateways it admits (``coordinator/gateways.py``), one per serving node, with the routes::

    token = "bzs1." base64url(msgpack ServingToken) "." base64url(Ed25519 signature)

The signature is the coordinator's (its peer id embeds the key, and every node knows the peer
id of the coordinator it joined) over a domain tag plus the exact payload bytes; the tag keeps a
token's signature and an envelope's (``protocol/envelope.py``, same key) from standing in for
each other. A node accepts a token that verifies against its coordinator, names this node as
its ``audience`` (a node that is sent a token cannot use it at another node) and is within its
lifetime, give or take ``skew_s`` for clocks that disagree. Tokens are bearer credentials, sent
as ``Authorization: Bearer <token>``; the gateway never forwards its clients' API keys.

>>> from protocol.identity import Identity
>>> coordinator, node = Identity.generate(), Identity.generate()
>>> token = issue(coordinator, "gw-1", node.peer_id, now=1000.0, ttl_s=300)
>>> verify(token, coordinator.public_bytes, node.peer_id, now=1100.0).gateway
'gw-1'
>>> verify(token, coordinator.public_bytes, node.peer_id, now=1400.0)
Traceback (most recent call last):
...
protocol.errors.ExpiredError: the serving token expired 100 s ago
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Annotated

import msgspec

from protocol.codec import Name, PeerIdStr, decode_struct, encode_struct
from protocol.errors import BadSignature, DecodeError, ExpiredError, Forbidden
from protocol.identity import Identity, verify_signature

PREFIX = "bzs1."
SIGNING_DOMAIN = b"bazaar/serving-token/v1\x00"
MAX_TOKEN_CHARS = 1024
"""A longer header value is refused before it is decoded."""
DEFAULT_SKEW_S = 30.0


class ServingToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """What the coordinator vouches for (all times are its clock's, Unix seconds)."""

    gateway: Name
    """The admitted gateway it was issued to."""
    audience: PeerIdStr
    """The peer id of the one node whose endpoint it opens."""
    issued_at: float
    expires_at: float
    token_id: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    """Random: tells two tokens of the same gateway, node and second apart (for logs)."""


def issue(identity: Identity, gateway: str, audience: str, now: float, ttl_s: float) -> str:
    """A token for ``gateway`` at node ``audience``, valid ``ttl_s`` from ``now``."""
    token = ServingToken(gateway, audience, now, now + ttl_s, os.urandom(16))
    payload = encode_struct(token)
    return PREFIX + _b64(payload) + "." + _b64(identity.sign(SIGNING_DOMAIN + payload))


def decode(token: str) -> tuple[ServingToken, bytes, bytes]:
    """``(fields, payload, signature)`` of a token, unverified; ``DecodeError`` if malformed."""
    if len(token) > MAX_TOKEN_CHARS or not token.startswith(PREFIX):
        raise DecodeError("not a serving token (they start with 'bzs1.')")
    payload_b64, dot, signature_b64 = token[len(PREFIX) :].partition(".")
    if not dot:
        raise DecodeError("a serving token has a payload and a signature, separated by '.'")
    payload, signature = _unb64(payload_b64), _unb64(signature_b64)
    return decode_struct(payload, ServingToken, "serving token"), payload, signature


def verify(
    token: str, issuer_key: bytes, audience: str, now: float, skew_s: float = DEFAULT_SKEW_S
) -> ServingToken:
    """The token's fields once it is signed by ``issuer_key`` (the coordinator's raw public
    key), names ``audience`` and is valid at ``now`` ± ``skew_s``. Raises ``DecodeError``
    (malformed), ``BadSignature``, ``Forbidden`` (for another node) or ``ExpiredError``."""
    fields, payload, signature = decode(token)
    if not verify_signature(issuer_key, signature, SIGNING_DOMAIN + payload):
        raise BadSignature("the serving token is not signed by this node's coordinator")
    if fields.audience != audience:
        raise Forbidden("the serving token is for another node")
    if now > fields.expires_at + skew_s:
        raise ExpiredError(f"the serving token expired {now - fields.expires_at:.0f} s ago")
    if now < fields.issued_at - skew_s:
        raise ExpiredError(f"the serving token is not valid for {fields.issued_at - now:.0f} s")
    return fields


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"a serving token is base64url: {e}") from None
