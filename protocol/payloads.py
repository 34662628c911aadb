"""Serving and fetching rollout payloads over py-libp2p (``/bazaar/payload/1.0.0``).

The producer answers a signed ``PayloadRequest`` with the stored frame, byte for byte. The
fetcher accepts it only if it hashes to the digest it asked for (``HashMismatch`` otherwise: a
tampered or substituted payload), is a validly signed ``RolloutPayload``, and was signed by the
producer it asked (``BadSignature`` otherwise). Rewards are never part of a payload: whoever
consumes it recomputes them with the environment.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence

import trio

from protocol.adapters import ShardRequest, TrainingPart
from protocol.codec import MiB
from protocol.envelope import Envelope, ReplayGuard, open_envelope, seal
from protocol.errors import BadSignature, DecodeError, HashMismatch, NotFound, ProtocolError
from protocol.identity import Identity
from protocol.p2p import P2PHost
from protocol.payload_store import PayloadStore
from protocol.rollouts import PayloadRequest, RolloutPayload
from protocol.versions import PAYLOAD as PAYLOAD_PROTOCOL
from protocol.versions import SHARDS as SHARDS_PROTOCOL

log = logging.getLogger(__name__)

MAX_PAYLOAD_FRAME = 33 * MiB
"""A payload body's cap (32 MiB) plus the envelope around it."""


def serve_payloads(host: P2PHost, store: PayloadStore) -> None:
    """Answer payload requests from ``store``."""
    serve_by_hash(host, PAYLOAD_PROTOCOL, store, PayloadRequest, "payload")


def serve_by_hash(
    host: P2PHost,
    protocol: str,
    store: PayloadStore,
    request: type[PayloadRequest] | type[ShardRequest],
    what: str,
    on_served: Callable[[int], None] = lambda n: None,
) -> None:
    """Answer signed requests for content by hash (payloads, adapter shards) from ``store``,
    with the stored bytes as they are: the requester checks them against the hash it asked
    for. ``on_served(bytes)`` counts the upload."""
    guard = ReplayGuard()

    async def handle(peer: str, data: bytes) -> bytes:
        env = open_envelope(data, guard)
        if env.sender != peer or not isinstance(env.message, request):
            raise DecodeError(f"a {what} request must be a {request.__name__} signed by its sender")
        digest = (
            env.message.payload_hash
            if isinstance(env.message, PayloadRequest)
            else env.message.sha256
        )
        content = store.get(digest)
        if content is None:
            raise NotFound(f"no {what} {digest.hex()} here")
        on_served(len(content))
        return content

    host.serve(protocol, handle, max_request_bytes=4096)


async def fetch_payload(
    host: P2PHost,
    identity: Identity,
    producer: str,
    digest: bytes,
    timeout_s: float = 30.0,
    source: str | None = None,
) -> Envelope:
    """The producer's signed payload with this digest, from the producer or from ``source``
    (a peer that kept a copy: the coordinator keeps every payload it recounted); refuses
    anything else, so who serves it does not matter."""
    frame = await _payload_frame(host, identity, source or producer, digest, timeout_s)
    return _stored(frame, digest, producer, "producer", RolloutPayload, source or producer)


async def _payload_frame(
    host: P2PHost, identity: Identity, peer: str, digest: bytes, timeout_s: float
) -> bytes:
    request = seal(identity, PayloadRequest(payload_hash=digest))
    cap = MAX_PAYLOAD_FRAME
    return await host.request(peer, PAYLOAD_PROTOCOL, request, max_response_bytes=cap,
                              timeout_s=timeout_s)  # fmt: skip


async def fetch_part(
    host: P2PHost,
    identity: Identity,
    trainer: str,
    digest: bytes,
    timeout_s: float = 30.0,
    source: str | None = None,
) -> tuple[TrainingPart, bytes]:
    """A trainer's committed part of a round and its frame, from the trainer (served with its
    adapter shards, by hash) or from ``source`` (the coordinator keeps every committed part,
    served with the payloads): it must hash to the commitment and be a ``TrainingPart`` signed
    by ``trainer``."""
    if source is None:
        request = seal(identity, ShardRequest(sha256=digest))
        peer, protocol = trainer, SHARDS_PROTOCOL
    else:
        request = seal(identity, PayloadRequest(payload_hash=digest))
        peer, protocol = source, PAYLOAD_PROTOCOL
    frame = await host.request(peer, protocol, request, max_response_bytes=MAX_PAYLOAD_FRAME,
                               timeout_s=timeout_s)  # fmt: skip
    env = _stored(frame, digest, trainer, "trainer", TrainingPart, peer)
    assert isinstance(env.message, TrainingPart)
    return env.message, frame


