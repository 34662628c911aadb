"""A misbehaving serving node (and the coordinator listing it), for the gateway's failure paths.

A real HTTP server (aiohttp, on its own event loop in a thread of the test process) that
answers ``/v1/network/routes`` as a coordinator would to the gateway it admits (``SECRET``),
naming itself as the one serving node of model ``tiny`` with the token ``TOKEN``, and
``/v1/completions`` (only with that token, as a node would) by the prompt it is sent:

- ``"break"``: streams two chunks, then drops the connection (no ``[DONE]``);
- ``"slow"``: streams (or, not streaming, answers) only after a minute — the test's client
  leaves first; the server records that the gateway closed the upstream request;
- anything else: a normal one-token answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from tests.conftest import free_port
from tests.integration.cluster import Cluster, Proc
from tests.wait import wait_until

SECRET = "bzg-fake-gateway-secret"
TOKEN = "bzs1.fake-serving-token"


class FakeNode:
    def __init__(self) -> None:
        self.closed: list[str] = []
        """Prompts whose upstream request the gateway closed before the answer was complete."""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def __enter__(self) -> FakeNode:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/network/routes", self._routes)
        app.router.add_post("/v1/completions", self._complete)
        runner = web.AppRunner(app, handler_cancellation=True)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._started.set()
        self._loop.run_forever()

    async def _routes(self, request: web.Request) -> web.Response:
        if request.headers.get("authorization") != f"Bearer {SECRET}":
            return web.json_response({"error": {"code": "invalid_gateway_secret"}}, status=401)
        route = {"peer_id": "fake", "name": "fake", "url": self.url, "models": ["tiny"],
                 "token": TOKEN, "token_expires_at": 1e12}  # fmt: skip
        return web.json_response({"data": [route]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "invalid_serving_token"}}, status=401)
        body = await request.json()
        prompt = body.get("prompt")
        if not body.get("stream"):
            if prompt == "slow":
                return await self._until_closed(prompt, request)
            return web.json_response(_answer("x"))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if prompt == "slow":
            return await self._until_closed(prompt, request, response)
        for piece in ("a", "b"):
            await response.write(f"data: {json.dumps(_chunk(piece))}\n\n".encode())
        if prompt == "break":
            assert request.transport is not None
            request.transport.abort()  # gone mid-stream, without [DONE]
            return response
        await response.write(f"data: {json.dumps(_chunk('', 'length'))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _until_closed(
        self, prompt: str, request: web.Request, response: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        try:
            if response is not None:
                await response.write(f"data: {json.dumps(_chunk('a'))}\n\n".encode())
            await asyncio.sleep(60)
        except (asyncio.CancelledError, ConnectionResetError):
            self.closed.append(prompt)  # aiohttp cancels the handler when the peer goes
            raise
        return response or web.json_response(_answer("late"))


def _chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "tiny",
            "choices": [choice]}  # fmt: skip


def _answer(text: str) -> dict[str, Any]:
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


@dataclass
class Setup:
    """A real gateway process routing to a ``FakeNode``."""

    cluster: Cluster
    node: FakeNode
    db: str
    tiny: Path
    url: str = ""
    proc: Proc | None = None

    def start_gateway(self) -> None:
        port = free_port()
        self.proc = self.cluster.spawn("gateway", self.cluster.root / "gw", [
            "gateway", "start", "--coordinator-url", self.node.url, "--listen",
            f"127.0.0.1:{port}", "--db", self.db, f"--tokenizers.tiny={self.tiny}",
            "--budget_hold_tokens=1000", "--budget_idle_s=600",
        ], env={"BAZAAR_GATEWAY_SECRET": SECRET})  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"

        def routed() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=2).json()["nodes"] == 1
            except httpx.HTTPError:
                return False

        wait_until(routed, 60, what="the gateway routing to the fake node")

    def usage(self, secret: str) -> list[dict[str, object]]:
        r = httpx.get(f"{self.url}/v1/usage", headers={"authorization": f"Bearer {secret}"})
        return list(r.json()["data"])
