"""Tools an environment gives the model: declared in OpenAI's format, called in the chat, answered.

A tool is a typed Python function. Its declaration — OpenAI's ``{"type": "function", "function":
{"name", "description", "parameters"}}`` — comes from the function itself: the JSON schema of its
parameters from the signature (pydantic builds a model of it, which also validates each call's
arguments), the descriptions from the docstring (docstring-parser: Google, reST or numpydoc).

The model calls tools in the syntax Hermes, Qwen2.5 and many open chat templates use, inside its
reply: ``<tool_call>{"name": "calculate", "arguments": {"expression": "2+2"}}</tool_call>``, one
block per call. ``parse_tool_calls`` finds them; ``Toolbox.call`` runs one and always returns the
text of a ``tool`` message: a bad call — a block that is not JSON, an unknown tool, arguments that
do not fit the schema, a tool that raises or overruns its time — is answered with an ``error:``
message the model sees and a rubric can score, never raised.

Tools must be deterministic (same arguments, same result): a verifier recomputes every tool
result of an episode and fails one that differs (``verification.episodes``). A tool that runs
untrusted code does it in ``envs.sandbox``, whose limits (CPU seconds, memory) decide the same
way on every machine; a wall-clock timeout here is a last resort for a tool that hangs.

>>> def add(a: int, b: int) -> int:
...     '''Add two integers.
...
...     Args:
...         a: the first
...         b: the second
...     '''
...     return a + b
>>> box = Toolbox([add])
>>> box.schemas()[0]["function"]["parameters"]["properties"]["a"]
{'description': 'the first', 'type': 'integer'}
>>> text, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>')
>>> box.call(calls[0])
'5'
>>> box.call(ToolCall("call_0", "add", '{"a": "two"}'))[:40]
'error: invalid arguments for add: a: Inp'
"""  # noqa: E501

from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import docstring_parser
import pydantic

from protocol.chat import tools_prompt

__all__ = ["Tool", "ToolCall", "ToolError", "Toolbox", "answer_calls", "parse_tool_calls",
           "tools_prompt"]  # fmt: skip

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
"""A call block; an unclosed block at the end of a reply counts (the model ran out of tokens
or stopped early), and is answered as a call that does not parse."""
MAX_RESULT_CHARS = 2000
"""A tool's answer is cut to this many characters (with a note): a turn must stay short."""


class ToolError(ValueError):
    """A tool declaration that cannot be made (a parameter without a type, a duplicate name)."""


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI shapes it: ``arguments`` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    name: str
    description: str
    params: type[pydantic.BaseModel]
    timeout_s: float

    @classmethod
    def of(cls, fn: Callable[..., Any], timeout_s: float = 10.0) -> Tool:
        """The tool a typed function declares (``ToolError`` if a parameter has no type)."""
        doc = docstring_parser.parse(inspect.getdoc(fn) or "")
        described = {p.arg_name: p.description or "" for p in doc.params}
        fields: dict[str, Any] = {}
        try:  # resolved: a module with ``from __future__ import annotations`` has strings
            hints = typing.get_type_hints(fn, include_extras=True)
        except NameError as e:
            raise ToolError(f"tool {fn.__name__}: cannot resolve its annotations ({e})") from None
        for name, p in inspect.signature(fn).parameters.items():
            if name not in hints:
                raise ToolError(f"tool {fn.__name__}: parameter {name!r} has no type annotation")
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[name] = (hints[name], pydantic.Field(default, description=described.get(name)))
        params = pydantic.create_model(
            f"{fn.__name__}_params",
            __config__=pydantic.ConfigDict(extra="forbid", strict=True),
            **fields,
        )
        description = "\n\n".join(
            d for d in (doc.short_description, doc.long_description) if d
        ).strip()
        return cls(fn, fn.__name__, description, params, timeout_s)

    def schema(self) -> dict[str, Any]:
        """OpenAI's function declaration of this tool."""
        parameters = self.params.model_json_schema()
        parameters.pop("title", None)
        for prop in parameters.get("properties", {}).values():
            prop.pop("title", None)
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": parameters,
            },
        }


class Toolbox:
    """The tools of an environment, by name."""

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools:
            tool = t if isinstance(t, Tool) else Tool.of(t)
            if tool.name in self.tools:
                raise ToolError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def call(self, call: ToolCall) -> str:
        """The ``tool`` message's content answering ``call``: the result, or ``error: ...``."""
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return f"error: unknown tool {call.name!r} (tools: {known})"
        try:
            args = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as e:
            return f"error: arguments for {call.name} are not JSON: {e.msg} at {e.pos}"
        if not isinstance(args, dict):
            return f"error: arguments for {call.name} must be a JSON object"
        try:
            valid = tool.params.model_validate(args)
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in e.errors()
            )
            return f"error: invalid arguments for {call.name}: {problems}"
        try:
            result = _run(tool, dict(valid))
        except TimeoutError:
            return f"error: {call.name} did not finish within {tool.timeout_s:g} s"
        except Exception as e:  # the tool's failure is the model's answer, never a crash
            return f"error: {call.name} raised {type(e).__name__}: {e}"
        text = result if isinstance(result, str) else json.dumps(result)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + f"... [{len(text) - MAX_RESULT_CHARS} more chars]"
        return text


def _run(tool: Tool, args: dict[str, Any]) -> Any:
    """The tool's result; ``TimeoutError`` past its ``timeout_s`` (the thread is left to end:
    Python cannot kill one — a tool that may hang runs its work in a process, as the sandbox
    does)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(tool.fn, **args).result(timeout=tool.timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def parse_tool_calls(text: str, turn: int = 0) -> tuple[str, list[ToolCall]]:
    """``(the reply's text outside call blocks, its calls)``. Call ids are ``call_<turn>_<k>``:
    a function of the episode, so any peer rebuilding it gets the same. A block that is not a
    JSON object with a ``name`` becomes a call named ``""`` holding the block's text, which
    ``Toolbox.call`` answers as an error."""
    calls = []
    for k, match in enumerate(TOOL_CALL.finditer(text)):
        body = match.group(1).strip()
        name, arguments = "", body
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
            name = parsed["name"]
            raw = parsed.get("arguments", {})
            arguments = raw if isinstance(raw, str) else json.dumps(raw)
        calls.append(ToolCall(f"call_{turn}_{k}", name, arguments))
    return TOOL_CALL.sub("", text).strip(), calls


def answer_calls(toolbox: Toolbox, calls: list[ToolCall]) -> list[dict[str, str]]:
    """The ``tool`` messages answering ``calls``, in order."""
    out = []
    for call in calls:
        if call.name:
            content = toolbox.call(call)
        else:
            content = (
                'error: not a tool call (want {"name": ..., "arguments": {...}}): '
                f"{call.arguments[:200]!r}"
            )
        out.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
    return out
