"""The gateway's failure paths, against a misbehaving node (``fake_node.py``): an error after
streaming began, clients that disconnect (streaming or not), and restarts — clean and kill -9 —
that keep every usage record and give held budget back."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from protocol.accounts import KeyStore, open_database
from tests.integration.cluster import Cluster
from tests.integration.fake_node import FakeNode, Setup
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def setup(tmp_path: Path, tiny_model: Path) -> Iterator[Setup]:
    cluster = Cluster(tmp_path)
    with FakeNode() as node:
        s = Setup(cluster, node, f"sqlite:///{tmp_path / 'gateway.db'}", tiny_model)
        try:
            s.start_gateway()
            yield s
        finally:
            cluster.stop_all()


def test_an_error_after_streaming_began_is_an_error_event_then_done(setup: Setup) -> None:
    secret, _ = KeyStore(open_database(setup.db)).create("k")
    client = openai.OpenAI(base_url=f"{setup.url}/v1", api_key=secret, max_retries=0)
    pieces = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in client.completions.create(model="tiny", prompt="break", stream=True):
            pieces.append(chunk.choices[0].text)
    assert pieces == ["a", "b"]  # what came before the failure was relayed
    body = {"model": "tiny", "prompt": "break", "stream": True}
    raw = httpx.post(f"{setup.url}/v1/completions", json=body,
                     headers={"authorization": f"Bearer {secret}"})  # fmt: skip
    events = [line[6:] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert '"upstream_error"' in events[-2] and events[-1] == "[DONE]"
    records = setup.usage(secret)
    assert [r["status"] for r in records] == [502, 502]
    assert all(r["completion_tokens"] == 0 for r in records)  # a failed answer costs nothing


def test_a_client_that_disconnects_closes_the_upstream_request(setup: Setup) -> None:
    secret, _ = KeyStore(open_database(setup.db)).create("k")
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 4, "stream": True}
    # the gateway loads the model's tokenizer on its first request: seconds on a busy machine
    with httpx.stream("POST", f"{setup.url}/v1/completions", json=body, headers=headers,
                      timeout=60.0) as r:  # fmt: skip
        first = next(r.iter_lines())
        assert first.startswith("data: ") and '"a"' in first
    # leaving the block closed our connection: the gateway must close the node's at once
    wait_until(lambda: setup.node.closed == ["slow"], 10, what="the streamed upstream closed")
    with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up waiting
        httpx.post(f"{setup.url}/v1/completions", json={**body, "stream": False},
                   headers=headers, timeout=1.0)  # fmt: skip
    wait_until(lambda: setup.node.closed == ["slow", "slow"], 10, what="the upstream closed")
    wait_until(lambda: len(setup.usage(secret)) == 2, 10, what="both requests recorded")
    assert [r["status"] for r in setup.usage(secret)] == [499, 499]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_usage_survives_a_restart_and_held_budget_comes_back(setup: Setup, how: int) -> None:
    store = KeyStore(open_database(setup.db))
    secret, key = store.create("k", budget_tokens=5000)
    client = openai.OpenAI(base_url=f"{setup.url}/v1", api_key=secret, max_retries=0)
    totals = []
    for _ in range(3):
        done = client.completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert done.usage is not None
        totals.append(done.usage.total_tokens)
    wait_until(lambda: len(setup.usage(secret)) == 3, 10, what="the bills written")
    (held,) = [k for k in store.all() if k.id == key.id]
    assert held.reserved_tokens > 0  # the gateway holds part of the budget
    assert setup.proc is not None
    setup.proc.signal(how)
    setup.proc.wait()
    (after_stop,) = [k for k in store.all() if k.id == key.id]
    if how == signal.SIGTERM:  # a clean stop gives the hold back itself
        assert after_stop.reserved_tokens == 0
    setup.start_gateway()  # same database, same gateway name
    (after,) = [k for k in store.all() if k.id == key.id]
    assert after.reserved_tokens == 0 and after.used_tokens == sum(totals)
    records = setup.usage(secret)
    assert [r["prompt_tokens"] + r["completion_tokens"] for r in records] == totals
