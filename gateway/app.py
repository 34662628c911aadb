"""The gateway's HTTP API: OpenAI-compatible, authorized per key, metered, budgeted, routed.

A completion request goes through, in order: the key (401), the model (404 if no node serves
it), the gateway's own prompt count, the key's rate limits (429 with ``Retry-After``), a budget
reservation of the worst case — prompt + ``max_tokens`` × ``n`` — made atomically in the
database (402 ``insufficient_quota`` with ``x-should-retry: false`` when it does not fit), the
least busy serving node (another one if it cannot be reached before the first byte; 503 when
none can), and finally settlement: the reservation is released and the tokens the gateway counts
in the answer are charged and recorded. Responses carry the gateway's usage numbers, so a
client's sum of ``usage`` equals what it is billed. A streamed answer is relayed chunk by chunk;
an error after streaming began is sent as an error event, then ``[DONE]``; a client that
disconnects closes the upstream request.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from gateway.config import GatewayConfig
from gateway.keys import ApiKey, KeyStore, UsageRow
from gateway.routing import Route, Router, TokenCounter
from protocol.api_errors import APIError, RequestIdMiddleware, error_body, validation_message
from protocol.openai_api import ChatRequest, CompletionRequest, OpenAIRequest, model_card

log = logging.getLogger(__name__)
CHAT_DEFAULT_MAX_TOKENS = 256
"""What a chat request without ``max_tokens`` reserves (and what the node generates at most)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bazaar_gateway_requests", "Requests, by status", ["status"],
                                registry=r)  # fmt: skip
        self.tokens = Counter("bazaar_gateway_tokens", "Tokens billed, by kind", ["kind"],
                              registry=r)  # fmt: skip


class KeyCache:
    """Authenticated keys for ``ttl_s``: a revoked key stops working within that time."""

    def __init__(self, store: KeyStore, ttl_s: float) -> None:
        self.store, self.ttl_s = store, ttl_s
        self.entries: dict[str, tuple[ApiKey | None, float]] = {}

    async def get(self, presented: str) -> ApiKey | None:
        now = time.monotonic()
        hit = self.entries.get(presented)
        if hit is not None and now < hit[1]:
            return hit[0]
        key = await anyio.to_thread.run_sync(self.store.authenticate, presented)
        if len(self.entries) > 10_000:  # bounded: a flood of made-up keys cannot grow it
            self.entries.clear()
        self.entries[presented] = (key, now + self.ttl_s)
        return key


