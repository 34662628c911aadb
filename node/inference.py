"""The inference role: take a lease, generate its groups, keep the payload, submit a receipt.

The loop, once the node has joined:

1. ask the coordinator for a lease (``LeaseRequest`` on ``/bazaar/leases/1.0.0``, naming the
   base model); ``NoLease`` says how long to wait before asking again;
2. on the first lease, load the base model (``--model``; the tiny model is built first if
   missing) in a worker thread, so heartbeats go on meanwhile and a node with no work never
   spends the memory; a model that cannot be loaded stops the role with one clear error;
3. regenerate the leased prompts from the environment and generate every group in one batch
   with seeds derived from the lease (``node/rollouts.py``), off the event loop;
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

import trio
from prometheus_client import Counter, Histogram

from node.config import NodeConfig
from node.payload_store import PayloadStore
from node.payloads import serve_payloads
from node.rollouts import completion_tokens, generate_rollouts
from protocol.envelope import seal
from protocol.errors import ProtocolError
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.rollouts import ReceiptAck, RolloutReceipt
from protocol.versions import protocol_id

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger(__name__)

LEASES_PROTOCOL = protocol_id("leases")


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


class InferenceWorker:
    """One node's inference role. Subclass and override a step to build a misbehaving node."""

    def __init__(self, config: NodeConfig, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.store = PayloadStore(
            data_dir / "payloads", config.payload_max_bytes, config.payload_retention_s
        )
        self.backend: Any = None
        self.adapter_versions: dict[str, int] = {}
        self._envs: dict[str, Any] = {}

    async def __call__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.metrics = InferenceMetrics(agent.metrics.registry)
        serve_payloads(agent.host, self.store)
        while True:
            try:
                reply = await agent.ask(self.lease_request(), (Lease, NoLease), LEASES_PROTOCOL)
            except ProtocolError as e:
                log.warning("lease request failed: %s", e)
                await trio.sleep(self.config.reconnect_max_backoff_s)
                continue
            if isinstance(reply, Lease):
                if self.backend is None and not await self.load():
                    return
                await self.work(reply)
            elif isinstance(reply, NoLease):
                await trio.sleep(reply.retry_after_s)

    def lease_request(self) -> LeaseRequest:
        return LeaseRequest(
            max_prompts=self.config.max_prompts_per_lease,
            base_model=self.config.model,
            adapter_versions=self.adapter_versions,
        )

    async def load(self) -> bool:
        started = time.monotonic()
        try:
            self.backend = await _in_thread(self.load_backend)
        except (OSError, ValueError) as e:
            log.error(
                "cannot load model %r (%s); this node takes no inference work", self.config.model, e
            )
            return False
        log.info(
            "loaded model %s on %s in %.1fs",
            self.config.model,
            self.backend.device,
            time.monotonic() - started,
        )
        return True

    def load_backend(self) -> Any:
        import torch

        from node.backends.torch_backend import TorchBackend
        from node.models.loading import resolve

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cache = Path(self.config.model_cache) if self.config.model_cache else self.data_dir
        return TorchBackend.from_pretrained(resolve(self.config.model, cache), device=device)

    def environment(self, name: str) -> Any:
        from envs import load_environment

        if name not in self._envs:
            self._envs[name] = load_environment(name)
        return self._envs[name]

    # -- one lease ----------------------------------------------------------------------------

    async def work(self, lease: Lease) -> None:
        started = time.monotonic()
        self.metrics.leases.inc()
        try:
            payload = await _in_thread(self.generate, lease)
        except ValueError as e:  # an environment or adapter this node cannot serve
            log.error("cannot serve lease %s of run %s: %s", lease.lease_id, lease.run_id, e)
            return
        frame = seal(self.agent.identity, payload)
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

    def generate(self, lease: Lease) -> Any:
        """The lease's payload (runs in a worker thread)."""
        adapter = None
        if lease.policy_version:
            if self.adapter_versions.get(lease.run_id) != lease.policy_version:
                raise ValueError(f"adapter version {lease.policy_version} is not loaded")
            adapter = f"{lease.run_id}@{lease.policy_version}"
        env = self.environment(lease.env_id)
        return generate_rollouts(self.backend, self.backend.tokenizer, env, lease, adapter)

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


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run model work off the event loop; on shutdown, stop waiting for it rather than stall
    the goodbye (the thread's result is dropped)."""
    # trio-typing's stubs predate ``abandon_on_cancel``
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)  # type: ignore[call-arg]
