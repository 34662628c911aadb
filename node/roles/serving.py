"""A node's OpenAI-compatible endpoint (``bazaar node start --serve``), for the gateway to route to.

``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``, ``POST
/v1/completions``, ``/health``; served by hypercorn on the node's own trio loop, the model
answering from the node's model process. Only ``/health`` is open: everything else answers only
gateways the coordinator admits, by the serving token each request carries
(``node/roles/serving_auth.py``), so nobody skips the gateway's metering.

Requests follow OpenAI's API (``protocol/service/openai_api.py``): messages as apps send them,
``n``, ``stop``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``logprobs`` with
``top_logprobs``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, ``response_format``,
``stream`` with ``stream_options.include_usage``; unknown fields are ignored; every response
carries ``x-request-id``. Errors are OpenAI-shaped (``protocol/service/api_errors.py``).

**Tools.** Declared tools are rendered into the prompt (``protocol/chat.py``); a reply's
``<tool_call>`` blocks become ``message.tool_calls`` (ids ``call_…``, JSON ``arguments``) with
``finish_reason: "tool_calls"``, the text around them ``content`` (null when there is none).
``tool_choice`` ``required`` or a named function decodes under a grammar of call blocks, so the
call is always well-formed and its arguments fit the schema; ``response_format`` likewise
(``protocol/grammar.py``); ``none`` leaves the reply as text.

**Streaming** is true streaming: the model process releases text as each token makes it final
(``node/model/completions.py``), and each release leaves as chunks at once — the role first, then
content (with its tokens' logprobs when asked), one ``finish_reason`` per choice, the usage chunk
when asked, ``data: [DONE]``. Text that may open a tool call is held until the call is complete,
then sent as ``delta.tool_calls`` (id, type and name first, then the arguments), as OpenAI's
assemble. A client that leaves — streaming or not — ends the generation in the model process.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
import trio
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram

from envs.tools import parse_tool_calls
from node.model.completions import CompletionJob, CompletionResult, Streamed, TokenInfo
from node.model.errors import ContextTooLong
from node.model.worker import ModelWorker
from node.roles.base import Role
from node.roles.serving_auth import ServingDoor
from node.store.adapters import AdapterStore, adapter_name
from node.store.versions import VersionSync
from protocol.chat import TOOL_CALL_OPEN
from protocol.identity import public_key_from_peer_id
from protocol.service.api_errors import (
    APIError,
    RequestIdMiddleware,
    error_body,
    install_error_handlers,
)
from protocol.service.http import serve_http
from protocol.service.openai_api import ChatRequest, CompletionRequest, OpenAIRequest, model_card
from protocol.serving_tokens import DEFAULT_SKEW_S

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DEFAULT_TOKENS = 256
"""``max_tokens`` when a chat request gives none (bounded by the model's context anyway)."""


class Served(Protocol):
    def models(self) -> list[str]:
        """What this node serves: the base model first, then adapters."""
        ...

    async def complete(self, model: str, job: CompletionJob) -> CompletionResult:
        """Run ``job`` on ``model``; ``KeyError`` if it is not served (any more),
        ``ContextTooLong`` if the request does not fit its context, another ``ValueError``
        (a ``ModelError``) if the model cannot serve it."""
        ...

    def stream(self, model: str, job: CompletionJob) -> AsyncIterator[Streamed]:
        """``complete``, token by token: lists of ``Delta``, then the ``CompletionResult``
        (the same errors as ``complete``, before the first item)."""
        ...

    def tokenizer_files(self) -> bytes:
        """The base model's tokenizer files, packed (``protocol.tokenizers``); slow the first
        time (call in a thread)."""
        ...


class ServingMetrics:
    """The endpoint's Prometheus metrics, on the node's registry."""

    def __init__(self, registry: CollectorRegistry, model: ModelWorker) -> None:
        self.ttft = Histogram(
            "bazaar_serving_ttft_seconds", "Time from a streamed request to its first text",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry,
        )  # fmt: skip
        self.cancelled = Gauge(
            "bazaar_serving_cancelled", "Generations ended because their client left",
            registry=registry,
        )  # fmt: skip
        self.cancelled.set_function(lambda: model.cancelled_total)


def create_app(
    served: Served,
    coordinator_key: bytes,
    peer_id: str,
    skew_s: float = DEFAULT_SKEW_S,
    metrics: ServingMetrics | None = None,
) -> FastAPI:
    """The endpoint's app, open to serving tokens that ``coordinator_key`` signed for
    ``peer_id`` (this node)."""
    app = FastAPI(title="Bazaar node", docs_url=None, redoc_url=None)

    app.add_middleware(ServingDoor, coordinator_key=coordinator_key, peer_id=peer_id,
                       skew_s=skew_s)  # fmt: skip
    app.add_middleware(RequestIdMiddleware)  # the outer one: refusals carry a request id too

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": served.models()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = served.models()
        return {"object": "list", "data": [model_card(m, models[0]) for m in models]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        models = served.models()
        if model not in models:
            raise APIError(404, f"the model {model!r} does not exist here", "model_not_found",
                           "model")  # fmt: skip
        return model_card(model, models[0])

    @app.get("/v1/tokenizer")
    async def tokenizer() -> Response:
        """The base model's tokenizer files, for a gateway to count tokens with: it checks
        them against the fingerprint the coordinator records (``protocol.tokenizers``)."""
        try:
            files = await trio.to_thread.run_sync(served.tokenizer_files)
        except (OSError, ValueError) as e:
            raise APIError(503, f"this node cannot send its tokenizer: {e}",
                           "tokenizer_unavailable") from None  # fmt: skip
        return Response(files, media_type="application/msgpack")

    def unknown(req: OpenAIRequest) -> APIError:
        return APIError(404, f"the model {req.model!r} does not exist here",
                        "model_not_found", "model")  # fmt: skip

    def refused(e: Exception, req: OpenAIRequest) -> APIError:
        if isinstance(e, KeyError):
            return unknown(req)
        if isinstance(e, ContextTooLong):
            return APIError(400, str(e), "context_length_exceeded", "messages")
        return APIError(503, f"the model could not serve this request: {e}", "model_unavailable")

    async def run(request: Request, req: OpenAIRequest, job: CompletionJob) -> CompletionResult:
        if req.model not in served.models():
            raise unknown(req)
        try:
            result = await _until_disconnect(request, lambda: served.complete(req.model, job))
        except (KeyError, ValueError) as e:
            raise refused(e, req) from None
        if result is None:  # the client left; the model process stopped generating for it
            raise APIError(499, "the client closed the request", "client_closed")
        return result

    async def open_stream(req: OpenAIRequest, job: CompletionJob) -> AsyncIterator[Streamed]:
        """The model's deltas, its errors (before any text) raised here, as a whole answer's."""
        if req.model not in served.models():
            raise unknown(req)
        deltas = served.stream(req.model, job)
        started = time.perf_counter()
        try:
            first = await deltas.__anext__()
            if metrics is not None:
                metrics.ttft.observe(time.perf_counter() - started)
        except (KeyError, ValueError) as e:
            raise refused(e, req) from None

        async def rest() -> AsyncIterator[Streamed]:
            yield first
            async for more in deltas:
                yield more

        return rest()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, req: ChatRequest) -> dict[str, Any] | StreamingResponse:
        messages, grammar = req.check()
        job = CompletionJob(
            messages=messages,
            max_tokens=req.max_completion_tokens or req.max_tokens or MAX_DEFAULT_TOKENS,
            temperature=req.temperature, top_p=req.top_p, n=req.n, stop=req.stops(),
            seed=req.seed, grammar=grammar, stream=req.stream,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
            ignore_eos=req.ignore_eos,
        )  # fmt: skip
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        tools = req.choice() not in (None, "none")
        if req.stream:
            deltas = await open_stream(req, job)
            return _sse(_chat_chunks(rid, created, req, deltas, tools))
        result = await run(request, req, job)
        choices = []
        for i, c in enumerate(result.choices):
            message = _message(c.text, tools, forced=req.choice() not in (None, "none", "auto"))
            reason = _reason(message, c.finish_reason)
            logprobs = {"content": [_token_logprob(t) for t in c.tokens], "refusal": None}
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": logprobs if req.logprobs else None})  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(result)}  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(
        request: Request, req: CompletionRequest
    ) -> dict[str, Any] | StreamingResponse:
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        job = CompletionJob(
            prompt=prompt, max_tokens=req.max_tokens or 16, temperature=req.temperature,
            top_p=req.top_p, n=req.n, stop=req.stops(), seed=req.seed, stream=req.stream,
            top_logprobs=req.logprobs or 0, ignore_eos=req.ignore_eos,
        )  # fmt: skip
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            deltas = await open_stream(req, job)
            return _sse(_completion_chunks(rid, created, req, deltas))
        result = await run(request, req, job)
        choices = [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": _completion_logprobs(c.tokens, 0) if req.logprobs is not None else None}
            for i, c in enumerate(result.choices)
        ]  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(result)}  # fmt: skip

    return app


