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
  reported usage is never used for billing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio

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
            nodes = (await resp.json())["data"]
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

    def is_loaded(self, model: str) -> bool:
        return model in self._loaded

    def tokenizer(self, model: str) -> Any:
        if model not in self._loaded:
            from transformers import AutoTokenizer

            self._loaded[model] = AutoTokenizer.from_pretrained(self.paths.get(model, model))
        return self._loaded[model]

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
