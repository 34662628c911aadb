"""The inference role: take a lease, generate its groups, keep the payload, submit a receipt.

The loop, once the node has joined:

1. ask the coordinator for a lease (``LeaseRequest`` on ``/bazaar/leases/1.0.0``, naming the
   base model and the adapter versions held); on ``NoLease``, fetch any current adapter version
   not held yet (``node/store/versions.py``: a run past version 0 is leased only to its holders) and
   ask again, or wait as long as the coordinator says;
2. on the first lease, start the model process (``node/model/worker.py``) and load the base
   model in it (``--model``; the tiny model is built first if missing), so a node with no work
   never spends the memory; a model that cannot be loaded stops the role with one clear error;
3. in the model process, regenerate the leased prompts from the environment and generate every
   group in one batch with seeds derived from the lease (``node/model/rollouts.py``), with the
   adapter of the lease's version; a lease is
   fetched ahead while another generates, and receipts go out while the next one generates;
4. sign the ``RolloutPayload`` and put the exact frame in the content-addressed store, served to
   verifiers and trainers over ``/bazaar/payload/1.0.0``;
5. submit a signed ``RolloutReceipt`` (payload hash, counts, version); the coordinator's
   ``ReceiptAck`` says whether it counted. Resubmitting is harmless, so a receipt that could not
   be delivered is retried.

A lease this node cannot serve (an environment it does not have, an adapter version it does not
hold) is logged and left to expire, to be re-issued to another node; the node carries on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import Counter, Histogram

from node.config import NodeConfig
from node.model.rollouts import completion_tokens
from node.model.worker import ModelSpec, ModelWorker
from node.roles.base import Role
from node.store.adapters import AdapterStore
from node.store.versions import VersionSync
from protocol.envelope import seal
from protocol.errors import ProtocolError
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.payload_store import PayloadStore
from protocol.payloads import serve_payloads
from protocol.rollouts import ReceiptAck, RolloutPayload, RolloutReceipt
from protocol.versions import LEASES as LEASES_PROTOCOL

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger(__name__)


class InferenceMetrics:
    def __init__(self, registry: Any) -> None:
        r = registry
        self.leases = Counter("bazaar_leases_taken", "Leases received", registry=r)
        self.receipts = Counter(
            "bazaar_receipts_submitted",
            "Receipts acknowledged, by outcome",
            ["outcome"],
            registry=r,
        )
        self.tokens = Counter("bazaar_generated_tokens", "Completion tokens generated", registry=r)
        self.lease_seconds = Histogram(
            "bazaar_lease_seconds",
            "Lease to acknowledged receipt",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )


class InferenceRole(Role):
    """One node's inference role. Subclass and override a step to build a misbehaving node."""

    name = "inference"

    def __init__(
        self,
        config: NodeConfig,
        data_dir: Path,
        model: ModelWorker | None = None,
        store: PayloadStore | None = None,
        versions: VersionSync | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.store = store or PayloadStore(
            data_dir / "payloads", config.payload_max_bytes, config.payload_retention_s
        )
        self.model = model or ModelWorker(ModelSpec.of(config, data_dir))
        self.versions = versions or VersionSync(
            config.model, AdapterStore(data_dir / "adapters"), PayloadStore(data_dir / "shards")
        )
        self.adapters = self.versions.adapters
        self._next_sync = 0.0

    async def run(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.metrics = InferenceMetrics(agent.metrics.registry)
        serve_payloads(agent.host, self.store)
        self.versions.attach(agent)
        # two leases are with the model at a time (one generating, the next queued in its
        # pipe) and receipts go out while the next lease generates: the model never waits on
        # the network
        slots = trio.Semaphore(2)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.versions.follow)
            if self.config.preload and not await self.model.ensure_started(nursery):
                return
            while True:
                await slots.acquire()
                lease = await self._next_lease()
                if not await self.model.ensure_started(nursery):
                    nursery.cancel_scope.cancel()
                    return
                await self._announce_profile()
                nursery.start_soon(self._run_lease, lease, slots)

    async def _announce_profile(self) -> None:
        """Once the model is loaded, tell the network how it computes (its payloads carry
        the same, signed)."""
        caps = self.agent.capabilities
        if self.model.profile is not None and caps.compute != self.model.profile:
            await self.agent.announce(msgspec.structs.replace(caps, compute=self.model.profile))

    async def _run_lease(self, lease: Lease, slots: trio.Semaphore) -> None:
        try:
            await self.work(lease)
        finally:
            slots.release()

    async def _next_lease(self) -> Lease:
        while True:
            try:
                reply = await self.agent.ask(
                    self.lease_request(), (Lease, NoLease), LEASES_PROTOCOL
                )
            except ProtocolError as e:
                log.warning("lease request failed: %s", e)
                await trio.sleep(e.retry_after_s or self.config.reconnect_max_backoff_s)
                continue
            if isinstance(reply, Lease):
                self.metrics.leases.inc()
                return reply
            if isinstance(reply, NoLease):
                now = trio.current_time()
                if now >= self._next_sync:  # at most every few seconds: it is a request too
                    self._next_sync = now + 5.0
                    if await self.versions.sync():  # a run moved on: this node can work at it
                        continue
                await trio.sleep(reply.retry_after_s)

    def lease_request(self) -> LeaseRequest:
        return LeaseRequest(
            max_prompts=self.config.max_prompts_per_lease,
            base_model=self.config.model,
            adapter_versions=self.adapters.newest(),
        )

    # -- one lease ----------------------------------------------------------------------------

    async def work(self, lease: Lease) -> None:
        """Generate the lease's payload, then deliver it in the background."""
        started = time.monotonic()
        try:
            payload = await self.generate(lease)
        except ValueError as e:  # an environment or adapter this node cannot serve
            log.error("cannot serve lease %s of run %s: %s", lease.lease_id, lease.run_id, e)
            return
        frame = seal(self.agent.identity, payload)
        self._nursery.start_soon(self.deliver, lease, payload, frame, started)

    async def generate(self, lease: Lease) -> RolloutPayload:
        """The lease's payload, from the model process."""
        adapter = self.adapters.for_version(lease.run_id, lease.policy_version)
        return await self.model.produce(lease, adapter)

    async def deliver(
        self, lease: Lease, payload: RolloutPayload, frame: bytes, started: float
    ) -> None:
        """Store the frame and submit the receipt naming it."""
        digest = self.store.put(frame)
        tokens = completion_tokens(payload)
        self.metrics.tokens.inc(tokens)
        receipt = RolloutReceipt(
            lease_id=lease.lease_id,
            run_id=lease.run_id,
            policy_version=payload.policy_version,
            payload_hash=digest,
            num_samples=len(payload.samples),
            completion_tokens=tokens,
            profile=payload.profile,
        )
        ack = await self.submit(receipt)
        if ack is not None:
            self.metrics.receipts.labels(ack.outcome).inc()
            self.metrics.lease_seconds.observe(time.monotonic() - started)
            log.info(
                "lease %s: %d samples, %d tokens in %.2fs: %s",
                lease.lease_id,
                len(payload.samples),
                tokens,
                time.monotonic() - started,
                ack.outcome,
                extra={"run_id": lease.run_id, "lease_id": lease.lease_id},
            )

    async def submit(self, receipt: RolloutReceipt, attempts: int = 5) -> ReceiptAck | None:
        backoff = 0.5
        for attempt in range(attempts):
            try:
                return await self.agent.ask(receipt, ReceiptAck, LEASES_PROTOCOL)
            except ProtocolError as e:
                log.warning(
                    "receipt %s not delivered (%s); attempt %d", receipt.lease_id, e, attempt + 1
                )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)
        log.error("gave up submitting the receipt of lease %s", receipt.lease_id)
        return None
