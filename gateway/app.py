"""The gateway's HTTP API: OpenAI-compatible, authorized per key, metered, budgeted, routed.

A completion request goes through, in order: the key (401), the body (400), the model (404 if
no node serves it), the gateway's own prompt count, the key's rate limits (429 with
``Retry-After``), a budget reservation of the worst case — prompt + ``max_tokens`` × ``n`` —
against the key's budget (``gateway/budgets.py``; 402 ``insufficient_quota`` with
``x-should-retry: false`` when it does not fit), the least busy serving node (another one if it
cannot be reached before the first byte or refuses the gateway's serving token; 503 when none
can), and finally settlement: the reservation is freed and the tokens the gateway counts in the
answer are charged and recorded. Nodes see the route's serving token, never the client's key.
Responses carry the gateway's usage numbers, so a client's sum of ``usage`` equals what it is
billed. A streamed answer is relayed chunk by chunk; an error after streaming began is sent as
an error event, then ``[DONE]``. A client that disconnects, streaming or not, closes the
upstream request at once; the request is recorded with status 499 and billed for what was
delivered.

Upstream requests go through one ``aiohttp`` session (its C HTTP parser and connection pool cost
a fraction of ``httpx``'s per request, measured in ``scripts/bench_gateway.py``); bodies are
encoded and decoded with ``msgspec``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import anyio
import msgspec
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from gateway.budgets import Ledger
from gateway.config import GatewayConfig
from gateway.routing import Route, Router, TokenCounter
from protocol.accounts import ApiKey, Bill, KeyStore
from protocol.chat import render_call
from protocol.service.api_errors import (
    APIError,
    RequestIdMiddleware,
    error_body,
    install_error_handlers,
)
from protocol.service.openai_api import ChatRequest, CompletionRequest, OpenAIRequest, model_card

T = TypeVar("T")
MAX_CHUNK_BYTES = 1 << 20
CLIENT_CLOSED = 499
"""Status recorded for a request whose client went away (nginx's convention)."""
_json = msgspec.json.Encoder()
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
    """Writes bills to the database in order, after the answer has gone out (the tokens they
    charge are still counted in the gateway's hold until then, so a late write never lets a key
    overspend); ``drained(key)`` waits until a key's bills are all written (``/v1/usage`` reads
    after it, so a caller always sees its own requests)."""

    def __init__(self, store: KeyStore, gateway: str, interval_s: float) -> None:
        self.store, self.gateway, self.interval_s = store, gateway, interval_s
        self.send, self.receive = anyio.create_memory_object_stream[Bill](10_000)
        self.pending: dict[int, int] = {}
        self.changed = anyio.Event()

    async def submit(self, bill: Bill) -> None:
        self.pending[bill.key_id] = self.pending.get(bill.key_id, 0) + 1
        await self.send.send(bill)

    async def run(self) -> None:
        async for first in self.receive:
            await anyio.sleep(self.interval_s)  # what comes meanwhile shares the transaction
            bills = [first]
            while len(bills) < 500:  # whatever else is waiting goes in the same transaction
                try:
                    bills.append(self.receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            await anyio.to_thread.run_sync(self.store.settle_many, self.gateway, bills)
            for bill in bills:
                self.pending[bill.key_id] -= 1
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
    settler = Settler(store, config.name, config.settle_interval_s)
    ledger = Ledger(store, config.name, config.budget_hold_tokens, config.budget_idle_s)
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(ledger.start)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_s, connect=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            state["session"] = session
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.refresh_loop, session)
                tg.start_soon(settler.run)
                tg.start_soon(ledger.give_back_loop)
                yield
                with anyio.move_on_after(10):  # write every bill, then give the holds back
                    for key_id in list(settler.pending):
                        await settler.drained(key_id)
                    await ledger.give_back(everything=True)
                tg.cancel_scope.cancel()

    app = FastAPI(title="Bazaar gateway", lifespan=lifespan)

    app.add_middleware(
        RequestIdMiddleware, on_status=lambda status: metrics.requests.labels(str(status)).inc()
    )

    install_error_handlers(app)

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

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, _: ApiKey = key_dep) -> dict[str, Any]:
        base = router.base_of(model)
        if base is None:
            raise APIError(404, f"the model {model!r} does not exist or no node serves it",
                           "model_not_found", "model")  # fmt: skip
        return model_card(model, base)

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
        body.check()  # refused here, before anything is reserved or routed
        return await proxy(request, key, body, "/v1/chat/completions", CHAT_DEFAULT_MAX_TOKENS)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        request: Request, body: CompletionRequest, key: ApiKey = key_dep
    ) -> Response:
        return await proxy(request, key, body, "/v1/completions", 16)

    async def proxy(
        request: Request, key: ApiKey, body: OpenAIRequest, path: str, default_max: int
    ) -> Response:
        raw = msgspec.json.decode(await request.body())  # forwarded as it came, extra fields too
        base = router.base_of(body.model)
        if base is None:
            raise APIError(404, f"the model {body.model!r} does not exist or no node serves it",
                           "model_not_found", "model")  # fmt: skip
        try:  # adapters count with their base model's tokenizer
            if not counter.is_loaded(base):  # loading is slow: off the event loop, once
                await counter.ensure(base, router, state["session"])
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
        if not await ledger.reserve(key, worst):
            raise APIError(402, "this key's token budget is exhausted", "insufficient_quota",
                           headers={"x-should-retry": "false"})  # fmt: skip
        if path == "/v1/chat/completions":
            raw.setdefault("max_tokens", max_tokens)
        meter = Meter(settler, ledger, counter, metrics, key, body.model, base, prompt, worst,
                      max_tokens)  # fmt: skip
        if body.stream:
            try:
                opened = await until_disconnect(request, open_upstream(path, raw, body.model))
            except BaseException:
                await meter.settle([], 503)
                raise
            if opened is None:
                await meter.settle([], CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            meter.node = opened[0].name
            return StreamingResponse(relay(*opened, meter), media_type="text/event-stream")
        try:
            fetched = await until_disconnect(request, fetch(path, raw, body.model, meter))
        except BaseException as e:
            await meter.settle([], e.status if isinstance(e, APIError) else 500)
            raise
        if fetched is None:
            await meter.settle([], CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        status, answer = fetched
        if status != 200:
            await meter.settle([], status)
            return JSONResponse(answer, status_code=status)
        texts = [delivered(c) for c in answer["choices"]]
        answer["usage"] = await meter.settle(texts, 200)
        return Response(_json.encode(answer), media_type="application/json")

    async def fetch(
        path: str, raw: dict[str, Any], model: str, meter: Meter
    ) -> tuple[int, dict[str, Any]]:
        """A whole (non-streamed) answer: ``(status, body)``."""
        route, upstream = await open_upstream(path, raw, model)
        meter.node = route.name
        try:
            return upstream.status, msgspec.json.decode(await upstream.read())
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as e:
            raise APIError(502, f"the serving node failed: {e}", "upstream_error") from None
        finally:
            upstream.release()
            router.in_flight[route.peer_id] -= 1

    async def open_upstream(
        path: str, raw: dict[str, Any], model: str
    ) -> tuple[Route, aiohttp.ClientResponse]:
        session, tried, refused = state["session"], set[str](), 0
        payload = _json.encode(raw)
        while (route := router.pick(model, tried)) is not None:
            tried.add(route.peer_id)
            router.in_flight[route.peer_id] += 1
            try:
                response = await session.post(
                    f"{route.url}{path}", data=payload,
                    headers={"content-type": "application/json",
                             "authorization": f"Bearer {route.token}"},
                )  # fmt: skip
            except (aiohttp.ClientConnectionError, TimeoutError) as e:  # before the first byte
                router.in_flight[route.peer_id] -= 1
                log.warning("node %s at %s failed (%s); trying another", route.name, route.url, e)
                continue
            if response.status not in (401, 403):
                return route, response
            # the node refused our serving token (expired: the coordinator out of reach for a
            # whole TTL, or this gateway revoked): not the client's business, try another node
            refused += 1
            router.in_flight[route.peer_id] -= 1
            log.warning("node %s refused this gateway's serving token: %s", route.name,
                        (await response.read())[:200].decode(errors="replace"))  # fmt: skip
            response.release()
        why = " (nodes refused this gateway's serving tokens)" if refused else ""
        raise APIError(503, f"no node could serve {model!r} right now{why}", "no_capacity",
                       headers={"retry-after": "1"})  # fmt: skip

    async def relay(
        route: Route, upstream: aiohttp.ClientResponse, meter: Meter
    ) -> AsyncIterator[bytes]:
        texts: dict[int, list[str]] = {}
        calls: dict[int, dict[int, list[str]]] = {}
        """Per choice, per tool call: its name, then its argument pieces."""
        status = CLIENT_CLOSED  # unless the stream ends

        def take(c: dict[str, Any]) -> None:
            """Record what a chunk's choice delivered: its text, its tool calls' pieces."""
            delta = c.get("delta") or {}
            texts.setdefault(c["index"], []).append(delta.get("content") or c.get("text") or "")
            for call in delta.get("tool_calls") or []:
                parts = calls.setdefault(c["index"], {}).setdefault(call["index"], [])
                fn = call.get("function") or {}
                if fn.get("name"):
                    parts.insert(0, fn["name"])
                parts.append(fn.get("arguments") or "")

        def sent() -> list[str]:
            return [join_calls("".join(texts.get(i, [])), calls.get(i, {}))
                    for i in sorted(texts.keys() | calls.keys())]  # fmt: skip

        try:
            if upstream.status != 200:
                status = upstream.status
                yield b"data: " + await upstream.read() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            pending, done = b"", False
            async for data in upstream.content.iter_any():  # what arrived together leaves together
                *lines, pending = (pending + data).split(b"\n")
                if len(pending) > MAX_CHUNK_BYTES:
                    raise aiohttp.ClientPayloadError("the node sent a chunk over 1 MiB")
                out = []
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if done := payload == b"[DONE]":
                        break
                    chunk = msgspec.json.decode(payload)
                    for c in chunk.get("choices", []):
                        take(c)
                    if chunk.get("usage") is not None:  # asked for: the gateway's own numbers
                        chunk["usage"] = await meter.count(sent())
                        payload = _json.encode(chunk)
                    out.append(b"data: " + payload + b"\n\n")
                if out:
                    yield b"".join(out)
                if done:
                    break
            if not done:
                raise aiohttp.ClientPayloadError("the node closed the stream before [DONE]")
            status = 200
            yield b"data: [DONE]\n\n"
            with anyio.move_on_after(1):  # the chunked body's end, so the connection is reused
                await upstream.content.read()
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as e:
            status = 502
            log.warning("node %s failed mid-stream: %s", route.name, e)
            err = error_body(f"the serving node failed mid-stream: {e}", "upstream_error",
                             kind="api_error")  # fmt: skip
            yield b"data: " + _json.encode(err) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect still settles the bill
                if upstream.content.is_eof():
                    upstream.release()
                else:  # at once: a client that left stops the node's work too
                    upstream.close()
                router.in_flight[route.peer_id] -= 1
                await meter.settle(sent(), 200 if status == CLIENT_CLOSED else status,
                                   record_status=status)  # fmt: skip

    return app


def delivered(choice: dict[str, Any]) -> str:
    """The text a (non-streamed) choice delivered, as the model wrote it: its content, and each
    tool call written back in the model's syntax (``protocol.chat.render_call``)."""
    if "text" in choice:
        return str(choice["text"] or "")
    message = choice.get("message") or {}
    blocks = [render_call(c["function"]["name"], c["function"]["arguments"])
              for c in message.get("tool_calls") or []]  # fmt: skip
    return "\n".join(([message["content"]] if message.get("content") else []) + blocks)


def join_calls(content: str, calls: dict[int, list[str]]) -> str:
    """A streamed choice's text: its content, then its calls (name, argument pieces) written
    back as the model wrote them."""
    blocks = [render_call(parts[0], "".join(parts[1:])) for _, parts in sorted(calls.items())
              if parts]  # fmt: skip
    return "\n".join(([content] if content else []) + blocks)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """``await work``, or None as soon as the client disconnects (``work`` is cancelled).

    Plain asyncio (the gateway runs on uvloop only): one watcher task, which cancels this task
    on a disconnect; an anyio task group per request cost ~5 % of the gateway's CPU."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and me.uncancel() == 0:  # our cancel, nobody else's: the client left
            return None
        raise
    finally:
        watcher.cancel()


class Meter:
    """One request's bill: counted by the gateway, settled once."""

    def __init__(self, settler: Settler, ledger: Ledger, counter: TokenCounter, metrics: Metrics,
                 key: ApiKey, model: str, base: str, prompt: int, reserved: int,
                 max_tokens: int) -> None:  # fmt: skip
        self.settler, self.ledger, self.counter, self.metrics = settler, ledger, counter, metrics
        self.key, self.model, self.base, self.prompt = key, model, base, prompt
        self.reserved, self.max_tokens = reserved, max_tokens
        self.started = time.monotonic()
        self.node = ""
        """The serving node that answered (or was last tried)."""
        self.settled: dict[str, int] | None = None

    async def count(self, texts: list[str]) -> dict[str, int]:
        counts = [self.counter.text(self.base, t) for t in texts]  # µs per short text
        # re-encoding a decoded text can count more tokens than were generated (a byte sequence
        # that was not valid UTF-8 comes back as U+FFFD); a choice never costs more than its cap,
        # which is also what keeps every bill within its reservation
        completion = sum(min(c, self.max_tokens) for c in counts)
        return {"prompt_tokens": self.prompt, "completion_tokens": completion,
                "total_tokens": self.prompt + completion}  # fmt: skip

    async def settle(
        self, texts: list[str], status: int, record_status: int | None = None
    ) -> dict[str, int]:
        """Bill the texts delivered (nothing unless ``status`` is 200); the usage record says
        ``record_status`` (default ``status``)."""
        if self.settled is not None:
            return self.settled
        usage = await self.count(texts) if status == 200 else {
            "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}  # fmt: skip
        self.settled = usage
        charged = self.ledger.settle(self.key, self.reserved, usage["total_tokens"])
        bill = Bill(
            key_id=self.key.id, charged=charged, model=self.model,
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
            latency_ms=(time.monotonic() - self.started) * 1000, node=self.node,
            status=record_status or status, created_at=time.time(),
        )  # fmt: skip
        await self.settler.submit(bill)
        self.metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
        self.metrics.tokens.labels("completion").inc(usage["completion_tokens"])
        return usage
