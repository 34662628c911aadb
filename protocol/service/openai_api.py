"""The OpenAI API's request bodies and model cards, as node serving endpoints and the gateway
read them (one definition, so both accept and refuse the same requests).

Fields follow OpenAI's API: ``n``, ``stop``, ``max_tokens`` (``max_completion_tokens``),
``temperature``, ``top_p``, ``seed``, ``logprobs``, ``stream`` with ``stream_options``;
unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI does
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and (self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    """A ``tool`` message's: the call it answers (rendered by templates that use it)."""
    name: Annotated[str, Field(max_length=256)] | None = None


class ChatRequest(OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False


class CompletionRequest(OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


def model_card(model: str, base: str) -> dict[str, Any]:
    """An OpenAI model object; an adapter (``model != base``) names its ``parent`` and ``root``,
    as OpenAI's fine-tuned models do."""
    card: dict[str, Any] = {"id": model, "object": "model", "created": 0, "owned_by": "bazaar"}
    if model != base:
        card |= {"parent": base, "root": base}
    return card