async def _until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """``await work()``, or None as soon as the client disconnects (``work`` is cancelled,
    which raises the request's cancel flag in the model process)."""
    result: list[T] = []
    failed: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        async def do() -> None:
            try:
                result.append(await work())
            except Exception as e:  # raised below as itself, not in an exception group
                failed.append(e)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        nursery.start_soon(do)
    if failed:
        raise failed[0]
    return result[0] if result else None


def _message(text: str, tools: bool, forced: bool = False) -> dict[str, Any]:
    """An assistant message: its text, and its tool calls when tools were offered. Under a
    forced ``tool_choice`` the grammar let the model write nothing but calls: what is left over
    is the unfinished start of a call that ``max_tokens`` cut, not content."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if not tools:
        return message
    content, calls = parse_tool_calls(text)
    calls = [c for c in calls if c.name]  # a block that is not a call stays text
    if calls:
        message["content"] = None if forced else content or None
        message["tool_calls"] = [
            {"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]  # fmt: skip
    return message


def _reason(message: dict[str, Any], finished: str) -> str:
    """``tool_calls`` when the model called tools and stopped by itself; ``length`` when
    ``max_tokens`` cut it, calls or not (as OpenAI reports a cut answer)."""
    return "tool_calls" if message.get("tool_calls") and finished != "length" else finished


def _usage(result: CompletionResult) -> dict[str, int]:
    p, c = result.prompt_tokens, result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _token_logprob(t: TokenInfo) -> dict[str, Any]:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                             for s, lp in t.top]}  # fmt: skip


def _completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
    """``/v1/completions`` logprobs: tokens, their logprobs, alternatives, text offsets."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}  # fmt: skip


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n".encode()
        except ValueError as e:  # the model failed after the first chunk went out
            err = error_body(f"the model failed mid-stream: {e}", "model_unavailable",
                             kind="api_error")  # fmt: skip
            yield f"data: {json.dumps(err)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class _ToolHold:
    """Streamed text of one choice with tools offered: content goes out until a tool-call block
    may begin, then is held; at the end, held text is parsed into calls (or released)."""

    def __init__(self) -> None:
        self.held = ""
        self.calling = False

    def feed(self, text: str) -> str:
        """What of ``text`` may go out as content now."""
        if self.calling:
            self.held += text
            return ""
        text = self.held + text
        at = text.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.calling, self.held = True, text[at:]
            return text[:at]
        keep = next((k for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1)
                     if text.endswith(TOOL_CALL_OPEN[:k])), 0)  # fmt: skip
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


