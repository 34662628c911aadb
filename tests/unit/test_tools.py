"""Tools: declarations derived from typed functions, calls parsed from replies, and every bad
call answered as a message the model sees — never raised."""

from __future__ import annotations

import json
import time
from typing import Literal

import pytest

from envs.tools import (
    MAX_RESULT_CHARS,
    Tool,
    Toolbox,
    ToolCall,
    ToolError,
    answer_calls,
    parse_tool_calls,
    tools_prompt,
)


def search(query: str, limit: int = 3, mode: Literal["fast", "exact"] = "fast") -> list[str]:
    """Search the catalogue.

    Finds items whose names contain the query.

    Args:
        query: what to look for
        limit: at most this many results
        mode: how to match
    """
    return [f"{query}-{i}" for i in range(limit)]


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: ignored
    """
    raise RuntimeError(f"cannot handle {x}")


def slow(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "done"


def chatty() -> str:
    """Says a lot."""
    return "x" * (MAX_RESULT_CHARS + 500)


def test_the_declaration_comes_from_the_signature_and_docstring() -> None:
    schema = Tool.of(search).schema()
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "search"
    assert fn["description"] == (
        "Search the catalogue.\n\nFinds items whose names contain the query."
    )
    params = fn["parameters"]
    assert params["type"] == "object" and params["required"] == ["query"]
    assert params["additionalProperties"] is False
    assert params["properties"]["query"] == {"description": "what to look for", "type": "string"}
    assert params["properties"]["limit"]["type"] == "integer"
    assert params["properties"]["limit"]["default"] == 3
    assert params["properties"]["mode"]["enum"] == ["fast", "exact"]
    json.dumps(schema)  # plain JSON, as an API sends it


def test_declarations_that_cannot_be_made_are_refused() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolError, match="no type annotation"):
        Tool.of(untyped)
    with pytest.raises(ToolError, match="two tools"):
        Toolbox([search, search])


def test_calls_are_parsed_from_the_reply_with_ids_of_the_episode() -> None:
    reply = (
        'Let me look. <tool_call>{"name": "search", "arguments": {"query": "ant"}}</tool_call>'
        '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"bee\\"}"}</tool_call> ok'
    )
    text, calls = parse_tool_calls(reply, turn=3)
    assert text == "Let me look.  ok"
    assert calls == [
        ToolCall("call_3_0", "search", '{"query": "ant"}'),
        ToolCall("call_3_1", "search", '{"query": "bee"}'),
    ]
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    # an unclosed block at the end of a reply still counts (answered as an error if broken)
    _, (cut,) = parse_tool_calls('<tool_call>{"name": "search", "argu')
    assert cut.name == "" and cut.arguments.startswith('{"name"')


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (ToolCall("c", "delete_everything", "{}"), "error: unknown tool 'delete_everything'"),
        (ToolCall("c", "search", "{not json"), "error: arguments for search are not JSON"),
        (ToolCall("c", "search", "[1, 2]"), "must be a JSON object"),
        (ToolCall("c", "search", '{"limit": 2}'), "query: Field required"),
        (ToolCall("c", "search", '{"query": 5}'), "query: Input should be a valid string"),
        (ToolCall("c", "search", '{"query": "a", "limit": "2"}'), "limit: Input should be"),
        (ToolCall("c", "search", '{"query": "a", "mode": "slow"}'), "mode: Input should be"),
        (ToolCall("c", "search", '{"query": "a", "sudo": true}'), "sudo: Extra inputs"),
        (ToolCall("c", "boom", '{"x": 1}'), "error: boom raised RuntimeError: cannot handle 1"),
        (ToolCall("c", "slow", '{"seconds": 5.0}'), "error: slow did not finish within 0.2 s"),
    ],
)
def test_every_bad_call_is_an_answer_not_a_crash(call: ToolCall, says: str) -> None:
    box = Toolbox([search, boom, Tool.of(slow, timeout_s=0.2)])
    answer = box.call(call)
    assert answer.startswith("error:") and says in answer, answer


def test_results_are_text_and_long_ones_are_cut() -> None:
    box = Toolbox([search, chatty])
    assert json.loads(box.call(ToolCall("c", "search", '{"query": "a", "limit": 2}'))) == [
        "a-0",
        "a-1",
    ]
    long = box.call(ToolCall("c", "chatty", "{}"))
    assert len(long) < MAX_RESULT_CHARS + 50 and long.endswith("[500 more chars]")


def test_answers_are_tool_messages_in_order_and_garbage_blocks_get_one_too() -> None:
    box = Toolbox([search])
    _, calls = parse_tool_calls(
        '<tool_call>{"name": "search", "arguments": {"query": "x", "limit": 1}}</tool_call>'
        "<tool_call>rm -rf /</tool_call>",
        turn=1,
    )
    first, second = answer_calls(box, calls)
    assert first == {"role": "tool", "tool_call_id": "call_1_0", "name": "search",
                     "content": '["x-0"]'}  # fmt: skip
    assert second["tool_call_id"] == "call_1_1" and second["name"] == ""
    assert second["content"].startswith("error: not a tool call") and "rm -rf" in second["content"]


def test_the_prompt_declares_the_tools_and_the_call_syntax() -> None:
    text = tools_prompt(Toolbox([search]).schemas())
    assert '"name":"search"' in text and "<tool_call>" in text
