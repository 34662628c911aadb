"""Rollouts end to end with real processes and the real tiny model.

A run is created over the REST API; inference nodes lease its examples, generate with seeded
sampling, keep payloads and submit receipts. A consumer then fetches every counted payload from
its producer over py-libp2p, checks it is exactly what the lease asked for, re-scores it with the
environment, and replays sampling with the same seeds: the same tokens and logprobs. A node
killed while holding a lease loses it to another node when it expires.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from envs import load_environment
from node.model.backends import Sampling
from node.model.backends.torch_backend import TorchBackend
from protocol.leases import Lease
from protocol.payloads import fetch_payload
from protocol.rollouts import RolloutPayload
from tests.integration.cluster import Cluster
from tests.integration.peer import peer
from tests.wait import wait_until
from verification.rollouts import (
    check_shape,
    lease_examples,
    prompt_ids,
    sample_seeds,
    sample_tokens,
    score_rollouts,
)

pytestmark = pytest.mark.timeout(300)


def node_args(tiny_model: Path) -> list[str]:
    # the session's tiny model lives in <data dir>/models/<name>: share that data dir
    return [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]


def as_lease(view: dict[str, Any]) -> Lease:
    return msgspec.convert({**view, "lease_seed": bytes.fromhex(view["lease_seed"])}, Lease)


async def fetch_all(cluster: Cluster, rollouts: list[dict[str, Any]]) -> list[RolloutPayload]:
    payloads = []
    async with peer(cluster.multiaddr) as consumer:
        for r in rollouts:
            await consumer.host.connect(r["producer_addrs"][0])
            env = await fetch_payload(
                consumer.host, consumer.identity, r["producer"], bytes.fromhex(r["payload_hash"])
            )
            assert isinstance(env.message, RolloutPayload)
            payloads.append(env.message)
    return payloads


def test_a_run_is_rolled_out_fetched_rescored_and_replayed(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator()
    spec = {"name": "r1", "env": {"name": "arith", "args": {"digits": 2}},
            "rl": {"max_examples": 8, "prompts_per_lease": 4, "group_size": 4,
                   "max_tokens": 12}}  # fmt: skip
    cluster.api("POST", "/v1/runs", json=spec)
    cluster.start_node("gen", extra=node_args(tiny_model))
    cluster.wait_run("r1", timeout_s=180)

    def recounted() -> dict[str, Any] | None:  # the coordinator confirms payloads as it fetches
        state = cluster.api("GET", "/v1/runs/r1")
        return state if state["unconfirmed_tokens"] == 0 else None

    run = wait_until(recounted, 60, every_s=0.5, what="every payload recounted")
    assert run["examples_delivered"] == 8 and run["active_leases"] == 0
    rollouts = cluster.api("GET", "/v1/runs/r1/rollouts")["data"]
    assert sorted(i for r in rollouts for i in r["counted_examples"]) == list(range(8))
    producer = cluster.nodes()["gen"]["peer_id"]
    assert {r["producer"] for r in rollouts} == {producer}

    payloads = trio.run(fetch_all, cluster, rollouts)
    env = load_environment("arith", digits=2)
    backend = TorchBackend.from_pretrained(str(tiny_model))
    total_tokens = 0
    for r, payload in zip(rollouts, payloads, strict=True):
        lease = as_lease(r["lease"])
        check_shape(lease, payload)
        groups = score_rollouts(env, backend.tokenizer, lease, payload)
        assert len(groups) == 4 and all(len(g) == 4 for g in groups)
        assert all(s.reward in (0.0, 1.0) for g in groups for s in g)
        # replay: same prompts, the seeds the lease dictates -> the very same samples
        prompts = [prompt_ids(backend.tokenizer, ex.prompt) for ex in lease_examples(env, lease)
                   for _ in range(lease.group_size)]  # fmt: skip
        again = backend.generate(prompts, sample_seeds(lease), Sampling(max_tokens=12))
        for sample, gen in zip(payload.samples, again, strict=True):
            tokens, logprobs = sample_tokens(sample)
            assert tokens.tolist() == gen.token_ids and sample.finish_reason == gen.finish_reason
            assert max(abs(a - b) for a, b in zip(logprobs, gen.logprobs, strict=True)) < 1e-5
            total_tokens += len(tokens)
    assert run["completion_tokens"] == total_tokens == sum(r["completion_tokens"] for r in rollouts)

    # the coordinator restarts: the run, its leases and receipts come back from the database
    assert cluster.coordinator is not None
    cluster.coordinator.signal(signal.SIGTERM)
    assert cluster.coordinator.wait() == 0
    cluster.start_coordinator()
    assert cluster.api("GET", "/v1/runs/r1") == run
    assert cluster.api("GET", "/v1/runs/r1/rollouts")["data"] == rollouts


def test_a_killed_nodes_lease_is_reissued_and_completed_by_another(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator()
    spec = {"name": "r2", "rl": {"max_examples": 8, "prompts_per_lease": 4, "lease_ttl_s": 3,
                                 "group_size": 4, "max_tokens": 8}}  # fmt: skip
    cluster.api("POST", "/v1/runs", json=spec)
    staller = cluster.start_node(
        "staller", extra=node_args(tiny_model), module="tests.integration.stalling_node"
    )
    wait_until(lambda: "stalling on lease" in staller.output(), 120, what="a lease taken")
    stalled = staller.output().split("stalling on lease ")[1].split()[0]
    assert cluster.api("GET", "/v1/runs/r2")["active_leases"] >= 1  # it may prefetch a second
    staller.signal(signal.SIGKILL)

    cluster.start_node("honest", extra=node_args(tiny_model))
    run = cluster.wait_run("r2", timeout_s=180)
    assert run["examples_delivered"] == 8
    rollouts = cluster.api("GET", "/v1/runs/r2/rollouts")["data"]
    honest = cluster.nodes()["honest"]["peer_id"]
    assert {r["producer"] for r in rollouts} == {honest}
    assert stalled not in {r["lease_id"] for r in rollouts}
    assert sorted(i for r in rollouts for i in r["counted_examples"]) == list(range(8))
    assert cluster.metric("bazaar_leases_expired_total") >= 1
    payloads = trio.run(fetch_all, cluster, rollouts)
    assert sum(len(p.samples) for p in payloads) == 8 * 4