def payload_sources(producer: str, addrs: Sequence[str]) -> dict[str, list[str]]:
    """A payload's sources (a rollout reference's or an assignment's addresses) by peer id, in
    order; an address without ``/p2p/`` is the producer's."""
    out: dict[str, list[str]] = {}
    for addr in addrs:
        _, sep, peer = addr.rpartition("/p2p/")
        out.setdefault(peer if sep and peer else producer, []).append(addr)
    return out or {producer: []}


class Unserved(NotFound):
    """No source served a payload. ``failures`` holds ``(kind, detail)`` for each source, the
    kind ``forged`` when it served bytes that are not the producer's payload of that digest
    (a wrong hash, signer or type: evidence against whoever served them) and ``unavailable``
    when it did not answer in time, could not be reached or said it has none."""

    def __init__(self, digest: bytes, failures: list[tuple[str, str]]) -> None:
        self.failures = failures
        why = "; ".join(detail for _, detail in failures) or "no source"
        super().__init__(f"no source served payload {digest.hex()[:12]}: {why}")

    @property
    def forged(self) -> bool:
        return any(kind == "forged" for kind, _ in self.failures)


async def fetch_rollout(
    host: P2PHost,
    identity: Identity,
    producer: str,
    addrs: Sequence[str],
    digest: bytes,
    timeout_s: float = 30.0,
    deadline: float | None = None,
) -> Envelope:
    """The producer's signed payload from the first of its sources that serves it: the
    producer, then a peer that kept a copy (the coordinator, for every rollout it counted), so
    a crashed producer's rollouts are not lost to those who consume them. Each source gets
    ``timeout_s``, and none is asked after ``deadline`` (a ``time.time()``); ``Unserved`` when
    none serves it, naming why each did not."""
    failures: list[tuple[str, str]] = []
    for source, at in payload_sources(producer, addrs).items():
        name = source[:12]
        budget = timeout_s if deadline is None else min(timeout_s, deadline - time.time())
        if budget <= 0:
            failures.append(("unavailable", f"{name}: not asked before the deadline"))
            continue
        try:
            with trio.fail_after(budget):
                await host.connect_any(list(at))
                frame = await _payload_frame(host, identity, source, digest, budget)
        except (ProtocolError, OSError, trio.TooSlowError) as e:
            failures.append(("unavailable", f"{name}: {type(e).__name__}: {e}"))
            continue
        try:  # a whole answer that is not the producer's payload of this digest
            return _stored(frame, digest, producer, "producer", RolloutPayload, source)
        except ProtocolError as e:
            failures.append(("forged", f"{name}: {type(e).__name__}: {e}"))
    raise Unserved(digest, failures)


async def fetch_committed_part(
    host: P2PHost,
    identity: Identity,
    trainer: str,
    addrs: list[str],
    digest: bytes,
    coordinator: str,
    timeout_s: float = 20.0,
) -> TrainingPart | None:
    """A committed part from its trainer (at ``addrs``), else from the coordinator (which keeps
    every part a manifest averages); None when neither serves it (why is logged)."""
    for source in (None, coordinator):
        try:
            if source is None:
                await host.connect_any(addrs)
            part, _ = await fetch_part(host, identity, trainer, digest, timeout_s, source=source)
            return part
        except (ProtocolError, OSError, trio.TooSlowError) as e:
            log.info("part %s of %s not fetched from %s: %s", digest.hex()[:12], trainer,
                     source or "the trainer", e)  # fmt: skip
    return None


def _stored(
    frame: bytes,
    digest: bytes,
    signer: str,
    role: str,
    kind: type[RolloutPayload] | type[TrainingPart],
    served_by: str,
) -> Envelope:
    """A fetched frame of content addressed by ``digest``, as a fetcher accepts it: it hashes
    to that digest (``HashMismatch``: tampered or substituted), is a validly signed ``kind``
    (``DecodeError``), signed by ``signer`` — the producer or trainer it belongs to, whoever
    served it (``BadSignature``)."""
    what = kind.TYPE.rpartition(".")[2].replace("_", " ")
    actual = hashlib.sha256(frame).digest()
    if actual != digest:
        raise HashMismatch(f"{what} from {served_by} hashes to {actual.hex()}, not {digest.hex()}")
    env = open_envelope(frame, None)  # a stored frame: signature and schema, no replay window
    if env.sender != signer:
        raise BadSignature(f"{what} was signed by {env.sender}, not by its {role} {signer}")
    if not isinstance(env.message, kind):
        raise DecodeError(f"expected a {what}, got {env.message.TYPE}")
    return env
