"""The node's model, in a child process of its own.

Generation runs in a process started fresh ("spawn") that loads the backend once and then turns
leases into payloads on request, over a pipe. Why not a thread beside the event loop: measured on
the tiny model (batches of 128 samples), the same generation ran at ~50-60 % of its speed in a
worker thread of the node process — it shares the GIL with the py-libp2p loop, and torch's
per-op thread-pool handoff is slower off the main thread — and at full speed in a process's main
thread. A child process also keeps the loop's latency (heartbeats, requests) free of model work.

The pipe carries our own objects between our own two processes (a lease in, a ``RolloutPayload``
out), pickled; nothing from a peer is ever unpickled. Every answer is ``("ok", value)`` or
``("error", Failure)``: what the child could not do (a model that cannot load, an environment or
adapter the node lacks, a prompt too long for the context) comes back as its error's code and
message, and the node raises that error's class (``errors.py``: a ``ModelError``, a
``ValueError``). A streamed completion sends ``("part", deltas)`` messages before its answer,
one per decoding step that released text. The child exits when the node closes the pipe or dies.

**Cancelling.** Every request has a slot in an array of flags shared with the child; a caller
that stops waiting (a client that went away) raises its flag, and the child skips the request if
it has not begun it, or ends its generation at the next token (``Cancelled``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from node.model.completions import CompletionJob, CompletionResult, Streamed
from node.model.errors import Cancelled, Failure, ModelError, ModelGone
from protocol.leases import Lease
from protocol.rollouts import ComputeProfile, RolloutPayload
from protocol.service.parent import die_with
from verification.checks import Outcome

log = logging.getLogger(__name__)
SLOTS = 4096
"""Cancel flags shared with the child, one per request in flight (request number mod SLOTS)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the child loads: a resolved model reference, backend and device."""

    model: str
    model_cache: str
    backend: str = "torch"
    device: str = "auto"
    torch_threads: int = 0
    producer: str = "node.model.rollouts:Producer"
    """``module:Class`` of the producer the child runs (tests swap in cheating subclasses)."""

    @classmethod
    def of(cls, config: Any, data_dir: Any) -> ModelSpec:
        """The spec of a node's config (``node.config.NodeConfig``)."""
        return cls(
            model=config.model,
            model_cache=config.model_cache or str(data_dir),
            backend=config.backend,
            device=config.device,
            torch_threads=config.torch_threads,
        )


