"""What one peer may cost this process: the transport's limits, its budgets and its fault count.

Every byte a peer sends reaches us through the transport (``protocol/p2p.py``), so that is where
a peer's cost is bounded. Three pieces, none of which imports py-libp2p:

- ``TransportLimits``: the numbers, as config fields (``[transport]`` of the coordinator's and
  the node's config), each chosen from the real sizes of our messages and the slowest honest
  peer we mean to serve.
- ``StreamBudget``: concurrent inbound request streams per peer and per connection, bytes of
  unfinished request frames per peer and in all, and each peer's last activity (for closing idle
  connections). Reservations are released in ``finally`` blocks, so a stalled, reset or timed
  out stream gives everything back.
- ``PeerFaults``: ``bazaar_peer_faults_total{layer,reason}`` and a log line per (peer, layer,
  reason) per minute, so a flood of bad frames costs one log line a minute.
- ``RateLimit``: that once-per-key-per-minute limiter, also used for gossip refusals.

>>> budget = StreamBudget(TransportLimits(max_streams_per_peer=1))
>>> budget.open_request("alice"), budget.open_request("alice"), budget.open_request("bob")
(True, False, True)
>>> budget.close_request("alice"); budget.open_request("alice")
True
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Hashable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

KiB, MiB = 1024, 1024 * 1024
K = TypeVar("K", bound=Hashable)


class TransportLimits(BaseModel):
    """What one peer may hold of this process at once. The defaults serve an honest peer on a
    1 Mbit/s link; the largest request anyone sends us is a trainer's round report (1 MiB).

    A config section like the services' ``ConfigModel`` (same settings), defined here so that
    the transport needs nothing from ``protocol/service/``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    request_timeout_s: float = Field(10.0, gt=0, le=600)
    """Read deadline of one request frame, from the stream's opening to its last byte. A 1 MiB
    round report takes 8.4 s at 1 Mbit/s; a stream still short of its frame then is reset and
    its memory released."""
    max_streams_per_peer: int = Field(32, ge=1, le=10_000)
    """Inbound request streams one peer may have open at once, over all its connections. An
    honest node has at most a handful (three leases pipelined, a receipt, an audit, fetches)."""
    max_streams_per_connection: int = Field(64, ge=1, le=10_000)
    """Streams of every protocol (ours, gossip, identify, ping) one connection may have open at
    once; a peer opening more has that connection closed."""
    max_inflight_bytes_per_peer: int = Field(4 * MiB, ge=64 * KiB)
    """Bytes of request frames one peer may have declared and not yet finished sending: the
    largest request (1 MiB) and a few small ones. A frame over it is refused before its body."""
    max_inflight_bytes: int = Field(64 * MiB, ge=1 * MiB)
    """The same over all peers together: what unfinished requests may pin of this process."""
    idle_connection_s: float = Field(120.0, gt=0)
    """A connection over which a peer sent nothing (no request, no gossip, no control frame)
    this long is closed. Honest peers gossip heartbeats every few seconds and ask for peers
    every 10 s; a reconnect costs them one dial."""
    max_gossip_rpc_bytes: int = Field(256 * KiB, ge=16 * KiB)
    """Largest gossipsub frame accepted; our largest gossip message is an adapter manifest of
    64 KiB. Larger frames close the gossip stream."""
    max_handshakes_per_address: int = Field(16, ge=1, le=10_000)
    """Inbound connections one IP address may have in their handshake at once; py-libp2p has
    250 such slots in all, which one address could otherwise hold."""
    max_connections_per_address: int = Field(128, ge=1, le=10_000)
    """Inbound connections one IP address may hold open. py-libp2p takes 300 in all; a local
    network of many nodes on one machine stays under this."""
    max_stream_window_bytes: int = Field(1 * MiB, ge=256 * KiB, le=16 * MiB)
    """Largest receive window a yamux stream grows to: what a peer may have in flight on one
    stream, and so what a stream whose reader stalls can hold. 1 MiB moves 10 MB/s a stream
    at 100 ms round trip; py-libp2p's own 16 MiB let one unread stream pin 46 MB. Process-wide
    (py-libp2p reads it from its module): the last host created sets it."""
    handshake_timeout_s: float = Field(10.0, gt=0, le=600)
    """Time a new connection or stream has to finish its security handshake, muxer and
    protocol negotiation."""


