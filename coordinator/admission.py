"""Admission: how fast a peer, and an address, may join and ask for leases, and how many leases
members without a clean audit may hold.

A peer id costs nothing to make, so every limit that matters is also kept per IP address, and
the work a new identity can take is capped by trust, not by identity: members that have not yet
passed an audit hold at most ``unaudited_leases_per_address`` leases per address and
``unaudited_leases`` in all. A Sybil with a thousand keys on one machine therefore holds no more
leases than eight honest newcomers, and joins no faster than ``joins_per_address`` allows.
Refusals are ``RateLimited`` (reason ``rate_limited``) with the seconds after which asking again
can succeed; nodes wait that long.

The token buckets are written here rather than taken from a rate-limit library: a bucket is a
few lines, the coordinator needs the exact wait to tell the peer, and the keys must stay
bounded under a flood of fresh identities (``max_keys``).

>>> buckets = TokenBuckets(Rate(burst=2, per_s=1))
>>> buckets.take("a", now=0), buckets.take("a", now=0), buckets.take("a", now=0)
(0.0, 0.0, 1.0)
>>> buckets.take("a", now=1)
0.0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable

from pydantic import Field

from protocol.errors import RateLimited
from protocol.service.config import ConfigModel


class Rate(ConfigModel):
    burst: float = Field(gt=0)
    """Requests allowed at once, from a full bucket."""
    per_s: float = Field(gt=0)
    """Requests per second allowed on average, once the burst is spent."""


class AdmissionConfig(ConfigModel):
    joins_per_peer: Rate = Rate(burst=6, per_s=0.2)
    """Joins of one identity: a node rejoins after a lost connection or a coordinator restart,
    a handful of times a minute at most."""
    joins_per_address: Rate = Rate(burst=64, per_s=2.0)
    """Joins from one IP address, whatever the identities: a machine (or a local test network)
    starts dozens of nodes at once, never thousands."""
    leases_per_peer: Rate = Rate(burst=40, per_s=20.0)
    """Lease requests (not receipts) of one identity: an honest node asks once per finished
    lease and once a second per idle slot (three slots)."""
    leases_per_address: Rate = Rate(burst=400, per_s=200.0)
    """Lease requests from one IP address."""
    unaudited_leases_per_address: int = Field(24, ge=0)
    """Leases that members without a passed audit may hold at once from one IP address: eight
    new nodes' worth (three each; ``bazaar up --nodes 8`` stays under it). A new node is audited
    on every receipt until trusted, so an honest one leaves this pool with its first passed
    audit."""
    unaudited_leases: int = Field(96, ge=0)
    """Leases all members without a passed audit may hold at once, from every address."""
    unaudited_retry_after_s: float = Field(5.0, gt=0)
    """How long a member without a passed audit, refused a lease by those two caps, is told to
    wait before asking again."""


class TokenBuckets:
    """One token bucket per key; ``take`` spends a token or says how long until one is there."""

    def __init__(self, rate: Rate, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: Hashable, now: float) -> float:
        """0.0 if a token was spent; else the seconds until one will be there."""
        tokens, at = self._buckets.get(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - at) * self.rate.per_s)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return 0.0
        self._store(key, tokens, now)
        return (1.0 - tokens) / self.rate.per_s

    def _store(self, key: Hashable, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            # full buckets carry no state: forget those first, then the oldest
            self._buckets = {
                k: (t, a)
                for k, (t, a) in self._buckets.items()
                if t + (now - a) * self.rate.per_s < self.rate.burst
            }
            while len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
        self._buckets[key] = (tokens, now)


class Admission:
    """The coordinator's gate for joins and lease requests."""

    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._joins = (TokenBuckets(config.joins_per_peer), TokenBuckets(config.joins_per_address))
        self._leases = (
            TokenBuckets(config.leases_per_peer),
            TokenBuckets(config.leases_per_address),
        )
        self.address_of: dict[str, str] = {}
        """The IP address each peer last asked from."""

    def join(self, peer: str, address: str) -> None:
        self._take(self._joins, peer, address, "joins")

    def lease(self, peer: str, address: str) -> None:
        self._take(self._leases, peer, address, "lease requests")

    def unaudited_lease(self, peer: str, holders: Iterable[str], unaudited: set[str]) -> None:
        """``peer`` (which has not passed an audit) may take one more lease, given the holders
        of the unexpired leases (one entry per lease) and the members without a passed audit."""
        address = self.address_of.get(peer, "")
        held = [h for h in holders if h in unaudited]
        here = sum(self.address_of.get(h, "") == address for h in held)
        retry = self.config.unaudited_retry_after_s
        if here >= self.config.unaudited_leases_per_address:
            raise RateLimited(
                f"{here} leases are held by unaudited members at {address or 'this address'}: "
                "wait for one to finish or for an audit to pass",
                retry,
            )
        if len(held) >= self.config.unaudited_leases:
            raise RateLimited(f"{len(held)} leases are held by unaudited members", retry)

    def _take(
        self, buckets: tuple[TokenBuckets, TokenBuckets], peer: str, address: str, what: str
    ) -> None:
        now = self.clock()
        wait = buckets[0].take(peer, now)
        if wait:
            raise RateLimited(f"too many {what} from this peer", wait)
        wait = buckets[1].take(address, now)
        if wait:
            raise RateLimited(f"too many {what} from {address}", wait)
        self.address_of[peer] = address
