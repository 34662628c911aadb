"""The gateway, driven by the official ``openai`` client: a real coordinator, a real node serving
the tiny model, a real gateway process (uvicorn + uvloop) with its own database of keys."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from protocol.accounts import KeyStore, open_database
from tests.conftest import free_port
from tests.integration.cluster import Cluster
from tests.integration.served import Gateway, served_network
from tests.lora import random_adapter
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(240)
CHAT = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Gateway]:
    with served_network(tmp_path_factory.mktemp("gateway"), tiny_model) as net:
        yield net


def test_chat_completions_and_usage_add_up(gateway: Gateway) -> None:
    secret, key = gateway.keys.create("app")
    client = gateway.client(secret)
    assert "tiny" in [m.id for m in client.models.list().data]
    returned = 0
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2, seed=4)  # type: ignore[arg-type]
    assert len(chat.choices) == 2 and chat.usage is not None
    # the gateway's own count: the tiny tokenizer is byte-level, so a choice costs its UTF-8
    # length, capped at max_tokens (the cap covers bytes that were not valid UTF-8)
    assert chat.usage.completion_tokens == sum(
        min(len((c.message.content or "").encode()), 8) for c in chat.choices
    )
    returned += chat.usage.total_tokens
    done = client.completions.create(model="tiny", prompt="abc", max_tokens=5, stop=["\n"])
    assert done.usage is not None
    returned += done.usage.total_tokens
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == min(len(text.encode()), 8)
    returned += chunks[-1].usage.total_tokens
    plain = list(
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True)
    )  # type: ignore[arg-type]
    assert all(c.usage is None for c in plain) and plain[0].choices[0].delta.role == "assistant"
    billed = httpx.get(f"{gateway.url}/v1/usage", headers={"authorization": f"Bearer {secret}"})
    total = billed.json()["total"]
    assert total["requests"] == 4
    plain_tokens = billed.json()["data"][-1]
    assert (
        total["total_tokens"]
        == returned + plain_tokens["prompt_tokens"] + plain_tokens["completion_tokens"]
    )
    (after,) = [k for k in gateway.keys.all() if k.id == key.id]
    assert after.used_tokens == total["total_tokens"] and after.reserved_tokens == 0


def test_errors_have_openai_shape_and_status(gateway: Gateway) -> None:
    missing = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["x-request-id"]
    with pytest.raises(openai.AuthenticationError):
        gateway.client("bz-not-a-key").models.list()
    secret, _ = gateway.keys.create("errors", rpm=3)
    client = gateway.client(secret)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, n=0)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(4):  # the fourth in a minute
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert int(limited.value.response.headers["retry-after"]) >= 1
    poor, _ = gateway.keys.create("poor", budget_tokens=10)
    with pytest.raises(openai.APIStatusError) as broke:
        gateway.client(poor).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)  # type: ignore[arg-type]
    assert broke.value.status_code == 402 and broke.value.code == "insufficient_quota"
    assert broke.value.response.headers["x-should-retry"] == "false"
    gateway.keys.revoke("errors")  # from another process: effective within key_cache_s

    def refused() -> bool:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    wait_until(refused, 5, what="the revoked key refused")


def test_concurrent_requests_never_overspend_a_budget(gateway: Gateway) -> None:
    secret, key = gateway.keys.create("small", budget_tokens=600)
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)

    async def one() -> int:
        try:
            r = await client.completions.create(model="tiny", prompt="ab", max_tokens=4)
        except openai.APIStatusError as e:
            assert e.status_code == 402
            return 0
        assert r.usage is not None
        return r.usage.total_tokens

    async def burst() -> list[int]:
        return await asyncio.gather(*(one() for _ in range(200)))

    spent = asyncio.run(burst())
    (after,) = [k for k in gateway.keys.all() if k.id == key.id]
    assert after.used_tokens + after.reserved_tokens <= 600

    def given_back() -> bool:  # the idle key's hold returns to its budget
        (after,) = [k for k in gateway.keys.all() if k.id == key.id]
        return after.reserved_tokens == 0

    wait_until(given_back, 10, what="the gateway to give the idle key's hold back")
    (after,) = [k for k in gateway.keys.all() if k.id == key.id]
    assert after.used_tokens == sum(spent) <= 600
    assert 0 < sum(s > 0 for s in spent) < 200  # some served, the rest refused


def test_failover_when_a_serving_node_dies_and_503_when_none_is_left(
    tmp_path: Path, tiny_model: Path
) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    db = f"sqlite:///{tmp_path / 'gateway.db'}"
    try:
        cluster.start_coordinator()
        model = [f"--model_cache={tiny_model.parent.parent}", "--serve", "--torch_threads=1"]
        nodes = [cluster.start_node(n, extra=model) for n in ("a", "b")]

        def both_serving() -> dict[str, dict[str, object]] | None:
            routes = cluster.routes()
            return routes if len(routes) == 2 else None

        routes = wait_until(both_serving, 90, what="two serving nodes")
        port = free_port()
        # the gateway reads the routes once and keeps them: dead nodes stay on its list
        cluster.spawn("gateway", tmp_path / "gw", [
            "gateway", "start", "--coordinator-url", cluster.url, "--listen", f"127.0.0.1:{port}",
            "--db", db, f"--tokenizers.tiny={tiny_model}", "--refresh_s=600",
        ], env=cluster.gateway_env())  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health").json()["nodes"] == 2, 60, what="routes")
        secret, _ = KeyStore(open_database(db)).create("k")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        for info in routes.values():  # a node serves once its model is loaded
            wait_until(lambda u=info["url"]: httpx.get(f"{u}/health").is_success,
                       90, what="a loaded model")  # fmt: skip
        nodes[0].signal(signal.SIGKILL)
        nodes[0].wait()
        for _ in range(6):  # every request lands on the live node, whichever is tried first
            r = client.completions.create(model="tiny", prompt="ab", max_tokens=3)
            assert r.choices[0].finish_reason in ("stop", "length")
        nodes[1].signal(signal.SIGKILL)
        nodes[1].wait()
        with pytest.raises(openai.APIStatusError) as none_left:
            client.completions.create(model="tiny", prompt="ab", max_tokens=3)
        assert none_left.value.status_code == 503 and none_left.value.code == "no_capacity"
    finally:
        cluster.stop_all()


def test_model_selects_base_or_adapter_version(gateway: Gateway, tiny_model: Path) -> None:
    secret, _ = gateway.keys.create("adapters")
    client = gateway.client(secret)
    cards = {m.id: m for m in client.models.list().data}
    assert {"tiny", "demo", "demo@1", "demo@2"} <= set(cards)
    assert getattr(cards["demo@1"], "parent", None) == "tiny"
    assert getattr(cards["demo"], "root", None) == "tiny" and not hasattr(cards["tiny"], "parent")

    def answer(model: str) -> str:
        done = client.completions.create(model=model, prompt="12+7=", max_tokens=8,
                                         temperature=0)  # fmt: skip
        assert done.model == model and done.usage is not None
        return done.choices[0].text

    base, v1, v2 = answer("tiny"), answer("demo@1"), answer("demo@2")
    assert len({base, v1, v2}) == 3  # three different weights
    assert answer("demo") == v2  # the newest version
    # a new version arriving in the node's store is served, and announced, without a restart
    gateway.adapters.add_dir("demo", 3, random_adapter(tiny_model, gateway.root / "lora3", 3))

    def listed() -> bool:
        return "demo@3" in [m.id for m in client.models.list().data]

    wait_until(listed, 20, what="the gateway to route demo@3")
    v3 = answer("demo@3")
    assert v3 not in (v1, v2) and answer("demo") == v3 and answer("demo@1") == v1
    with pytest.raises(openai.NotFoundError):
        answer("demo@9")
