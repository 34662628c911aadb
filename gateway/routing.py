"""Which serving node gets a request, and how many tokens a request costs.

- **Routes** come from the coordinator (``/v1/network/routes``, which answers only gateways it
  admits: this gateway's secret goes as ``Authorization: Bearer``): live nodes with a serving
  endpoint, the models they serve, and for each a serving token, the credential the node
  checks (``protocol/serving_tokens.py``). They are re-read every ``refresh_s``, which is how
  the tokens rotate (the coordinator issues a node's token again at half its life). A
  coordinator that refuses the secret (revoked) empties the routes at once. A request goes to
  the node with the fewest requests in flight among those serving its model; a node that cannot
  be reached, or refuses the token, is skipped for the next tries of the same request (failover
  before the first byte).
- **Token counts** are the gateway's own, with each model's tokenizer (``transformers``): the
  prompt as the node renders it (chat template for messages) and each choice's text. A node's
  reported usage is never used for billing. The tokenizer is the one configured for the model
  (``--tokenizers.<model>``) or else fetched from a node that serves the model and kept only if
  its fingerprint is the one the coordinator publishes with the routes
  (``protocol/tokenizers.py``): no per-model flag is needed, and a node cannot pass off a
  tokenizer that counts its answers short.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio

from protocol import tokenizers
from protocol.chat import template_messages

log = logging.getLogger(__name__)


class NotAdmitted(Exception):
    """The coordinator refused this gateway's secret (unknown or revoked)."""


@dataclass(frozen=True)
class Route:
    peer_id: str
    name: str
    url: str
    models: tuple[str, ...]
    token: str = ""
    """The serving token this node accepts from this gateway (sent as ``Authorization``)."""


@dataclass
class Router:
    coordinator_url: str
    secret: str
    """This gateway's secret at the coordinator (``bazaar gateway admit``)."""
    refresh_s: float = 2.0
    routes: list[Route] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    tokenizers: dict[str, str] = field(default_factory=dict)
    """Base model → the fingerprint of its tokenizer, as the coordinator records it."""

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        url = f"{self.coordinator_url}/v1/network/routes"
        headers = {"authorization": f"Bearer {self.secret}"}
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=5)) as resp:  # fmt: skip
            if resp.status in (401, 403):
                self.routes = []
                raise NotAdmitted(f"the coordinator at {self.coordinator_url} does not admit this "
                                  f"gateway: {await resp.text()}")  # fmt: skip
            resp.raise_for_status()
            body = await resp.json()
            nodes = body["data"]
        self.tokenizers = dict(body.get("tokenizers") or {})
        self.routes = [
            Route(n["peer_id"], n["name"], n["url"], tuple(n["models"]), n["token"]) for n in nodes
        ]

    async def refresh_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                await self.refresh(session)
            except NotAdmitted as e:
                log.error("%s; `bazaar gateway admit NAME` on the coordinator's machine", e)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
                log.warning("cannot read serving nodes from the coordinator: %s", e)
            await anyio.sleep(self.refresh_s)

    def models(self) -> list[str]:
        return sorted({m for r in self.routes for m in r.models})

    def base_of(self, model: str) -> str | None:
        """The base model ``model`` runs on (itself for a base model), None if nobody serves it.
        A node lists its base model first, then its adapters."""
        return next((r.models[0] for r in self.routes if model in r.models), None)

    def pick(self, model: str, exclude: set[str]) -> Route | None:
        """The least busy node serving ``model``, not in ``exclude``."""
        candidates = [r for r in self.routes if model in r.models and r.peer_id not in exclude]
        return min(candidates, key=lambda r: self.in_flight[r.peer_id], default=None)


