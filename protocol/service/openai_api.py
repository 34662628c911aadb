"""The OpenAI API's request bodies and model cards, as node serving endpoints and the gateway
read them (one definition, so both accept and refuse the same requests).

Fields follow OpenAI's API: ``n``, ``stop``, ``max_tokens`` (``max_completion_tokens``),
``temperature``, ``top_p``, ``seed``, ``logprobs`` (``top_logprobs``), ``stream`` with
``stream_options``; for chat also messages as apps send them (content as a string or text parts,
``developer``, assistant ``tool_calls``, ``tool`` messages, ``name``), ``tools``,
``tool_choice``, ``parallel_tool_calls`` and ``response_format``. Unknown fields are ignored, as
OpenAI does. ``ChatRequest.check`` refuses what the schema alone cannot: a non-text content
part, a ``tool`` message answering no call, a ``tool_choice`` naming an undeclared tool, a
JSON schema the grammar engine cannot compile (``protocol/grammar.py``) — each a 400 naming the
field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.chat import ChatError, template_messages
from protocol.service.api_errors import APIError


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
    ignore_eos: bool = False
    """vLLM's extension: generate ``max_tokens`` tokens, past the end of sequence (a grammar
    still ends the answer where it completes). For benchmarks and load tests."""

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and (self.stream_options or {}).get("include_usage"))


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: Annotated[str, Field(max_length=65_536)]
    """JSON, as a string (OpenAI's)."""


class ToolCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    """A string or content parts (only ``text`` parts are read; ``check`` refuses others);
    None only for an assistant message that calls tools."""
    tool_calls: Annotated[list[ToolCallItem], Field(max_length=64)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    """A ``tool`` message's: the call it answers."""
    name: Annotated[str, Field(max_length=256)] | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Annotated[str, Field(max_length=4096)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The declared tools in OpenAI's format, as the model is told of them."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def choice(self) -> str | None:
        """``"none"``, ``"auto"``, ``"required"`` or the named function; None without tools."""
        if not self.tools:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def prompt_messages(self) -> list[dict[str, str]]:
        """The messages the chat template renders (``protocol.chat``); 400 if they cannot be."""
        try:
            return template_messages(
                [m.model_dump(exclude_none=True) for m in self.messages], self.tool_schemas()
            )
        except ChatError as e:
            raise APIError(400, str(e), "invalid_request", e.param) from None

    def check(self) -> tuple[list[dict[str, str]], str | None]:
        """Everything the schema cannot check (400s naming the field); the template messages
        and the grammar the answer decodes under (None: free), compiled once here."""
        from protocol.grammar import GrammarError, request_grammar

        messages = self.prompt_messages()
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name \
                not in names:  # fmt: skip
            raise APIError(400, f"tool_choice names the function {self.tool_choice.function.name!r}"
                           f", which is not among the tools ({', '.join(names) or 'none'})",
                           "invalid_request", "tool_choice")  # fmt: skip
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(400, "tool_choice needs tools", "invalid_request", "tool_choice")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise APIError(400, "response_format json_schema needs its json_schema",
                           "invalid_request", "response_format.json_schema")  # fmt: skip
        try:
            grammar = request_grammar(self)
        except GrammarError as e:
            raise APIError(400, str(e), "invalid_request", e.param) from None
        return messages, grammar


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
