"""A node's OpenAI-compatible endpoint, driven by the official ``openai`` client: a real node
process serving the tiny model (``--serve``), found through the coordinator's routes and opened
by the serving token they carry, as an admitted gateway finds and opens it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[openai.OpenAI]:
    cluster = Cluster(tmp_path_factory.mktemp("serving"), interval_s=1.0)
    try:
        cluster.start_coordinator()
        cluster.start_node("server", extra=["--serve", f"--model_cache={tiny_model.parent.parent}"])

        route = wait_until(lambda: cluster.routes().get("server"), 60, what="the serving route")
        assert route["models"] == ["tiny"]
        client = openai.OpenAI(base_url=f"{route['url']}/v1", api_key=route["token"],
                               max_retries=0)  # fmt: skip
        wait_until(lambda: client.models.list().data, 60, what="the model loaded")
        yield client
    finally:
        cluster.stop_all()


CHAT = [{"role": "user", "content": "What is 12 + 7?"}]


def test_models_and_chat(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, seed=3)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "tiny"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, seed=3)  # type: ignore[arg-type]
    assert again.choices[0].message.content == choice.message.content  # same seed, same answer


def test_n_stop_logprobs_and_unknown_fields(client: openai.OpenAI) -> None:
    two = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, n=2, seed=1, logprobs=True,  # type: ignore[arg-type]
        extra_body={"no_such_field": True},
    )  # fmt: skip
    assert [c.index for c in two.choices] == [0, 1]
    for c in two.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    full = client.completions.create(model="tiny", prompt="abcdef", max_tokens=8, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 2, text
    stop = text[1]
    cut = client.completions.create(
        model="tiny", prompt="abcdef", max_tokens=8, temperature=0, stop=[stop], logprobs=0
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens == len(cut.choices[0].text)


def test_streaming_with_and_without_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, seed=5, n=2)  # type: ignore[arg-type]
    for include_usage in (False, True):
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=CHAT, max_tokens=8, seed=5, n=2, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True} if include_usage else None,
            )
        )  # fmt: skip
        assert len({c.id for c in chunks}) == 1  # one stable id
        for i in range(2):
            deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
            assert deltas[0].delta.role == "assistant"
            assert "".join(d.delta.content or "" for d in deltas) == (
                whole.choices[i].message.content
            )
            assert [d.finish_reason for d in deltas if d.finish_reason] == [
                whole.choices[i].finish_reason
            ]
        usage = [c for c in chunks if c.usage is not None]
        if include_usage:
            assert len(usage) == 1 and usage[0].choices == [] and chunks[-1] is usage[0]
            assert usage[0].usage == whole.usage
        else:
            assert usage == []


def test_errors_are_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=CHAT, n=0)  # type: ignore[arg-type]
    assert bad.value.code == "invalid_request" and "n" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100_000)  # type: ignore[arg-type]
    assert long.value.code == "context_length_exceeded"
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=CHAT,
        max_tokens=2,
        extra_headers={"x-request-id": "abc-123"},  # type: ignore[arg-type]
    )
    assert raw.headers["x-request-id"] == "abc-123"
    fresh = client.models.with_raw_response.list()
    assert fresh.headers["x-request-id"].startswith("req-")


def test_episodes_are_evaluated_turn_by_turn_with_avg_and_pass_at_k(
    client: openai.OpenAI,
) -> None:
    """``bazaar eval``'s engine on a multi-turn game through the node's API: every attempt an
    episode, the environment answering each reply; avg@k and pass@k over k attempts; the same
    seeds, the same rewards."""
    from bazaar.evaluate import evaluate, report

    args = {"high": 3, "max_turns": 3}
    rewards = evaluate(client, "guess", args, "tiny", 6, k=3, max_tokens=4, concurrency=2)
    assert len(rewards) == 6 and all(len(r) == 3 for r in rewards)
    assert all(0.0 <= x <= 1.0 for r in rewards for x in r)
    summary = report(rewards, threshold=0.5)
    assert set(summary.passes) == {1, 2, 3} and summary.k == 3
    assert summary.passes[1].mean <= summary.passes[3].mean
    assert summary.passes[1].mean == pytest.approx(sum(x >= 0.5 for r in rewards for x in r) / 18)
    assert evaluate(client, "guess", args, "tiny", 6, k=3, max_tokens=4) == rewards


def test_tool_messages_are_rendered_into_the_prompt(client: openai.OpenAI) -> None:
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "2 * 3"}}</tool_call>'
    convo = [*CHAT, {"role": "assistant", "content": call}]
    with_result = [*convo, {"role": "tool", "tool_call_id": "call_1_0", "content": "6" * 40}]
    short = client.chat.completions.create(model="tiny", messages=convo, max_tokens=2)  # type: ignore[arg-type]
    long = client.chat.completions.create(model="tiny", messages=with_result, max_tokens=2)  # type: ignore[arg-type]
    assert short.usage is not None and long.usage is not None
    # the tool's 40 digits and its role's markers: the byte-level tiny model counts each
    assert long.usage.prompt_tokens - short.usage.prompt_tokens >= 40 + len("<|tool|>")
