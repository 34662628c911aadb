"""The OpenAI API as agent apps use it — tools, structured outputs, content parts, true streaming,
logprobs — through the gateway (and the serving node directly), by the official ``openai``
client, for the base model and an adapter alike. Every response body and stream chunk is checked
against OpenAI's published response schemas (``tests/data/openai_response_schemas.json``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest

from protocol.chat import render_call, template_messages, tools_prompt
from tests.integration.served import Gateway, served_network
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(240)


def json_schema(node: Any) -> Any:
    """OpenAPI's ``nullable: true`` (which the published document still uses, and JSON Schema
    validators ignore) written as JSON Schema: ``null`` added to the type and enum."""
    if isinstance(node, list):
        return [json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        elif "type" not in out:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


SCHEMAS = json_schema(
    json.loads((Path(__file__).parent.parent / "data" / "openai_response_schemas.json").read_text())
)
ASK = [{"role": "user", "content": "What is 2 + 3? Use the tool."}]
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}},
    {"type": "function", "function": {
        "name": "weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 12}}}}},
]  # fmt: skip
ANSWER_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["answer", "unit"],
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                   "unit": {"type": "string", "enum": ["apples", "pears"]}},
}  # fmt: skip
MODELS = ["tiny", "demo"]
"""The base model and an adapter (the newest version of run ``demo``)."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Gateway]:
    with served_network(tmp_path_factory.mktemp("agent-api"), tiny_model) as served:
        yield served


@pytest.fixture(scope="module")
def client(net: Gateway) -> openai.OpenAI:
    secret, _ = net.keys.create("agent-apps")
    return net.client(secret)


def conforms(schema: str, body: Any) -> None:
    """``body`` fits OpenAI's published schema ``schema``."""
    validator = jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{schema}", **SCHEMAS})
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}"
              for e in validator.iter_errors(body)]  # fmt: skip
    assert not errors, (schema, errors[:5], body)


def chat(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    """A non-streamed chat completion's JSON body, checked against OpenAI's schema."""
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    body: dict[str, Any] = raw.http_response.json()
    conforms("CreateChatCompletionResponse", body)
    return body


def stream(client: openai.OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    """A streamed chat completion's chunks, each checked against OpenAI's schema."""
    chunks = [c.model_dump(exclude_unset=True) for c in
              client.chat.completions.create(stream=True, **kwargs)]  # fmt: skip
    for c in chunks:
        conforms("CreateChatCompletionStreamResponse", c)
    return chunks


def fits(arguments: str, schema: dict[str, Any]) -> bool:
    return bool(jsonschema_rs.is_valid(schema, json.loads(arguments)))


def assembled(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]], str]:
    """A streamed choice 0 put together as OpenAI's SDKs do: its content, its tool calls
    (id and name from their first delta, arguments concatenated) and its finish reason."""
    content, calls, reason = "", {}, ""
    for chunk in chunks:
        for c in chunk["choices"]:
            delta = c.get("delta") or {}
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                mine = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                mine["id"] = call.get("id") or mine["id"]
                fn = call.get("function") or {}
                mine["name"] = fn.get("name") or mine["name"]
                mine["arguments"] += fn.get("arguments") or ""
            reason = c.get("finish_reason") or reason
    return content, [calls[k] for k in sorted(calls)], reason


@pytest.mark.parametrize("model", MODELS)
def test_required_and_named_tool_choices_always_give_calls_that_fit(
    client: openai.OpenAI, model: str
) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        named = {"type": "function", "function": {"name": "weather"}}
        for choice, parallel in (("required", True), ("required", False), (named, True)):
            body = chat(client, model=model, messages=ASK, tools=TOOLS, tool_choice=choice,
                        parallel_tool_calls=parallel, max_tokens=160, seed=seed)  # fmt: skip
            (c,) = body["choices"]
            # one call ends the grammar; parallel calls may run on until max_tokens cuts them,
            # and the cut, unfinished call is dropped
            cut = c["finish_reason"] == "length" and parallel and choice == "required"
            assert c["finish_reason"] == "tool_calls" or cut, c
            message = c["message"]
            assert message["content"] is None and message["refusal"] is None, c
            calls = message["tool_calls"]
            assert calls and (parallel or len(calls) == 1)
            assert len({call["id"] for call in calls}) == len(calls)
            for call in calls:
                fn = call["function"]
                assert call["type"] == "function" and call["id"].startswith("call_")
                if isinstance(choice, dict):
                    assert fn["name"] == "weather"
                assert fits(fn["arguments"], schemas[fn["name"]]), fn