class ModelWorker:
    """The node side of the pipe. Requests are pipelined: several may be outstanding, the child
    answers them in order, and a reader task hands each answer to its caller."""

    def __init__(self, spec: ModelSpec, max_adapters: int = 4) -> None:
        self.spec = spec
        self.device = ""
        self.profile: ComputeProfile | None = None
        """How the loaded model computes (``ComputeProfile``), once it is loaded."""
        self.dtypes: list[str] = []
        """The dtypes it can check payloads of (``_Child.checkable``), once it is loaded."""
        self._conn: Any = None
        self._proc: Any = None
        self._flags: Any = None
        self._numbers = itertools.count()
        self.cancelled_total = 0
        self.cancelled: list[str] = []
        """What the child said of each request it skipped or stopped for a caller that left
        (``Cancelled``'s message: how far it had got), the latest 100."""
        self._send_lock = trio.Lock()  # FIFO: answers come back in the order requests went out
        self._waiting: deque[trio.MemorySendChannel[tuple[str, Any]]] = deque()
        self._start_lock = trio.Lock()
        self.state = "new"  # new | ready | failed
        self.max_adapters = max_adapters
        self._adapters: OrderedDict[str, int] = OrderedDict()
        """Adapters loaded in the child, least recently used first, with their requests in use."""
        self._adapter_lock = trio.Lock()

    async def ensure_started(self, nursery: trio.Nursery) -> bool:
        """Start it once, for every role of the node; False (logged) if the model cannot load."""
        async with self._start_lock:
            if self.state == "new":
                started = time.monotonic()
                try:
                    await self.start(nursery)
                    self.state = "ready"
                    log.info(
                        "loaded model %s on %s in %.1fs",
                        self.spec.model, self.device, time.monotonic() - started,
                    )  # fmt: skip
                except ModelError as e:
                    self.close()
                    self.state = "failed"
                    log.error("cannot load model %r (%s); no model work here", self.spec.model, e)
        return self.state == "ready"

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the child and load the model in it; ``ModelError`` if it cannot."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._flags = ctx.Array("b", SLOTS, lock=False)
        self._proc = ctx.Process(
            target=_serve, args=(child, self.spec, self._flags, os.getpid()), daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        nursery.start_soon(self._read_answers)
        self.device = await self._call("load")
        self.profile = await self._call("profile")
        self.dtypes = await self._call("checkable")

    async def produce(self, lease: Lease, adapter: tuple[str, str] | None = None) -> RolloutPayload:
        """The lease's payload, sampled with ``adapter`` = ``(name, path)`` (None: the base)."""
        name, path = adapter or (None, "")
        async with self.using(name, path):
            payload: RolloutPayload = await self._call("produce", lease, name)
        return payload

    async def complete(self, job: CompletionJob) -> CompletionResult:
        """Serve one request; ``ContextTooLong`` if it does not fit the model's context,
        another ``ModelError`` if it cannot be served."""
        result: CompletionResult = await self._call("complete", job)
        return result

    async def stream(self, job: CompletionJob) -> AsyncIterator[Streamed]:
        """Serve one request token by token: lists of ``Delta`` as the child releases them
        (the last list ends every choice), then the ``CompletionResult``. Leaving the loop
        early cancels the generation."""
        exchange = self._exchange("complete", dataclasses.replace(job, stream=True), streamed=True)
        async with contextlib.aclosing(exchange) as parts:
            async for _, value in parts:
                yield value

    async def verify(
        self,
        lease: Lease,
        payload: RolloutPayload,
        current_version: int,
        max_staleness: int,
        adapter: tuple[str, str] | None = None,
        claimed_tokens: int | None = None,
    ) -> Outcome:
        """Every check on ``payload``, recomputed with ``adapter`` (the lease's version);
        ``claimed_tokens``: the receipt's count, counted again."""
        name, path = adapter or (None, "")
        async with self.using(name, path):
            outcome: Outcome = await self._call(
                "verify", lease, payload, current_version, max_staleness, name, claimed_tokens
            )
        return outcome

    @asynccontextmanager
    async def using(self, name: str | None, path: str = "") -> AsyncIterator[None]:
        """Hold adapter ``name`` (loaded from ``path`` the first time) loaded for a request;
        None is the base model. Beyond ``max_adapters``, the least recently used adapter that no
        request holds is unloaded."""
        if name is None:
            yield
            return
        async with self._adapter_lock:
            if name not in self._adapters:
                await self._call("load_adapter", name, path)
                self._adapters[name] = 0
            self._adapters.move_to_end(name)
            self._adapters[name] += 1
            idle = [a for a, n in self._adapters.items() if n == 0]
            for old in idle[: max(0, len(self._adapters) - self.max_adapters)]:
                await self._call("unload_adapter", old)
                del self._adapters[old]
        try:
            yield
        finally:
            self._adapters[name] -= 1

    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    async def _call(self, op: str, *args: Any) -> Any:
        async with contextlib.aclosing(self._exchange(op, *args)) as answers:
            async for _, value in answers:
                return value
        raise AssertionError("unreachable: an exchange ends with its answer")

    async def _exchange(
        self, op: str, *args: Any, streamed: bool = False
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """Send a request; yield its ``("part", value)`` messages, then ``("ok", answer)``;
        raise the child's error. A caller that stops early raises the request's cancel flag."""
        number = next(self._numbers)
        slot = number % SLOTS
        answer_send, answer_receive = trio.open_memory_channel[tuple[str, Any]](
            math.inf if streamed else 1
        )
        async with self._send_lock:
            self._flags[slot] = 0
            self._waiting.append(answer_send)
            await _in_thread(self._conn.send, (op, args, slot))
        done = False
        try:
            while True:
                status, value = await answer_receive.receive()
                if status == "error":
                    done = True
                    raise value.error()
                done = status == "ok"
                yield status, value
                if done:
                    return
        finally:
            if not done:  # the caller left: the child skips or stops this request
                self._flags[slot] = 1
            answer_receive.close()

    async def _read_answers(self) -> None:
        while True:
            try:
                answer = await _in_thread(self._conn.recv)
            except (EOFError, OSError) as e:
                while self._waiting:
                    gone = Failure.of(ModelGone(f"model process gone ({e})"))
                    _deliver(self._waiting.popleft(), ("error", gone))
                return
            if answer[0] == "part":
                _deliver(self._waiting[0], answer)
                continue
            if answer[0] == "error" and answer[1].code == Cancelled.code:
                self.cancelled = [*self.cancelled[-99:], answer[1].message]
                self.cancelled_total += 1
            _deliver(self._waiting.popleft(), answer)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()


def _deliver(channel: trio.MemorySendChannel[tuple[str, Any]], message: tuple[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError):  # its caller left (flag raised)
        channel.send_nowait(message)


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Block on the pipe in a worker thread (the GIL is released while it waits); on shutdown,
    stop waiting: the child is a daemon and goes with the node."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)  # type: ignore[call-arg]


def _serve(conn: Any, spec: ModelSpec, flags: Any, node: int) -> None:
    """The child: load on request, then answer requests until the pipe closes or the node
    (process ``node``) dies."""
    die_with(node)
    worker = _Child(spec)
    worker.send_part = lambda deltas: conn.send(("part", deltas))
    while True:
        try:
            op, args, slot = conn.recv()
        except (EOFError, OSError):
            return
        worker.cancelled = lambda slot=slot: bool(flags[slot])
        try:
            if worker.cancelled():
                raise Cancelled("the request was cancelled before it began")
            conn.send(("ok", getattr(worker, op)(*args)))
        except Exception as e:  # every failure goes back to the node, typed
            conn.send(("error", Failure.of(e)))


class _Child:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.backend: Any = None
        self.envs: dict[str, Any] = {}
        self.ref = ""
        self.adapter_paths: dict[str, str] = {}
        self.send_part: Any = None
        self.cancelled: Any = lambda: False
        self._grammars: Any = None
        self.siblings: dict[str, Any] = {}
        """The model in another dtype, loaded when a payload declares it was made so: a
        verifier replays in the producer's dtype (a CPU verifier can compute in bf16)."""

    def load(self) -> str:
        from pathlib import Path

        import torch

        from node.model.loading import resolve

        if self.spec.torch_threads:
            torch.set_num_threads(self.spec.torch_threads)
        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ref = self.ref = resolve(self.spec.model, Path(self.spec.model_cache))
        if self.spec.backend == "vllm":
            from node.model.backends.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(ref)
        else:
            from node.model.backends.torch_backend import TorchBackend

            self.backend = TorchBackend.from_pretrained(ref, device=device)
        return str(self.backend.device)

    def environment(self, name: str) -> Any:
        from envs import load_environment

        if name not in self.envs:
            self.envs[name] = load_environment(name)
        return self.envs[name]

    def produce(self, lease: Lease, adapter: str | None = None) -> RolloutPayload:
        import importlib

        module, _, name = self.spec.producer.partition(":")
        producer_cls = getattr(importlib.import_module(module), name)
        producer = producer_cls(self.backend, self.backend.tokenizer)
        payload: RolloutPayload = producer.produce(self.environment(lease.env_id), lease, adapter)
        return payload

    def profile(self) -> ComputeProfile:
        return self.backend.profile

    def checkable(self) -> list[str]:
        """The dtypes this process replays payloads of with calibrated thresholds: those of
        its model's thresholds (a torch backend loads the model again in another), or its
        own alone (vLLM loads no other)."""
        from verification.checks import calibrated_dtypes, model_key

        own = self.backend.profile.dtype
        dtypes = calibrated_dtypes(model_key(self.backend.base.config))
        return sorted(d for d in dtypes if self.spec.backend == "torch" or d == own)

    def load_adapter(self, name: str, path: str) -> None:
        self.backend.load_adapter(name, path)
        self.adapter_paths[name] = path

    def unload_adapter(self, name: str) -> None:
        self.backend.unload_adapter(name)
        self.adapter_paths.pop(name, None)
        for sibling in self.siblings.values():
            sibling.unload_adapter(name)

    def in_dtype(self, dtype: str, adapter: str | None) -> Any:
        """The backend to replay a payload made in ``dtype`` with: this one, or the model
        loaded again in that dtype (once), holding ``adapter`` too."""
        if dtype == self.backend.profile.dtype or self.spec.backend != "torch":
            return self.backend
        from node.model.backends.torch_backend import TORCH_DTYPES, TorchBackend

        if dtype not in self.siblings:
            self.siblings[dtype] = TorchBackend.from_pretrained(
                self.ref,
                device=str(self.backend.device),
                dtype=TORCH_DTYPES[dtype],  # type: ignore[index]
            )
        sibling = self.siblings[dtype]
        if adapter is not None and adapter not in sibling.adapters:
            sibling.load_adapter(adapter, self.adapter_paths[adapter])
        return sibling

    def complete(self, job: CompletionJob) -> CompletionResult:
        from node.model.completions import run_completion

        if job.grammar is not None and self._grammars is None:
            from node.model.constrained import Grammars

            vocab = int(self.backend.base.config.vocab_size)
            self._grammars = Grammars(self.backend.tokenizer, vocab, self.backend.eos_ids)
        send = self.send_part if job.stream else None
        return run_completion(self.backend, job, send, self.cancelled, self._grammars)

    def verify(
        self,
        lease: Lease,
        payload: RolloutPayload,
        current_version: int,
        max_staleness: int,
        adapter: str | None = None,
        claimed_tokens: int | None = None,
    ) -> Outcome:
        import functools

        import msgspec

        from node.model.rollouts import regenerator
        from verification.checks import (
            Outcome,
            UncalibratedPair,
            model_key,
            thresholds_for,
            verify_payload,
        )

        own, model = self.backend.profile, model_key(self.backend.base.config)
        made = payload.profile.dtype if payload.profile is not None else own.dtype
        replay = msgspec.structs.replace(own, dtype=made)
        try:  # replayed in the dtype the producer declared (and signed), with its thresholds
            thresholds = thresholds_for(payload.profile, replay, model=model)
            backend = self.in_dtype(made, adapter)
            if backend.profile.dtype != made:  # a backend that loads no other dtype (vLLM)
                thresholds = thresholds_for(payload.profile, backend.profile, model=model)
        except UncalibratedPair as e:  # not this verifier's to judge: another one takes it
            return Outcome(False, "verifier_error", f"cannot check this producer's profile: {e}")
        prefill = functools.partial(backend.prefill_batch, adapter=adapter)
        return verify_payload(
            lease, payload, self.environment(lease.env_id), backend.tokenizer,
            backend.eos_ids, backend.base.config.vocab_size,
            prefill, thresholds, current_version, max_staleness, claimed_tokens,
            regenerator(backend, self.environment(lease.env_id), lease, payload.profile, adapter),
        )  # fmt: skip
