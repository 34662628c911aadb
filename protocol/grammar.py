"""What constrained decoding lets the model write: the grammar of a chat request's
``response_format`` or forced ``tool_choice``, in the format of the grammar engine, llguidance.

- ``response_format: {"type": "json_object"}``: any JSON object;
- ``response_format: {"type": "json_schema", ...}``: JSON that fits the schema;
- ``tool_choice: "required"`` or a named function: tool-call blocks in the syntax the model
  writes (``protocol/chat.py``), ``<tool_call>{"name": "NAME", "arguments": ARGS}</tool_call>``,
  with ``ARGS`` JSON that fits that function's parameters — one call, or several on their own
  lines when ``parallel_tool_calls`` allows; the name is one of the declared (or the named) ones.

The node turns the grammar into a token mask per step, applied to the logits before the seeded
Gumbel-max pick (``node/model/constrained.py``): the same request with the same seed samples the
same tokens, and a replay that applies the same mask reproduces them.

Why llguidance (and not outlines-core, xgrammar or our own): it compiles a schema lazily — an
Earley parser over a lexer, the token mask computed per step from the tokenizer's trie (tens of
µs) — so a large or deeply nested schema costs no up-front compilation over the vocabulary
(outlines-core builds a regex automaton of the whole schema against every token first), it covers
JSON Schema widely and says precisely what it cannot compile, it runs on CPU without torch
kernels (xgrammar's fast path targets CUDA), and it is the engine behind OpenAI-compatible
structured outputs in llama.cpp, SGLang and vLLM. Writing a JSON-schema parser with a token
trie ourselves would repeat all of that less well.

>>> grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}})
>>> check(grammar, "response_format")  # compiles: no error
"""

from __future__ import annotations

import json
from typing import Any

from protocol.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

JSON_FORM = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
"""JSON is written as ``json.dumps`` writes it: one form, so the text of arguments the node
parses and the gateway renders back (``protocol.chat.render_call``) is the text generated, token
for token, and a model cannot spend its budget on whitespace."""
MAX_SCHEMA_BYTES = 64 << 10
"""A schema (or all tools' parameters together) larger than this is refused before compiling."""


class GrammarError(ValueError):
    """A grammar that cannot be built or compiled; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _formed(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_FORM, **schema.get("x-guidance", {})}}


def schema_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    return str(LLMatcher.grammar_from_json_schema(_formed(schema)))


def tool_call_grammar(tools: list[dict[str, Any]], parallel: bool) -> str:
    """Tool-call blocks for ``tools`` (OpenAI declarations): one, or one or more if ``parallel``."""
    from llguidance import LLMatcher

    rules = []
    for k, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object"}
        head = f'{TOOL_CALL_OPEN}{{"name": {json.dumps(fn["name"])}, "arguments": '
        rules.append(f"call{k}: {json.dumps(head)} args{k} {json.dumps('}' + TOOL_CALL_CLOSE)}")
        rules.append(f"args{k}: %json {json.dumps(_formed(params))}")
    calls = " | ".join(f"call{k}" for k in range(len(tools)))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    lark = "\n".join([start, f"call: {calls}", *rules])
    return str(LLMatcher.grammar_from_lark(lark))


def check(grammar: str, param: str) -> None:
    """``GrammarError`` (naming ``param``) unless the engine compiles ``grammar``."""
    from llguidance import LLMatcher

    if len(grammar) > MAX_SCHEMA_BYTES:
        raise GrammarError(
            f"the schema is {len(grammar):,} bytes; at most {MAX_SCHEMA_BYTES:,} are accepted",
            param,
        )
    error = LLMatcher.validate_grammar(grammar, None)
    if error:
        raise GrammarError(f"the schema cannot be compiled: {error.strip()}", param)


def request_grammar(req: Any) -> str | None:
    """The grammar a ``ChatRequest`` decodes under (checked), or None when it is free."""
    choice = req.choice()
    if choice is not None and choice not in ("none", "auto"):
        tools = [t for t in req.tool_schemas() if choice == "required" or
                 t["function"]["name"] == choice]  # fmt: skip
        param = "tools" if choice == "required" else "tool_choice"
        grammar = tool_call_grammar(
            tools, parallel=req.parallel_tool_calls and choice == "required"
        )
        check(grammar, param)
        return grammar
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return schema_grammar({"type": "object"})
    schema = fmt.json_schema.schema_ or {}
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise GrammarError(
            f"the schema is larger than {MAX_SCHEMA_BYTES:,} bytes", "response_format.json_schema"
        )
    grammar = schema_grammar(schema)
    check(grammar, "response_format.json_schema.schema")
    return grammar
