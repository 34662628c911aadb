"""Chat requests as the model sees them: OpenAI messages and tools, turned into the messages a
chat template renders — one definition for the node (which samples from that prompt), the
gateway (which bills it) and the environments (which train on it), so none drifts from another.

OpenAI's messages carry more than a template reads: ``content`` may be a list of parts, an
assistant message may hold ``tool_calls`` and no content, tools are declared beside the
messages. ``template_messages`` turns them into ``{"role", "content"}`` strings:

- text parts are joined; any other part (an image, audio, a file) is refused, by name;
- ``developer`` is ``system`` (the templates here know no ``developer`` role);
- an assistant's tool calls are written into its content as the model writes them, one
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block each (the Hermes syntax the
  tiny model's and SmolLM2's templates have no native form for, so the model learns and reads
  this one); ``tool`` messages stay ``tool`` messages;
- declared tools go into the system message, first (``tools_prompt``), as the agent
  environments put them: a model trained on an environment sees its tools the same way served.

>>> msgs = [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
...         {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
...          "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
...         {"role": "tool", "tool_call_id": "c1", "content": "4"}]
>>> [m["content"] for m in template_messages(msgs)]
['2+2?', '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>', '4']
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class ChatError(ValueError):
    """A request whose messages or tools cannot be rendered; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def tools_prompt(schemas: list[dict[str, Any]]) -> str:
    """The system prompt text that declares ``schemas`` (OpenAI tool declarations) to a chat
    template without native tool support (the tiny model's, SmolLM2's): the tools as JSON and how
    to call them."""
    listed = "\n".join(json.dumps(s["function"], separators=(",", ":")) for s in schemas)
    return (
        "You can call tools. Tools:\n<tools>\n" + listed + "\n</tools>\n"
        'To call one, reply with <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.'
    )


def render_call(name: str, arguments: str) -> str:
    """One call as the model writes it; ``arguments`` (OpenAI's JSON string) goes in verbatim
    when it is a JSON object, as a string otherwise."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = None
    args = arguments if isinstance(parsed, dict) else json.dumps(arguments)
    return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(name)}, "arguments": {args}}}{TOOL_CALL_CLOSE}'


def text_of(content: Any, param: str) -> str:
    """A message's content as one string: a string, None (no content), or text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ChatError(
                f"content parts of type {kind!r} are not supported: this model reads text only",
                f"{param}[{j}].type",
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[dict[str, str]]:
    """The messages as the chat template renders them (see the module docstring); ``ChatError``
    for a part that is not text, or a ``tool`` message that answers no earlier call."""
    out: list[dict[str, str]] = []
    called: set[str] = set()
    """Ids of earlier calls made as ``tool_calls``."""
    written = False
    """Whether an earlier assistant message wrote a call block in its content (an agent
    environment's conversation, sent back as the model wrote it)."""
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        content = text_of(m.get("content"), f"messages[{i}].content")
        if role == "assistant":
            written = written or TOOL_CALL_OPEN in content
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for call in m["tool_calls"]:
                called.add(call["id"])
                fn = call["function"]
                blocks.append(render_call(fn["name"], fn["arguments"]))
            content = "\n".join(([content] if content else []) + blocks)
        if role == "tool" and m.get("tool_call_id") not in called and not written:
            raise ChatError(
                f"messages[{i}]: a 'tool' message must answer a tool call of an earlier assistant"
                f" message (no call has the id {m.get('tool_call_id')!r})",
                f"messages[{i}].tool_call_id",
            )
        out.append({"role": role, "content": content})
    if tools:
        declared = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            both = (declared, out[0]["content"])
            out[0] = {"role": "system", "content": "\n\n".join(p for p in both if p)}
        else:
            out.insert(0, {"role": "system", "content": declared})
    return out
