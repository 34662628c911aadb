"""The coordinator's own count of every counted rollout: fetched, counted, scored, kept.

A receipt's token count is its producer's claim. Once a receipt counts, the coordinator fetches
the payload it names from the producer (``protocol/payloads.py``: the hash and the producer's
signature checked, as any consumer checks them), checks that it holds exactly the lease's
samples, counts its completion tokens and — where it has the run's base-model tokenizer
(``--tokenizers.<model>``) — recomputes every reward with the environment. The frame is kept in
the coordinator's payload store: the evidence the ledger reconciles against, and a copy that
outlives its producer.

- A count equal to the claim **confirms** the rollout: only confirmed rollouts are dealt to
  training rounds, so only confirmed tokens are ever billed.
- A count that differs, or a payload that does not fit its lease, is a confirmed failure of
  check ``token_count`` (or ``lease``): the producer's own signed payload contradicts its
  receipt, so no verifier is needed. The rollout is rejected and the producer penalized as for
  any confirmed failure (``Auditing.convict``).
- A producer that does not serve the payload within ``deadline_s`` of its receipt loses the
  lease's count: its examples go back to the queue (status ``unconfirmed``), with no strike —
  a crashed node looks the same.
- The rewards feed the run's stop rule (``target_reward``): rewards no node can bend.

Fetching is done by a few workers over a queue (a payload is small next to the compute that
made it; the coordinator's cost per rollout is one fetch, one hash and one count).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from coordinator.auditing import Auditing
from coordinator.db import LeaseState
from coordinator.lifecycle import RunLifecycle
from coordinator.state import State
from envs import load_environment
from protocol.envelope import open_envelope
from protocol.errors import DecodeError, ProtocolError
from protocol.payload_store import PayloadStore
from protocol.rollouts import RolloutPayload
from protocol.tokenizers import pretrained_args
from verification.rollouts import check_shape, count_tokens, score_rollouts

log = logging.getLogger(__name__)

Fetch = Callable[[LeaseState], Awaitable[bytes]]
"""Fetch a rollout's payload frame from its producer (raises on failure)."""


def open_payload(frame: bytes, lease: LeaseState) -> RolloutPayload:
    """The payload in a kept frame, checked against the lease's receipt: its hash, its signer
    (the producer) and its type; ``DecodeError`` otherwise."""
    if hashlib.sha256(frame).digest() != lease.payload_hash:
        raise DecodeError(f"the payload of lease {lease.lease_id} does not hash to its receipt's")
    env = open_envelope(frame, None)
    if env.sender != lease.node or not isinstance(env.message, RolloutPayload):
        raise DecodeError(f"lease {lease.lease_id}: not a payload signed by its producer")
    return env.message


class Tokenizers:
    """Base model → tokenizer, loaded once each from the configured paths, by whichever
    thread asks first (the recount's workers and the fingerprinting at start ask at once: a
    first ``import transformers`` in two threads together fails in one of them)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self._loaded: dict[str, Any] = {}
        self._fingerprints: dict[str, str] = {}
        self._loading = threading.Lock()

    def has(self, model: str) -> bool:
        return model in self.paths

    def get(self, model: str) -> Any | None:
        if model not in self.paths:
            return None
        with self._loading:
            if model not in self._loaded:
                self._loaded[model] = self._load(self.paths[model])
        return self._loaded[model]

    @staticmethod
    def _load(path: str) -> Any:
        from transformers import AutoTokenizer

        where, kwargs = pretrained_args(path)  # a directory, or a GGUF file
        return AutoTokenizer.from_pretrained(where, **kwargs)

    def fingerprints(self) -> dict[str, str]:
        """Base model → the fingerprint of its tokenizer (``protocol.tokenizers``), which
        gateways check a serving node's tokenizer files against: those computed so far."""
        return dict(self._fingerprints)

    def compute_fingerprints(self) -> None:
        """Load every configured tokenizer and fingerprint it (slow — a GGUF file's tokenizer
        takes seconds: in a thread, at start); one that cannot be loaded has none (logged)."""
        from protocol.tokenizers import fingerprint

        for model in self.paths:
            try:
                self._fingerprints[model] = fingerprint(self.get(model))
            except (OSError, ValueError) as e:
                log.warning("no fingerprint for %s's tokenizer: %s", model, e)


