"""A gateway with no tokenizer configured counts a base model's tokens with the tokenizer a
serving node sends — only if it is the one the coordinator records. Real processes: a
coordinator (``--tokenizers.tiny``), a node that forges its tokenizer (``ForgesTokenizer``: the
tiny model's with numbers added as single tokens, which would count its answers short), then an
honest node, and a gateway started without ``--tokenizers``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from node.model.loading import load_tokenizer as load
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(300)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "12 + 30 ="}], "max_tokens": 8,
        "seed": 3}  # fmt: skip


def test_the_gateway_takes_only_the_tokenizer_the_coordinator_records(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator(extra=[f"--tokenizers.tiny={tiny_model}"])
    serve = ["--serve", f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    cluster.start_node("forger", roles="inference", extra=serve,
                       module="tests.adversarial.cheating_node",
                       env={"BAZAAR_CHEAT": "ForgesTokenizer"})  # fmt: skip
    gateway, url, key = cluster.start_gateway()
    headers = {"authorization": f"Bearer {key}"}
    wait_until(lambda: "tiny" in httpx.get(f"{url}/health", timeout=2).json()["models"], 120,
               what="the gateway routing to the forging node")  # fmt: skip

    # the coordinator fingerprints its tokenizers in the background after it starts, and the
    # gateway reads them with its routes (every 2 s): until then it has none to check against
    def recorded() -> bool:
        auth = {"authorization": f"Bearer {cluster.admit_gateway()}"}
        routes = httpx.get(f"{cluster.url}/v1/network/routes", headers=auth, timeout=5).json()
        return "tiny" in routes["tokenizers"]

    wait_until(recorded, 120, what="the coordinator's fingerprint of tiny's tokenizer")

    def forger_refused() -> httpx.Response | None:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
        assert r.status_code == 503, r.text  # never served, before the check or after
        return r if "forger: not the tokenizer" in r.json()["error"]["message"] else None

    # the only node serving tiny sends a tokenizer the coordinator does not record: refused
    refused = wait_until(forger_refused, 30, what="the forged tokenizer refused")
    error = refused.json()["error"]
    assert error["code"] == "tokenizer_unavailable"
    assert "forger: not the tokenizer the coordinator records" in error["message"]
    assert "sent a tokenizer for tiny that is not the one" in gateway.output()

    # an honest node joins: its tokenizer is taken, and the gateway counts with it exactly
    cluster.start_node("honest", roles="inference", extra=serve)
    wait_until(lambda: len(cluster.routes()) == 2, 120, what="the honest node serving")

    def served() -> httpx.Response | None:
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
        return r if r.status_code == 200 else None

    answer = wait_until(served, 60, what="a chat counted with the honest node's tokenizer").json()
    tok = load(tiny_model)
    prompt = tok.apply_chat_template(CHAT["messages"], add_generation_prompt=True, tokenize=False)
    text = answer["choices"][0]["message"]["content"] or ""
    assert answer["usage"]["prompt_tokens"] == len(tok(prompt, add_special_tokens=False).input_ids)
    assert answer["usage"]["completion_tokens"] == min(len(text.encode()), 8)  # byte-level
    assert "counting tiny with the tokenizer node honest sent" in gateway.output()
    usage = httpx.get(f"{url}/v1/usage", headers=headers, timeout=10).json()
    # refused requests reserved and billed nothing; the served one is billed as answered
    assert [(r["status"], r["node"]) for r in usage["data"]] == [(200, usage["data"][0]["node"])]
    assert usage["total"]["total_tokens"] == answer["usage"]["total_tokens"]
