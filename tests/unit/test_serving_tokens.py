"""Serving tokens (``protocol/serving_tokens.py``): issued by the coordinator's key, refused when
signed by another key, altered, signed for another purpose, made out to another node, expired or
not yet valid; and a node's door (``node/roles/serving_auth.py``), which remembers verified
tokens but not past their expiry and answers each refusal with its OpenAI-style error."""

from __future__ import annotations

import base64

import msgspec
import pytest

from node.roles.serving_auth import ServingDoor
from protocol import serving_tokens
from protocol.envelope import SIGNING_DOMAIN
from protocol.errors import BadSignature, DecodeError, ExpiredError, Forbidden
from protocol.identity import Identity
from protocol.service.api_errors import APIError

COORDINATOR, NODE, OTHER = Identity.generate(), Identity.generate(), Identity.generate()
KEY = COORDINATOR.public_bytes


def token(now: float = 1000.0, ttl: float = 300.0, audience: str = NODE.peer_id) -> str:
    return serving_tokens.issue(COORDINATOR, "gw", audience, now, ttl)


def test_a_token_verifies_for_its_node_within_its_lifetime() -> None:
    t = token()
    fields = serving_tokens.verify(t, KEY, NODE.peer_id, now=1299.0, skew_s=0)
    assert (fields.gateway, fields.audience) == ("gw", NODE.peer_id)
    assert (fields.issued_at, fields.expires_at) == (1000.0, 1300.0)
    assert t.startswith("bzs1.") and len(t) < 400  # fits a header
    assert token() != token()  # a random id in each


def test_refused_when_signed_by_another_key() -> None:
    forged = serving_tokens.issue(OTHER, "gw", NODE.peer_id, 1000.0, 300.0)
    with pytest.raises(BadSignature):
        serving_tokens.verify(forged, KEY, NODE.peer_id, now=1000.0)


def test_refused_when_its_fields_are_altered() -> None:
    fields, _, signature = serving_tokens.decode(token())
    longer = msgspec.structs.replace(fields, expires_at=fields.expires_at + 10**6)
    payload = base64.urlsafe_b64encode(msgspec.msgpack.encode(longer)).rstrip(b"=").decode()
    sig = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    with pytest.raises(BadSignature):
        serving_tokens.verify(f"bzs1.{payload}.{sig}", KEY, NODE.peer_id, now=1000.0)


def test_refused_for_another_node() -> None:
    with pytest.raises(Forbidden, match="another node"):
        serving_tokens.verify(token(audience=OTHER.peer_id), KEY, NODE.peer_id, now=1000.0)


def test_expiry_and_issue_time_allow_the_skew_and_no_more() -> None:
    t = token(now=1000.0, ttl=300.0)
    serving_tokens.verify(t, KEY, NODE.peer_id, now=1330.0, skew_s=30)
    serving_tokens.verify(t, KEY, NODE.peer_id, now=970.0, skew_s=30)
    with pytest.raises(ExpiredError, match="expired"):
        serving_tokens.verify(t, KEY, NODE.peer_id, now=1330.5, skew_s=30)
    with pytest.raises(ExpiredError, match="not valid"):
        serving_tokens.verify(t, KEY, NODE.peer_id, now=969.0, skew_s=30)


@pytest.mark.parametrize(
    "bad",
    ["", "bz-key", "bzs1.", "bzs1.abc", "bzs1.!!!.???", "bzs1.AAAA.AAAA", "bzs1." + "A" * 2000],
)
def test_malformed_tokens_are_decode_errors(bad: str) -> None:
    with pytest.raises(DecodeError):
        serving_tokens.verify(bad, KEY, NODE.peer_id, now=1000.0)


def test_a_signature_made_for_anything_else_is_no_token_signature() -> None:
    """The coordinator signs envelopes with the same key: the domain tags keep them apart."""
    _, payload, _ = serving_tokens.decode(token())
    b64 = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()  # noqa: E731
    for signed in (payload, SIGNING_DOMAIN + payload):
        t = f"bzs1.{b64(payload)}.{b64(COORDINATOR.sign(signed))}"
        with pytest.raises(BadSignature):
            serving_tokens.verify(t, KEY, NODE.peer_id, now=1000.0)


def test_the_door_remembers_a_verified_token_until_it_expires() -> None:
    now = [1000.0]
    door = ServingDoor(None, KEY, NODE.peer_id, skew_s=1.0, clock=lambda: now[0])
    t = token(now=1000.0, ttl=10.0)
    assert door.check(t).gateway == "gw"
    now[0] = 1010.9
    assert door.check(t).gateway == "gw"  # remembered, still within skew
    now[0] = 1011.5
    with pytest.raises(APIError) as expired:
        door.check(t)
    assert (expired.value.status, expired.value.code) == (401, "expired_serving_token")
    with pytest.raises(APIError) as again:  # forgotten once expired: verified afresh, refused
        door.check(t)
    assert again.value.code == "expired_serving_token"
    for presented, status, code in [
        ("", 401, "missing_serving_token"),
        ("not-a-token", 401, "invalid_serving_token"),
        (serving_tokens.issue(OTHER, "gw", NODE.peer_id, now[0], 10), 401, "invalid_serving_token"),
        (token(now=now[0], audience=OTHER.peer_id), 403, "wrong_audience"),
    ]:
        with pytest.raises(APIError) as refused:
            door.check(presented)
        assert (refused.value.status, refused.value.code) == (status, code)
        assert refused.value.body()["error"]["type"] in ("authentication_error", "permission_error")