class PeerFaults:
    """Counts and logs what peers did wrong, at any layer of the transport or above."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.counter = Counter(
            "bazaar_peer_faults",
            "Bad input or over-budget use by a peer, by layer and reason; the peer's stream or "
            "connection was closed and the process kept serving",
            ["layer", "reason"],
            registry=registry,
        )
        self._log_limit = RateLimit(60.0)

    def record(self, peer: str, layer: str, reason: str, detail: str) -> None:
        self.counter.labels(layer, reason).inc()
        if self._log_limit.allow((peer, layer, reason)):
            log.warning(
                "peer %s: %s fault (%s): %s",
                peer or "?",
                layer,
                reason,
                detail,
                extra={"peer": peer, "layer": layer, "reason": reason},
            )


class StreamBudget:
    """Inbound request streams and unfinished request bytes, per peer and in all, and when each
    peer was last heard from."""

    def __init__(self, limits: TransportLimits) -> None:
        self.limits = limits
        self._streams: Tally[str] = Tally()
        self._conn_streams: Tally[Hashable] = Tally()
        self._bytes: Tally[str] = Tally()
        self.inflight_bytes = 0
        self._heard: dict[str, float] = {}

    def open_request(self, peer: str) -> bool:
        """Room for one more inbound request stream of ``peer``; False if it has its cap."""
        if self._streams[peer] >= self.limits.max_streams_per_peer:
            return False
        self._streams[peer] += 1
        return True

    def close_request(self, peer: str) -> None:
        decrement(self._streams, peer)

    def open_connection_stream(self, conn: Hashable) -> bool:
        """Room for one more inbound stream (any protocol) on connection ``conn``."""
        if self._conn_streams[conn] >= self.limits.max_streams_per_connection:
            return False
        self._conn_streams[conn] += 1
        return True

    def close_connection_stream(self, conn: Hashable) -> None:
        decrement(self._conn_streams, conn)

    def reserve(self, peer: str, nbytes: int) -> bool:
        """Room for a frame of ``nbytes`` that ``peer`` is about to send; False if none."""
        if (
            self._bytes[peer] + nbytes > self.limits.max_inflight_bytes_per_peer
            or self.inflight_bytes + nbytes > self.limits.max_inflight_bytes
        ):
            return False
        self._bytes[peer] += nbytes
        self.inflight_bytes += nbytes
        return True

    def release(self, peer: str, nbytes: int) -> None:
        decrement(self._bytes, peer, nbytes)
        self.inflight_bytes -= nbytes

    def touch(self, peer: str, now: float | None = None) -> None:
        """``peer`` sent us something (or we asked it something): its connection is in use."""
        self._heard[peer] = time.monotonic() if now is None else now

    def idle(self, connected: list[str], now: float | None = None) -> list[str]:
        """The connected peers not heard from for ``idle_connection_s``; forgets the others
        that are no longer connected. A peer first seen here starts its clock now."""
        now = time.monotonic() if now is None else now
        live = set(connected)
        for gone in [p for p in self._heard if p not in live]:
            del self._heard[gone]
        out = []
        for peer in connected:
            last = self._heard.setdefault(peer, now)
            if now - last >= self.limits.idle_connection_s:
                out.append(peer)
                del self._heard[peer]
        return out


def decrement(tally: Tally[K], key: K, n: int = 1) -> None:
    """Take ``n`` from ``tally[key]``, dropping the key at zero: a tally keyed by peers or
    addresses stays as small as what is open."""
    left = tally[key] - n
    if left > 0:
        tally[key] = left
    else:
        tally.pop(key, None)


class RateLimit:
    """``allow(key)`` is True at most once per ``period_s`` for each key."""

    def __init__(self, period_s: float = 60.0, max_keys: int = 10_000) -> None:
        self.period_s = period_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            return False
        if len(self._last) >= self.max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self.period_s}
        self._last[key] = now
        return True