async def _chat_chunks(
    rid: str, created: int, req: ChatRequest, deltas: AsyncIterator[Streamed], tools: bool
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": req.model, "choices": choices, **extra}  # fmt: skip

    holds = [_ToolHold() for _ in range(req.n)]
    forced = req.choice() not in (None, "none", "auto")
    usage = None
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])  # fmt: skip
    async for batch in deltas:
        if isinstance(batch, CompletionResult):  # the last item: the whole answer
            usage = _usage(batch)
            continue
        for d in batch:
            text = holds[d.index].feed(d.text) if tools else d.text
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [_token_logprob(t) for t in d.tokens], "refusal": None}
            if text or (logprobs and logprobs["content"]):
                yield chunk([{"index": d.index, "delta": {"content": text},
                              "logprobs": logprobs, "finish_reason": None}])  # fmt: skip
            if d.finish_reason is None:
                continue
            reason, hold = d.finish_reason, holds[d.index]
            if tools and hold.held:
                message = _message(hold.held, tools, forced=forced)
                calls = message.get("tool_calls") or []
                reason = _reason(message, reason)
                if calls:
                    for k, call in enumerate(calls):
                        head = {
                            "index": k,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                        args = {
                            "index": k,
                            "function": {"arguments": call["function"]["arguments"]},
                        }
                        for part in (head, args):
                            yield chunk([{"index": d.index, "delta": {"tool_calls": [part]},
                                          "logprobs": None, "finish_reason": None}])  # fmt: skip
                if message.get("content"):
                    yield chunk([{"index": d.index, "delta": {"content": message["content"]},
                                  "logprobs": None, "finish_reason": None}])  # fmt: skip
            yield chunk([{"index": d.index, "delta": {}, "logprobs": None,
                          "finish_reason": reason}])  # fmt: skip
    if req.include_usage() and usage is not None:
        yield chunk([], usage=usage)


async def _completion_chunks(
    rid: str, created: int, req: CompletionRequest, deltas: AsyncIterator[Streamed]
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, **extra}  # fmt: skip

    offsets, usage = [0] * req.n, None
    async for batch in deltas:
        if isinstance(batch, CompletionResult):
            usage = _usage(batch)
            continue
        for d in batch:
            logprobs = None
            if req.logprobs is not None:
                logprobs = _completion_logprobs(d.tokens, offsets[d.index])
            offsets[d.index] += len(d.text)
            if d.text or d.tokens:
                yield chunk([{"index": d.index, "text": d.text, "finish_reason": None,
                              "logprobs": logprobs}])  # fmt: skip
            if d.finish_reason is not None:
                yield chunk([{"index": d.index, "text": "", "finish_reason": d.finish_reason,
                              "logprobs": None}])  # fmt: skip
    if req.include_usage() and usage is not None:
        yield chunk([], usage=usage)


class ServingRole(Role):
    """The node role that runs the endpoint: loads the model at start (a serving node should
    answer its first request promptly), serves the base model and every adapter version in the
    node's adapter store, and announces what it serves whenever that changes."""

    name = "serving"

    def __init__(
        self,
        model: ModelWorker,
        sock: socket.socket,
        base: str,
        store: AdapterStore,
        rescan_s: float = 1.0,
        versions: VersionSync | None = None,
        token_skew_s: float = DEFAULT_SKEW_S,
    ) -> None:
        self.model, self.sock, self.base, self.store = model, sock, base, store
        self.rescan_s = rescan_s
        self.token_skew_s = token_skew_s
        """How far the coordinator's clock may be off ours, for serving tokens' lifetimes."""
        self.versions = versions
        """The node's ``VersionSync``: a serving node follows new and deployed versions."""
        self._models = [base, *store.model_names()]
        self._tokenizer_files: bytes | None = None

    def models(self) -> list[str]:
        return self._models

    def tokenizer_files(self) -> bytes:
        if self._tokenizer_files is None:
            from node.model.loading import load_tokenizer, resolve
            from protocol.tokenizers import pack_tokenizer

            spec = self.model.spec
            ref = resolve(spec.model, Path(spec.model_cache))
            self._tokenizer_files = pack_tokenizer(load_tokenizer(ref))
        return self._tokenizer_files

    async def complete(self, model: str, job: CompletionJob) -> CompletionResult:
        if model == self.base:
            return await self.model.complete(job)
        held = self.store.resolve(model)
        if held is None:
            raise KeyError(model)
        name = adapter_name(*held)
        async with self.model.using(name, str(self.store.path(*held))):
            return await self.model.complete(job.with_adapter(name))

    async def stream(self, model: str, job: CompletionJob) -> AsyncIterator[Streamed]:
        if model == self.base:
            async for deltas in self.model.stream(job):
                yield deltas
            return
        held = self.store.resolve(model)
        if held is None:
            raise KeyError(model)
        name = adapter_name(*held)
        async with self.model.using(name, str(self.store.path(*held))):
            async for deltas in self.model.stream(job.with_adapter(name)):
                yield deltas

    async def run(self, agent: NodeAgent) -> None:
        async with trio.open_nursery() as nursery:
            if not await self.model.ensure_started(nursery):
                return
            if self.versions is not None:
                self.versions.attach(agent)
                nursery.start_soon(self.versions.follow)
            nursery.start_soon(self._watch, agent)
            coordinator_key = public_key_from_peer_id(agent.coordinator_id)
            metrics = ServingMetrics(agent.metrics.registry, self.model)
            app = create_app(self, coordinator_key, agent.identity.peer_id, self.token_skew_s,
                             metrics)  # fmt: skip
            await serve_http(app, self.sock, trio.Event())

    async def _watch(self, agent: NodeAgent) -> None:
        """Re-read the adapter store; on a change, serve the new list and announce it."""
        while True:
            models = [self.base, *self.store.model_names()]
            if models != self._models or list(agent.capabilities.serving_models) != models:
                self._models = models
                caps = msgspec.structs.replace(agent.capabilities, serving_models=models[:256])
                await agent.announce(caps)
                log.info("serving %s", ", ".join(models))
            await trio.sleep(self.rescan_s)
