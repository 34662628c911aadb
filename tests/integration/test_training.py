"""The network improves a model's adapter, round after round: a real coordinator, a trainer node
and an inference node as processes on the tiny model. The inference node samples at version v,
the trainer takes the round (its rollouts fetched from the producer, rewards recomputed), trains,
publishes v+1 (shards served, manifest recorded), the inference node fetches it and samples at
v+1 — and so on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster
from tests.integration.test_run_commands import bazaar
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(300)


def test_versions_advance_through_the_network(tmp_path: Path, tiny_model: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=2"])
        spec = {"name": "r1", "env": {"name": "arith", "args": {"digits": 2}},
                "rl": {"max_examples": 400, "prompts_per_lease": 4, "group_size": 4},
                "diloco": {"inner_steps": 2},
                # no verifier here: train on rollouts the coordinator confirmed, unaudited
                "verification": {"trusted_only": False}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)
        trainer = cluster.start_node("trainer", roles="trainer",
                                     extra=model)  # fmt: skip
        sampler = cluster.start_node("sampler", extra=model)

        def at_version(v: int) -> bool:
            return bool(cluster.api("GET", "/v1/runs/r1")["policy_version"] >= v)

        def sampled_at(v: int) -> bool:
            rollouts = cluster.api("GET", "/v1/runs/r1/rollouts")["data"]
            return any(r["lease"]["policy_version"] >= v for r in rollouts)

        wait_until(lambda: at_version(2), 240, what="two versions trained and published")
        wait_until(lambda: sampled_at(1), 60, what="rollouts sampled at version 1 or later")
        versions = cluster.api("GET", "/v1/runs/r1/versions")["data"]
        assert [v["version"] for v in versions][:2] == [1, 2]
        trainer_id = cluster.nodes()["trainer"]["peer_id"]
        assert all(v["holders"][0] == trainer_id for v in versions)
        held = sampler.home / "adapters" / "r1" / "1" / "adapter_model.safetensors"
        assert held.exists()  # the sampler fetched version 1
        assert trainer.alive() and sampler.alive()

        # what the trainer reported of its rounds: rewards by sampled version, texts, tokens
        rewards = cluster.api("GET", "/v1/runs/r1/rewards")["data"]
        assert rewards[0]["version"] == 0 and rewards[0]["samples"] >= 2 * 4 * 4
        assert all(0.0 <= r["mean"] <= 1.0 for r in rewards)
        assert cluster.api("GET", "/v1/runs/r1")["tokens_trained"] > 0
        url = ["--coordinator-url", cluster.url]
        status = bazaar("run", "status", "r1", *url)
        assert status.returncode == 0 and "reward curve" in status.stdout
        best = json.loads(
            bazaar("run", "rollouts", "r1", "--best", "-n", "5", "--json", *url).stdout
        )
        assert best and [x["reward"] for x in best] == sorted(
            (x["reward"] for x in best), reverse=True
        )
        assert all(x["prompt"] and "+" in x["prompt"] for x in best)
        png = tmp_path / "reward.png"
        plotted = bazaar("run", "plot", "r1", "-o", str(png), *url)
        assert plotted.returncode == 0, plotted.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # the run is billed to the key that submitted it, and the books balance exactly
        done = bazaar("ledger", "--run", "r1", "--json", *url)
        assert done.returncode == 0, done.stdout + done.stderr
        books = json.loads(done.stdout)
        (bill,) = books["runs"]
        assert bill["owner"] == "researcher" and bill["charged_sampled"] > 0
        assert bill["reconciled"] and bill["charged"] == bill["recounted"] == bill["key_usage"]
        assert books["reconciled"] and books["balance_sum"] == 0
        assert books["balances"][f"node:{trainer_id}"] > 0  # the trainer earned
        sampler_id = cluster.nodes()["sampler"]["peer_id"]
        assert books["balances"][f"node:{sampler_id}"] >= bill["charged_sampled"]
        (researcher,) = [k for k in cluster.accounts().all() if k.name == "researcher"]
        assert researcher.used_tokens >= bill["charged"]  # the key paid (later rounds too)
        table = bazaar("ledger", *url)
        assert "reconciled" in table.stdout and "researcher" in table.stdout
    finally:
        cluster.stop_all()


def test_a_round_without_learning_signal_still_makes_a_version(
    tmp_path: Path, tiny_model: Path
) -> None:
    """One byte cannot spell a reversed word of three letters or more, so every completion
    scores 0 and no group has a reward spread (a sum of numbers below 100 could: 3 + 4 is
    one): each round's version takes no inner step, and the run goes on to its stop (it used
    to stall at its first such round, its trainer asking again without pause)."""
    cluster = Cluster(tmp_path, interval_s=1.0)
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=1"])
        spec = {"name": "flat", "env": {"name": "reverse", "args": {"min_len": 3}},
                "rl": {"prompts_per_lease": 4, "group_size": 4, "max_tokens": 1},
                "stop": {"max_rounds": 3}, "verification": {"trusted_only": False}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)
        trainer = cluster.start_node("trainer", roles="trainer", extra=model)
        cluster.start_node("sampler", extra=model)

        run = cluster.wait_run("flat", "completed", timeout_s=240)
        assert run["stop_reason"] == "max_rounds"
        assert run["policy_version"] == 3
        rewards = cluster.api("GET", "/v1/runs/flat/rewards")["data"]
        assert rewards and all(r["mean"] == 0.0 for r in rewards)
        assert trainer.output().count("no learning signal") == 3
        books = cluster.api("GET", "/v1/ledger", params={"run": "flat"})
        (bill,) = books["runs"]
        # what was dealt is billed as trained (a trainer's word on what it used is not taken)
        assert bill["charged_trained"] == bill["charged_sampled"] > 0
        assert bill["reconciled"] and bill["recounted_sampled"] == bill["charged_sampled"]
    finally:
        cluster.stop_all()