@pytest.mark.parametrize("model", MODELS)
def test_streamed_tool_calls_assemble_into_the_same_calls(
    client: openai.OpenAI, model: str
) -> None:
    for parallel in (True, False):
        ask = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=parallel, max_tokens=160, seed=11)  # fmt: skip
        (whole,) = chat(client, **ask)["choices"]
        content, calls, reason = assembled(stream(client, **ask))
        # one call ends the grammar; parallel calls may run on until max_tokens cuts them
        assert reason == whole["finish_reason"] in (("tool_calls", "length") if parallel
                                                    else ("tool_calls",))  # fmt: skip
        assert content == "" and calls
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (w["function"]["name"], w["function"]["arguments"])
            for w in whole["message"]["tool_calls"]
        ]
        assert all(c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("model", MODELS)
def test_structured_outputs_fit_their_schema_streamed_or_not(
    client: openai.OpenAI, model: str
) -> None:
    formats = [
        ({"type": "json_schema", "json_schema": {"name": "answer", "strict": True,
                                                 "schema": ANSWER_SCHEMA}}, ANSWER_SCHEMA),
        ({"type": "json_object"}, {"type": "object"}),
    ]  # fmt: skip
    for fmt, schema in formats:
        for seed in range(3):
            ask = dict(model=model, messages=ASK, response_format=fmt, max_tokens=120, seed=seed)
            c = chat(client, **ask)["choices"][0]
            content, _, reason = assembled(stream(client, **ask))
            assert content == c["message"]["content"] and reason == c["finish_reason"]
            if schema is ANSWER_SCHEMA:  # bounded: always complete within the budget
                assert c["finish_reason"] == "stop"
            if c["finish_reason"] == "stop":  # any JSON object may run out of tokens (as OpenAI's)
                assert fits(c["message"]["content"], schema), c


def test_ignore_eos_runs_to_max_tokens_but_a_grammar_still_ends_the_answer(
    net: Gateway, client: openai.OpenAI
) -> None:
    """vLLM's ``ignore_eos`` extension (what load tests use): the node generates ``max_tokens``
    tokens, unless a grammar completes first — then the answer ends there, and still fits. The
    gateway bills the text it delivered (end-of-sequence tokens carry none), never more."""
    for seed in range(3):
        ask = dict(model="tiny", prompt="12+3=", max_tokens=40, seed=seed,
                   extra_body={"ignore_eos": True})  # fmt: skip
        node = net.direct().completions.create(**ask)  # type: ignore[call-overload]
        via = client.completions.create(**ask)  # type: ignore[call-overload]
        assert node.usage.completion_tokens == 40 and node.choices[0].finish_reason == "length"
        assert via.choices[0].text == node.choices[0].text
        assert via.usage.completion_tokens <= 40 and via.choices[0].finish_reason == "length"
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
        c = chat(client, model="tiny", messages=ASK, response_format=fmt, max_tokens=120,
                 seed=seed, extra_body={"ignore_eos": True})["choices"][0]  # fmt: skip
        assert c["finish_reason"] == "stop" and fits(c["message"]["content"], ANSWER_SCHEMA), c


def test_auto_tool_choice_parses_what_the_model_writes(net: Gateway, client: openai.OpenAI) -> None:
    """``auto`` leaves the model free: a reply with a call block becomes ``tool_calls``, one
    without stays content, with ``finish_reason`` ``stop`` or ``length``."""
    for seed in range(4):
        c = chat(client, model="tiny", messages=ASK, tools=TOOLS, max_tokens=24,
                 seed=seed)["choices"][0]  # fmt: skip
        if c["message"].get("tool_calls"):
            assert c["finish_reason"] == "tool_calls"
        else:
            assert c["finish_reason"] in ("stop", "length")
            assert isinstance(c["message"]["content"], str)


def test_a_conversation_with_tool_calls_and_results_is_billed_as_the_model_saw_it(
    net: Gateway, client: openai.OpenAI, tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    convo: list[dict[str, Any]] = [
        {"role": "developer", "content": "You add numbers."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_a1", "content": "5"},
    ]  # fmt: skip

    def prompt_tokens(messages: list[dict[str, Any]], tools: Any) -> int:
        ids = tok.apply_chat_template(template_messages(messages, tools),
                                      add_generation_prompt=True, tokenize=True)  # fmt: skip
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    for model in MODELS:
        body = chat(client, model=model, messages=convo, tools=TOOLS, max_tokens=8, seed=1)
        assert body["usage"]["prompt_tokens"] == prompt_tokens(convo, TOOLS)
        plain = chat(client, model=model, messages=convo, max_tokens=8, seed=1)
        # the byte-level tiny model: every byte of the declarations is a token
        declared = body["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
        assert declared >= len(tools_prompt(TOOLS).encode())
    # a generated call is billed as the text the model wrote: the node's own count agrees
    ask = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=160,
               seed=5)  # fmt: skip
    billed = chat(client, **ask)
    node = chat(net.direct(), **ask)
    calls = billed["choices"][0]["message"]["tool_calls"]
    written = "\n".join(render_call(c["function"]["name"], c["function"]["arguments"])
                        for c in calls)  # fmt: skip
    completion = billed["usage"]["completion_tokens"]
    assert completion == node["usage"]["completion_tokens"] == len(written.encode())


def test_content_parts_developer_and_names_read_as_text(client: openai.OpenAI) -> None:
    said = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "name": "amy", "content": said}]  # fmt: skip
    text = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"}]  # fmt: skip
    a = chat(client, model="tiny", messages=parts, max_tokens=8, seed=2)
    b = chat(client, model="tiny", messages=text, max_tokens=8, seed=2)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


MALFORMED: list[tuple[dict[str, Any], str, str]] = [
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
     "messages[0].content[1].type", "'image_url'"),
    ({"messages": ASK, "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "search"}}},
     "tool_choice", "'search'"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/definitions/nowhere"}}}},
     "response_format.json_schema.schema", "cannot be compiled"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "5"}]},
     "messages[1].tool_call_id", "must answer a tool call"),
]  # fmt: skip


