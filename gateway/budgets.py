"""Budget reservations on the request path, without a database write per request.

The database stays the authority (``gateway/keys.py``): this gateway process *holds* part of a
key's budget — taken with one conditional ``UPDATE``, so the holds of every gateway on the
database fit the budget — and reserves each request's worst case against its hold in memory.
The check and the update happen with no ``await`` between them, so on the event loop they are
one atomic step: however many requests race, the reservations never exceed the hold, and the
hold never exceeds the budget.

When a request does not fit what is free in the hold, the hold grows (by ``block_tokens``, or
by exactly what is missing when the budget has less left); if the budget cannot cover it, the
request is refused. Settling a request frees its reservation and charges what it used out of
the hold (the database write follows, after the answer). A key idle for ``idle_s`` gets its
hold back, as does every key when the gateway stops; a gateway that crashed gives back its
previous run's holds when it starts again (``KeyStore.release_all``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from protocol.accounts import ApiKey, KeyStore

log = logging.getLogger(__name__)


@dataclass
class Account:
    held: int = 0
    """Tokens of the key's budget this gateway holds (also counted in the database)."""
    pending: int = 0
    """Of those, reserved by requests in flight."""
    last_used: float = 0.0
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def free(self) -> int:
        return self.held - self.pending


class Ledger:
    def __init__(
        self,
        store: KeyStore,
        gateway: str,
        block_tokens: int = 8192,
        idle_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.gateway = store, gateway
        self.block_tokens, self.idle_s, self.clock = block_tokens, idle_s, clock
        self.accounts: dict[int, Account] = {}

    def start(self) -> None:
        """Give back what an earlier run of this gateway still held (it stopped uncleanly)."""
        if returned := self.store.release_all(self.gateway):
            log.info("gave back %d budget tokens held by this gateway's previous run", returned)

    async def reserve(self, key: ApiKey, tokens: int) -> bool:
        """Reserve ``tokens`` for a request of ``key``; False if its budget cannot cover them."""
        if key.budget_tokens is None:
            return True
        account = self.accounts.setdefault(key.id, Account())
        account.last_used = self.clock()
        if account.free >= tokens:  # the common case: no await, no database
            account.pending += tokens
            return True
        async with account.lock:  # one request at a time grows a key's hold
            if account.free < tokens:
                missing = tokens - account.free
                for grow in dict.fromkeys((max(missing, self.block_tokens), missing)):
                    if await anyio.to_thread.run_sync(self.store.hold, self.gateway, key.id, grow):
                        account.held += grow
                        break
                else:
                    return False
            account.pending += tokens
            return True

    def settle(self, key: ApiKey, reserved: int, used: int) -> int:
        """Free a request's reservation and charge ``used`` out of the hold; returns the tokens
        the database must move from this gateway's hold to the key's used tokens."""
        if key.budget_tokens is None:
            return 0
        account = self.accounts[key.id]
        account.pending -= reserved
        account.held -= used
        account.last_used = self.clock()
        return used

    async def give_back(self, everything: bool = False) -> None:
        """Return the free part of idle keys' holds (of every key's, with ``everything``)."""
        now = self.clock()
        for key_id, account in list(self.accounts.items()):
            if not everything and (account.pending or now - account.last_used < self.idle_s):
                continue
            async with account.lock:
                free = account.free
                if free <= 0:
                    continue
                account.held -= free  # before the await: no request may use them any more
                await anyio.to_thread.run_sync(self.store.release, self.gateway, key_id, free)

    async def give_back_loop(self) -> None:
        while True:
            await anyio.sleep(max(0.05, self.idle_s / 4))
            await self.give_back()
