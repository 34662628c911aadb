"""A real model through the gateway by the name its node announces, with no tokenizer flag on
the gateway: a node serving SmolLM2-135M (GGUF), a coordinator that knows its tokenizer
(``--tokenizers.smollm2=FILE.gguf``, the one it recounts with), a gateway with none. The gateway
takes the node's tokenizer files once their fingerprint matches the coordinator's record, and
counts the prompt as the model's own tokenizer does."""

from __future__ import annotations

import httpx
import pytest

from node.model.loading import load_tokenizer, smollm2_path
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        smollm2_path() is None, reason="SmolLM2 GGUF not installed: run scripts/setup-smollm2"
    ),
]


def test_smollm2_answers_through_a_gateway_without_tokenizer_flags(cluster: Cluster) -> None:
    gguf = smollm2_path()
    assert gguf is not None
    cluster.start_coordinator(extra=[f"--tokenizers.smollm2={gguf}"])
    cluster.start_node("server", roles="inference", extra=["--serve", "--model=smollm2"])
    _, url, key = cluster.start_gateway()
    headers = {"authorization": f"Bearer {key}"}
    wait_until(lambda: "smollm2" in httpx.get(f"{url}/health", timeout=2).json()["models"], 600,
               what="the gateway routing to the SmolLM2 node")  # fmt: skip
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
    body = {"model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0}

    def answered() -> httpx.Response | None:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)
        return r if r.status_code == 200 else None  # 503 until the coordinator's fingerprint

    answer = wait_until(answered, 300, what="a chat with smollm2 through the gateway").json()
    assert "5" in answer["choices"][0]["message"]["content"]
    tok = load_tokenizer(gguf)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert answer["usage"]["prompt_tokens"] == len(tok(prompt, add_special_tokens=False).input_ids)