class TokenCounter:
    """Counts tokens with each model's own tokenizer, loaded once per model."""

    def __init__(self, tokenizers: dict[str, str]) -> None:
        self.paths = tokenizers
        self._loaded: dict[str, Any] = {}
        self._locks: dict[str, anyio.Lock] = {}

    def is_loaded(self, model: str) -> bool:
        return model in self._loaded

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer: loaded, or from its configured path (slow: in a thread)."""
        if model not in self._loaded:
            if model not in self.paths:
                raise OSError(f"no tokenizer configured or fetched for {model!r}")
            self._loaded[model] = load_tokenizer(self.paths[model])
        return self._loaded[model]

    async def ensure(self, model: str, router: Router, session: aiohttp.ClientSession) -> None:
        """Make the model's tokenizer ready: the configured one, or one fetched from a node
        serving the model whose fingerprint the coordinator records (``ValueError`` or
        ``OSError`` saying why none could be had). One load at a time per model."""
        async with self._locks.setdefault(model, anyio.Lock()):
            if model in self._loaded:
                return
            if model in self.paths:
                await anyio.to_thread.run_sync(self.tokenizer, model)
                return
            expected = router.tokenizers.get(model)
            if expected is None:
                raise ValueError(
                    f"the coordinator records no tokenizer for it (not yet, or it was not "
                    f"started with --tokenizers.{model}=PATH) and none is configured here"
                )
            why = []
            for route in [r for r in router.routes if model in r.models]:
                try:
                    data = await fetch_tokenizer(session, route)
                    tok = await anyio.to_thread.run_sync(checked_tokenizer, data, expected)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
                    why.append(f"{route.name}: {e}")
                    continue
                if tok is None:
                    log.warning("node %s sent a tokenizer for %s that is not the one the "
                                "coordinator records; refused", route.name, model)  # fmt: skip
                    why.append(f"{route.name}: not the tokenizer the coordinator records")
                    continue
                self._loaded[model] = tok
                log.info("counting %s with the tokenizer node %s sent (fingerprint %s)",
                         model, route.name, expected[:16])  # fmt: skip
                return
            raise ValueError("no serving node sent the tokenizer the coordinator records"
                             + (f" ({'; '.join(why)})" if why else ""))  # fmt: skip

    def prompt(self, model: str, body: dict[str, Any]) -> int:
        """The prompt's tokens as the model sees them: a chat's messages and tools rendered by
        ``protocol.chat`` and the model's chat template, as the node renders them."""
        tok = self.tokenizer(model)
        if "messages" in body:
            messages = template_messages(body["messages"], body.get("tools"))
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.text(model, text)  # as tokenize=True counts it, without the wrapper
        prompt = body.get("prompt", "")
        return self.text(model, prompt if isinstance(prompt, str) else "".join(prompt))

    def text(self, model: str, text: str) -> int:
        tok = self.tokenizer(model)
        if (fast := getattr(tok, "backend_tokenizer", None)) is not None:  # skips the wrapper
            return len(fast.encode(text, add_special_tokens=False).ids)
        return len(tok(text, add_special_tokens=False)["input_ids"])


async def fetch_tokenizer(session: aiohttp.ClientSession, route: Route) -> bytes:
    """A serving node's packed tokenizer files (at most ``tokenizers.MAX_BYTES``)."""
    headers = {"authorization": f"Bearer {route.token}"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with session.get(f"{route.url}/v1/tokenizer", headers=headers, timeout=timeout) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        data = bytearray()
        async for piece in resp.content.iter_chunked(1 << 16):
            data += piece
            if len(data) > tokenizers.MAX_BYTES:
                raise ValueError(f"tokenizer files over {tokenizers.MAX_BYTES:,} bytes")
        return bytes(data)


def checked_tokenizer(data: bytes, expected: str) -> Any | None:
    """The tokenizer in packed files if its fingerprint is ``expected``, else None."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(str(tokenizers.unpack(data, Path(tmp))))
    return tok if tokenizers.fingerprint(tok) == expected else None


def load_tokenizer(ref: str) -> Any:
    """A model directory's tokenizer, or a GGUF file's (``--tokenizers.smollm2=FILE.gguf``)."""
    from transformers import AutoTokenizer

    where, kwargs = tokenizers.pretrained_args(ref)
    return AutoTokenizer.from_pretrained(where, **kwargs)
