"""A node's OpenAI-compatible endpoint (``bazaar node start --serve``), for the gateway to route to.

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``/health``; served
by hypercorn on the node's own trio loop, the model answering from the node's model process.
Only ``/health`` is open: everything else answers only gateways the coordinator admits, by the
serving token each request carries (``node/roles/serving_auth.py``), so nobody skips the
gateway's metering.
Requests follow OpenAI's API: ``n``, ``stop``, ``max_tokens`` (``max_completion_tokens``),
``temperature``, ``top_p``, ``seed``, ``logprobs``, ``stream`` with ``stream_options.
include_usage``; unknown fields are ignored; every response carries ``x-request-id``. Errors
are OpenAI-shaped (``protocol/service/api_errors.py``): unknown model 404, malformed body
400, a prompt that does not fit the context 400 ``context_length_exceeded``.

Streaming sends the role first, then one chunk per token, one ``finish_reason`` per choice, the
usage chunk only when asked, and ``data: [DONE]``. The model process answers a request whole, so
the chunks of a choice leave together once it is generated (time to first token = the whole
generation); the wire format is the streaming one clients expect.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from node.model.completions import CompletionJob, CompletionResult
from node.model.errors import ContextTooLong
from node.model.worker import ModelWorker
from node.roles.base import Role
from node.roles.serving_auth import ServingDoor
from node.store.adapters import AdapterStore, adapter_name
from node.store.versions import VersionSync
from protocol.identity import public_key_from_peer_id
from protocol.service.api_errors import (
    APIError,
    RequestIdMiddleware,
    install_error_handlers,
)
from protocol.service.http import serve_http
from protocol.service.openai_api import ChatRequest, CompletionRequest, OpenAIRequest, model_card
from protocol.serving_tokens import DEFAULT_SKEW_S

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger(__name__)
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


def create_app(
    served: Served, coordinator_key: bytes, peer_id: str, skew_s: float = DEFAULT_SKEW_S
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

    async def run(req: OpenAIRequest, job: CompletionJob) -> CompletionResult:
        unknown = APIError(404, f"the model {req.model!r} does not exist here",
                           "model_not_found", "model")  # fmt: skip
        if req.model not in served.models():
            raise unknown
        try:
            return await served.complete(req.model, job)
        except KeyError:
            raise unknown from None
        except ContextTooLong as e:
            raise APIError(400, str(e), "context_length_exceeded", "messages") from None
        except ValueError as e:
            raise APIError(503, f"the model could not serve this request: {e}",
                           "model_unavailable") from None  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> dict[str, Any] | StreamingResponse:
        job = CompletionJob(
            messages=[{"role": "system" if m.role == "developer" else m.role,
                       "content": m.content} for m in req.messages],
            max_tokens=req.max_completion_tokens or req.max_tokens or MAX_DEFAULT_TOKENS,
            temperature=req.temperature, top_p=req.top_p, n=req.n, stop=req.stops(),
            seed=req.seed,
        )  # fmt: skip
        result = await run(req, job)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return _sse(_chat_chunks(rid, created, req, result))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(c.tokens, c.logprobs) if req.logprobs else None,
            }
            for i, c in enumerate(result.choices)
        ]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(result)}  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        job = CompletionJob(
            prompt=prompt, max_tokens=req.max_tokens or 16, temperature=req.temperature,
            top_p=req.top_p, n=req.n, stop=req.stops(), seed=req.seed,
        )  # fmt: skip
        result = await run(req, job)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return _sse(_completion_chunks(rid, created, req, result))
        choices = [
            {
                "index": i,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": {"tokens": c.tokens, "token_logprobs": c.logprobs}
                if req.logprobs is not None
                else None,
            }
            for i, c in enumerate(result.choices)
        ]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(result)}  # fmt: skip

    return app


def _usage(result: CompletionResult) -> dict[str, int]:
    p, c = result.prompt_tokens, result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs, strict=True)]}  # fmt: skip


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _chat_chunks(
    rid: str, created: int, req: OpenAIRequest, result: CompletionResult
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": req.model, "choices": choices, **extra}  # fmt: skip

    for i, c in enumerate(result.choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}])  # fmt: skip
        for piece in c.tokens:
            yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "finish_reason": c.finish_reason}])
    if req.include_usage():
        yield chunk([], usage=_usage(result))


async def _completion_chunks(
    rid: str, created: int, req: OpenAIRequest, result: CompletionResult
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, **extra}  # fmt: skip

    for i, c in enumerate(result.choices):
        for piece in c.tokens:
            yield chunk([{"index": i, "text": piece, "finish_reason": None, "logprobs": None}])
        yield chunk([{"index": i, "text": "", "finish_reason": c.finish_reason, "logprobs": None}])
    if req.include_usage():
        yield chunk([], usage=_usage(result))


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

    def models(self) -> list[str]:
        return self._models

    async def complete(self, model: str, job: CompletionJob) -> CompletionResult:
        if model == self.base:
            return await self.model.complete(job)
        held = self.store.resolve(model)
        if held is None:
            raise KeyError(model)
        name = adapter_name(*held)
        async with self.model.using(name, str(self.store.path(*held))):
            return await self.model.complete(job.with_adapter(name))

    async def run(self, agent: NodeAgent) -> None:
        async with trio.open_nursery() as nursery:
            if not await self.model.ensure_started(nursery):
                return
            if self.versions is not None:
                self.versions.attach(agent)
                nursery.start_soon(self.versions.follow)
            nursery.start_soon(self._watch, agent)
            coordinator_key = public_key_from_peer_id(agent.coordinator_id)
            app = create_app(self, coordinator_key, agent.identity.peer_id, self.token_skew_s)
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