class Settler:
    """Writes bills to the database in order, after the answer has gone out.

    A reservation stays in place until its bill is written, so a late write never lets a key
    overspend; ``drained(key)`` waits until a key's bills are all written (``/v1/usage`` reads
    after it, so a caller always sees its own requests)."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.send, self.receive = anyio.create_memory_object_stream[tuple[int, int, UsageRow]](
            10_000
        )
        self.pending: dict[int, int] = {}
        self.changed = anyio.Event()

    async def submit(self, key_id: int, reserved: int, record: UsageRow) -> None:
        self.pending[key_id] = self.pending.get(key_id, 0) + 1
        await self.send.send((key_id, reserved, record))

    async def run(self) -> None:
        async for key_id, reserved, record in self.receive:
            await anyio.to_thread.run_sync(self.store.settle, key_id, reserved, record)
            self.pending[key_id] -= 1
            self.changed.set()
            self.changed = anyio.Event()

    async def drained(self, key_id: int) -> None:
        while self.pending.get(key_id, 0):
            await self.changed.wait()


class RateLimiter:
    """Requests and tokens per key in the last minute (this gateway process)."""

    def __init__(self) -> None:
        self.events: dict[int, deque[tuple[float, int]]] = {}

    def check(self, key: ApiKey, tokens: int, now: float) -> float | None:
        """None if allowed (and counted), else the seconds until it would be."""
        window = self.events.setdefault(key.id, deque())
        while window and now - window[0][0] >= 60:
            window.popleft()
        if key.rpm is not None and len(window) + 1 > key.rpm:
            return 60 - (now - window[0][0])
        if key.tpm is not None and sum(t for _, t in window) + tokens > key.tpm:
            return 60 - (now - window[0][0]) if window else 60.0
        window.append((now, tokens))
        return None


def create_app(
    config: GatewayConfig, store: KeyStore, router: Router, counter: TokenCounter
) -> FastAPI:
    metrics = Metrics()
    limiter = RateLimiter()
    keys = KeyCache(store, config.key_cache_s)
    settler = Settler(store)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=config.request_timeout_s) as client:
            state["client"] = client
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.refresh_loop, client)
                tg.start_soon(settler.run)
                yield
                with anyio.move_on_after(10):  # write every bill before stopping
                    for key_id in list(settler.pending):
                        await settler.drained(key_id)
                tg.cancel_scope.cancel()

    app = FastAPI(title="Bazaar gateway", lifespan=lifespan)

    app.add_middleware(
        RequestIdMiddleware, on_status=lambda status: metrics.requests.labels(str(status)).inc()
    )

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return JSONResponse(error_body(message, "invalid_request", param), status_code=400)

    bearer_dep = Depends(HTTPBearer(auto_error=False, description="From `bazaar keys create`"))

    async def authorize(
        credentials: HTTPAuthorizationCredentials | None = bearer_dep,
    ) -> ApiKey:
        if credentials is None or not credentials.credentials.strip():
            raise APIError(401, "no API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        key = await keys.get(credentials.credentials.strip())
        if key is None:
            raise APIError(401, "invalid or revoked API key", "invalid_api_key")
        return key

    key_dep = Depends(authorize)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": router.models(), "nodes": len(router.routes)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(_: ApiKey = key_dep) -> dict[str, Any]:
        data = [model_card(m, router.base_of(m) or m) for m in router.models()]
        return {"object": "list", "data": data}

    @app.get("/v1/usage")
    async def usage(key: ApiKey = key_dep) -> dict[str, Any]:
        await settler.drained(key.id)
        rows = await anyio.to_thread.run_sync(store.usage, key.id)
        fields = ("model", "prompt_tokens", "completion_tokens", "latency_ms", "node", "status",
                  "created_at")  # fmt: skip
        data = [{f: getattr(u, f) for f in fields} for u in rows]
        prompt = sum(u.prompt_tokens for u in rows)
        completion = sum(u.completion_tokens for u in rows)
        return {"object": "list", "data": data, "total": {
            "requests": len(rows), "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}}  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, body: ChatRequest, key: ApiKey = key_dep) -> Response:
        return await proxy(request, key, body, "/v1/chat/completions", CHAT_DEFAULT_MAX_TOKENS)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        request: Request, body: CompletionRequest, key: ApiKey = key_dep
    ) -> Response:
        return await proxy(request, key, body, "/v1/completions", 16)

    async def proxy(
        request: Request, key: ApiKey, body: OpenAIRequest, path: str, default_max: int
    ) -> Response:
        raw = await request.json()  # forwarded as it came, unknown fields and all
        base = router.base_of(body.model)
        if base is None:
            raise APIError(404, f"the model {body.model!r} does not exist or no node serves it",
                           "model_not_found", "model")  # fmt: skip
        try:  # adapters count with their base model's tokenizer
            if not counter.is_loaded(base):  # loading is slow: off the event loop, once
                await anyio.to_thread.run_sync(counter.tokenizer, base)
            prompt = counter.prompt(base, raw)  # a tokenizer pass: cheaper than a thread hop
        except (OSError, ValueError) as e:
            raise APIError(
                503, f"no tokenizer for {body.model!r}: {e}", "tokenizer_unavailable"
            ) from None
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max
        worst = prompt + max_tokens * body.n
        wait = limiter.check(key, worst, time.monotonic())
        if wait is not None:
            raise APIError(429, "rate limit reached for this key", "rate_limit_exceeded",
                           headers={"retry-after": str(max(1, round(wait)))})  # fmt: skip
        if not await anyio.to_thread.run_sync(store.reserve, key.id, worst):
            raise APIError(402, "this key's token budget is exhausted", "insufficient_quota",
                           headers={"x-should-retry": "false"})  # fmt: skip
        if path == "/v1/chat/completions":
            raw.setdefault("max_tokens", max_tokens)
        meter = Meter(settler, counter, metrics, key, body.model, base, prompt, worst, max_tokens)
        try:
            route, upstream = await open_upstream(path, raw, body.model)
        except BaseException:
            await meter.settle([], 503, "")
            raise
        meter.node = route.name
        if body.stream:
            return StreamingResponse(relay(route, upstream, meter),
                                     media_type="text/event-stream")  # fmt: skip
        try:
            data = json.loads(await upstream.aread())
        finally:
            await upstream.aclose()
            router.in_flight[route.peer_id] -= 1
        if upstream.status_code != 200:
            await meter.settle([], upstream.status_code, route.name)
            return JSONResponse(data, status_code=upstream.status_code)
        texts = [
            c.get("message", {}).get("content") or c.get("text") or "" for c in data["choices"]
        ]
        data["usage"] = await meter.settle(texts, 200, route.name)
        return JSONResponse(data)

    async def open_upstream(
        path: str, raw: dict[str, Any], model: str
    ) -> tuple[Route, httpx.Response]:
        client, tried = state["client"], set[str]()
        while (route := router.pick(model, tried)) is not None:
            tried.add(route.peer_id)
            router.in_flight[route.peer_id] += 1
            try:
                req = client.build_request("POST", f"{route.url}{path}", json=raw)
                return route, await client.send(req, stream=True)
            except httpx.TransportError as e:  # before the first byte: try another node
                router.in_flight[route.peer_id] -= 1
                log.warning("node %s at %s failed (%s); trying another", route.name, route.url, e)
        raise APIError(503, f"no node could serve {model!r} right now", "no_capacity",
                       headers={"retry-after": "1"})  # fmt: skip

    async def relay(route: Route, upstream: httpx.Response, meter: Meter) -> AsyncIterator[bytes]:
        texts: dict[int, list[str]] = {}
        status = upstream.status_code
        try:
            if status != 200:
                yield f"data: {(await upstream.aread()).decode()}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            async for line in upstream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or c.get("text") or ""
                    texts.setdefault(c["index"], []).append(piece)
                if chunk.get("usage") is not None:  # asked for: the gateway's own numbers
                    chunk["usage"] = await meter.count(["".join(t) for t in texts.values()])
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except httpx.HTTPError as e:
            status = 502
            err = error_body(f"the serving node failed mid-stream: {e}", "upstream_error")
            yield f"data: {json.dumps(err)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect still settles the bill
                await upstream.aclose()
                router.in_flight[route.peer_id] -= 1
                await meter.settle(["".join(t) for t in texts.values()], status, route.name)

    return app


class Meter:
    """One request's bill: counted by the gateway, settled once."""

    def __init__(self, settler: Settler, counter: TokenCounter, metrics: Metrics, key: ApiKey,
                 model: str, base: str, prompt: int, reserved: int,
                 max_tokens: int) -> None:  # fmt: skip
        self.settler, self.counter, self.metrics, self.key = settler, counter, metrics, key
        self.model, self.base, self.prompt, self.reserved = model, base, prompt, reserved
        self.max_tokens = max_tokens
        self.started = time.monotonic()
        self.node = ""
        self.settled: dict[str, int] | None = None

    async def count(self, texts: list[str]) -> dict[str, int]:
        counts = [self.counter.text(self.base, t) for t in texts]  # µs per short text
        # re-encoding a decoded text can count more tokens than were generated (a byte sequence
        # that was not valid UTF-8 comes back as U+FFFD); a choice never costs more than its cap,
        # which is also what keeps every bill within its reservation
        completion = sum(min(c, self.max_tokens) for c in counts)
        return {"prompt_tokens": self.prompt, "completion_tokens": completion,
                "total_tokens": self.prompt + completion}  # fmt: skip

    async def settle(self, texts: list[str], status: int, node: str) -> dict[str, int]:
        if self.settled is not None:
            return self.settled
        usage = await self.count(texts) if status == 200 else {
            "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # fmt: skip
        self.settled = usage
        record = UsageRow(
            key_id=self.key.id, model=self.model, prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            latency_ms=(time.monotonic() - self.started) * 1000, node=node or self.node,
            status=status, created_at=time.time(),
        )  # fmt: skip
        await self.settler.submit(self.key.id, self.reserved, record)
        self.metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
        self.metrics.tokens.labels("completion").inc(usage["completion_tokens"])
        return usage