@pytest.mark.parametrize("request_body,param,says", MALFORMED,
                         ids=["image-part", "unknown-tool", "choice-without-tools",
                              "uncompilable-schema", "orphan-tool-message"])  # fmt: skip
def test_malformed_agent_requests_get_openai_shaped_400s(
    net: Gateway, client: openai.OpenAI, request_body: dict[str, Any], param: str, says: str
) -> None:
    for c in (client, net.direct()):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", max_tokens=4, **request_body)
        conforms("ErrorResponse", e.value.response.json())
        assert e.value.code == "invalid_request" and e.value.param == param
        assert says in e.value.message


@pytest.mark.parametrize("model", MODELS)
def test_logprobs_with_alternatives_whole_and_streamed(client: openai.OpenAI, model: str) -> None:
    ask = dict(model=model, messages=ASK, max_tokens=8, seed=3, logprobs=True, top_logprobs=3)
    c = chat(client, **ask)["choices"][0]
    tokens = c["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == c["message"]["content"]
    for t in tokens:
        alts = [a["logprob"] for a in t["top_logprobs"]]
        assert len(alts) == 3 and alts == sorted(alts, reverse=True)
        assert t["logprob"] <= alts[0] + 1e-6
    chunks = stream(client, **ask)
    streamed = [t for ch in chunks for x in ch["choices"] for t in
                ((x.get("logprobs") or {}).get("content") or [])]  # fmt: skip
    assert streamed == tokens
    done = client.completions.with_raw_response.create(
        model=model, prompt="12+7=", max_tokens=6, seed=3, logprobs=2
    ).http_response.json()
    conforms("CreateCompletionResponse", done)
    (choice,) = done["choices"]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i])
                                 for i in range(len(lp["tokens"]))]  # fmt: skip
    assert all(1 <= len(alts) <= 2 for alts in lp["top_logprobs"])


def test_models_are_listed_and_fetched_one_by_one(net: Gateway, client: openai.OpenAI) -> None:
    for c in (client, net.direct()):
        listed = c.models.with_raw_response.list().http_response.json()
        conforms("ListModelsResponse", listed)
        for name in ("tiny", "demo@1"):
            card = c.models.with_raw_response.retrieve(name).http_response.json()
            conforms("Model", card)
            assert card["id"] == name
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")


def test_streaming_is_token_by_token_and_a_client_that_leaves_stops_the_model(
    net: Gateway, client: openai.OpenAI
) -> None:
    """The first text arrives long before the last (a grammar demanding 120 characters keeps the
    tiny model talking); a client that leaves after its first chunk ends the generation in the
    node's model process (its ``bazaar_serving_cancelled`` gauge counts it)."""
    long = {"type": "json_schema", "json_schema": {"name": "essay", "schema": {
        "type": "object", "required": ["text"], "additionalProperties": False,
        "properties": {"text": {"type": "string", "minLength": 120, "maxLength": 120}},
    }}}  # fmt: skip
    ask = dict(model="tiny", messages=ASK, response_format=long, max_tokens=200, seed=1)
    started = time.perf_counter()
    seen = []
    for chunk in client.chat.completions.create(stream=True, **ask):
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(time.perf_counter() - started)
    assert len(seen) > 20 and seen[0] < seen[-1] / 3, seen[:3] + seen[-1:]

    def cancelled() -> float:
        text = httpx.get(net.node_metrics, timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith("bazaar_serving_cancelled "))
        return float(line.split()[1])

    before = cancelled()
    with client.chat.completions.create(stream=True, **ask) as chunks:
        next(iter(chunks))  # the role chunk; then the client goes away
    wait_until(lambda: cancelled() > before, 30, what="the node to stop generating")
