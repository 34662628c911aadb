"""A multi-turn run through real processes: a coordinator, an inference node, a verifier and a
trainer on the tiny model play the guessing game. Episodes are sampled turn by turn (the
environment answering each reply), audited by the verifier (every model turn replayed, every
environment turn recomputed), trained on only once audited (``trusted_only``), and shown turn by
turn in the run's rollouts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster
from tests.integration.test_run_commands import bazaar
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(420)


def test_episodes_are_sampled_audited_and_trained(tmp_path: Path, tiny_model: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=2"])
        spec = {"name": "game", "env": {"name": "guess", "args": {"high": 4, "max_turns": 3}},
                "rl": {"max_examples": 400, "prompts_per_lease": 4, "group_size": 4,
                       "max_tokens": 4},
                "diloco": {"inner_steps": 2},
                "verification": {"trusted_only": True}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)
        cluster.start_node("trainer", roles="trainer", extra=model)
        cluster.start_node("sampler", extra=model)
        cluster.start_node("verifier", roles="verifier", extra=model)

        def at_version(v: int) -> bool:
            return bool(cluster.api("GET", "/v1/runs/game")["policy_version"] >= v)

        wait_until(lambda: at_version(2), 360, what="two versions trained on audited episodes")
        verdicts = cluster.api("GET", "/v1/network/verdicts")["data"]
        real = [v for v in verdicts if not v["known_answer"]]
        assert real and all(v["passed"] for v in real), real  # honest episodes pass their audits
        sampler = cluster.nodes()["sampler"]["peer_id"]
        assert any(v["producer"] == sampler for v in real)

        rewards = cluster.api("GET", "/v1/runs/game/rewards")["data"]
        assert rewards and rewards[0]["samples"] >= 16
        url = ["--coordinator-url", cluster.url]
        shown = json.loads(bazaar("run", "rollouts", "game", "-n", "20", "--json", *url).stdout)
        episodes = [s for s in shown if s.get("turns")]
        assert episodes, "no episode was trained on (no group had a reward spread)"
        for s in episodes:
            bys = [t["by"] for t in s["turns"]]
            assert bys[0] == "model" and bys[-1] == "model"
            assert all(a != b for a, b in itertools.pairwise(bys))  # turns alternate
            env_turns = [t["text"] for t in s["turns"] if t["by"] == "environment"]
            assert all(t.startswith("<|user|>") for t in env_turns)
            assert all(("higher" in t or "lower" in t or "Say just a number" in t)
                       for t in env_turns)  # fmt: skip
        table = bazaar("run", "rollouts", "game", "-n", "5", *url)
        assert table.returncode == 0 and "◀ env" in table.stdout
    finally:
        cluster.stop_all()
