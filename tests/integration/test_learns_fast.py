"""The network still learns — in the default suite, under a minute: a coordinator, a sampler and
a trainer as real processes train the demo run (``examples/arith-tiny.toml``: one-digit
additions on the tiny model) for 20 versions, and the reward of the completions the sampler
committed rises by a clear margin. The rewards are read from the sampler's signed payloads,
not from the coordinator's records. The slow tier's ``test_learning.py`` trains longer, with
several trainers, a verifier and a kill -9."""

from __future__ import annotations

import statistics
from pathlib import Path

import msgspec
import pytest

from bazaar.up import DEMO_SPEC
from protocol.runs import load_spec
from tests.integration.cluster import Cluster
from tests.integration.test_learning import rewards_by_version

pytestmark = pytest.mark.timeout(240)
VERSIONS = 20


def test_the_demo_run_raises_the_reward_within_a_minute(cluster: Cluster, tiny_model: Path) -> None:
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    cluster.start_coordinator(extra=["--leases.round_leases=1"])
    spec = load_spec(DEMO_SPEC)
    spec = msgspec.structs.replace(
        spec,
        stop=msgspec.structs.replace(spec.stop, max_rounds=VERSIONS),
        # one sampler alone: nobody else can audit it, so its confirmed rollouts train
        verification=msgspec.structs.replace(spec.verification, trusted_only=False),
    )
    cluster.api("POST", "/v1/runs", json=spec.to_dict())
    sampler = cluster.start_node("sampler", extra=model)
    cluster.start_node("trainer", roles="trainer", extra=model)
    run = cluster.wait_run(spec.name, "completed", timeout_s=150)
    assert run["policy_version"] == VERSIONS

    rewards = rewards_by_version([sampler])
    curve = {v: round(statistics.mean(r), 3) for v, r in sorted(rewards.items())}
    first = statistics.mean(rewards[0])
    # the last three leases, whichever versions they were sampled at (staleness decides)
    recent = [r for v in sorted(rewards)[-3:] for r in rewards[v]]
    assert len(rewards[0]) >= 256 and len(recent) >= 768, curve
    assert sorted(rewards)[-3] > VERSIONS // 2, curve  # late leases, not early ones
    last = statistics.mean(recent)
    print(f"reward by version: {curve}")
    assert last >= first + 0.1, f"reward {first:.3f} -> {last:.3f}: {curve}"