class Recounter:
    def __init__(
        self,
        state: State,
        auditing: Auditing,
        runs: RunLifecycle,
        store: PayloadStore,
        judge: str,
        tokenizers: Tokenizers,
        deadline_s: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.auditing, self.runs = state, auditing, runs
        self.store = store
        self.judge = judge
        """The coordinator's peer id: who recorded a failure it found itself."""
        self.tokenizers = tokenizers
        self.deadline_s = deadline_s
        self.clock = clock
        self.queue: deque[str] = deque()
        self._wake = trio.Event()
        self._counts: dict[bytes, int] = {}  # payload hash -> tokens, counted from a kept frame

    def submit(self, lease_id: str) -> None:
        """Recount this lease's payload (its receipt just counted)."""
        self.queue.append(lease_id)
        self._wake.set()

    def restore(self) -> None:
        """After a restart: recount what was counted and never recounted."""
        for s in self.state.book.leases.values():
            if s.status == "completed" and s.counted and s.recounted_tokens is None:
                self.queue.append(s.lease_id)

    def kept_count(self, lease: LeaseState) -> int | None:
        """The tokens of the lease's payload, counted again from the kept frame (None: not
        kept): the reconciler's own count, independent of every stored number."""
        digest = lease.payload_hash
        if digest is None:
            return None
        if digest not in self._counts:
            frame = self.store.get(digest)
            if frame is None:
                return None
            try:
                self._counts[digest] = count_tokens(open_payload(frame, lease))
            except (DecodeError, ProtocolError):
                return None
        return self._counts[digest]

    async def run(self, fetch: Fetch, workers: int = 4) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(self._worker, fetch)

    async def _worker(self, fetch: Fetch) -> None:
        while True:
            while not self.queue:
                self._wake = trio.Event()
                await self._wake.wait()
            lease_id = self.queue.popleft()
            if not await self.recount(lease_id, fetch):
                await trio.sleep(0.5)  # not fetched yet: back of the queue, a little later
                self.queue.append(lease_id)

    async def recount(self, lease_id: str, fetch: Fetch) -> bool:
        """One attempt; False to try again later."""
        s = self.state.book.leases.get(lease_id)
        if s is None or s.status != "completed" or not s.counted or s.recounted_tokens is not None:
            return True
        try:
            frame = await fetch(s)
        except (ProtocolError, OSError, trio.TooSlowError) as e:
            if self.clock() - (s.completed_at or 0.0) < self.deadline_s:
                log.debug("payload of lease %s not fetched yet: %s", lease_id, e)
                return False
            self.state.book.uncount(lease_id, "unconfirmed")
            self.state.audits.cancel_for({lease_id})
            self.state.commit()
            log.warning("lease %s: %s never served its payload; its examples are redone",
                        lease_id, s.node, extra={"peer": s.node})  # fmt: skip
            return True
        await self.examine(s, frame)
        return True

    async def examine(self, s: LeaseState, frame: bytes) -> None:
        """Count (and score) a fetched frame; convict a producer it contradicts."""
        try:
            payload = open_payload(frame, s)
            check_shape(s.lease, payload)
            tokens = count_tokens(payload)
        except DecodeError as e:
            self.store.put(frame)
            await self.auditing.convict(s, self.judge, "lease", str(e), frame)
            return
        self.store.put(frame)
        self._counts[s.payload_hash or b""] = tokens
        if s.status != "completed":  # penalized while it was being fetched
            return
        s.recounted_tokens = tokens
        if tokens != s.completion_tokens:
            detail = (
                f"receipt claims {s.completion_tokens} completion tokens, payload holds {tokens}"
            )
            log.warning("lease %s of %s: %s", s.lease_id, s.node, detail,
                        extra={"peer": s.node, "lease_id": s.lease_id})  # fmt: skip
            await self.auditing.convict(s, self.judge, "token_count", detail, frame)
            return
        self.state.audits.trust_of(s.node).credited_tokens += tokens  # confirmed: now credited
        run = self.state.book.runs[s.run_id]
        tokenizer = await trio.to_thread.run_sync(self.tokenizers.get, run.plan.spec.base_model)
        if tokenizer is not None:
            s.rewards = await trio.to_thread.run_sync(_rewards, tokenizer, s, payload)
            self.state.rewards.add(s.run_id, s.lease.policy_version, s.rewards)
        self.state.commit()
        await self.runs.check_target(run)


def _rewards(tokenizer: Any, s: LeaseState, payload: RolloutPayload) -> list[float]:
    env = load_environment(s.lease.env_id)
    return [score.reward for group in score_rollouts(env, tokenizer, s.lease, payload)
            for score in group]  # fmt: skip
