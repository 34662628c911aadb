"""The network improves a model: a coordinator, three trainers, two inference nodes and a
verifier, all real processes on the tiny model, train a LoRA adapter on one-digit additions
(which the tiny model, warm-started on two-digit ones, mostly gets wrong) — and the reward of
the rollouts rises by a clear margin, version after version.

Faults on the way: one of the three trainers is killed (SIGKILL) once training is under way, and
the run goes on with the other two; a fourth trainer joins late, takes the published version,
and from then on its results match the others' bit for bit (the coordinator counts it as a
holder of the versions it helped make: their manifests are identical).

Rewards are read from the payloads the inference nodes committed (each sample carries the
producer's claimed reward; the verifier checks claims, and these producers are honest).
"""

from __future__ import annotations

import signal
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from protocol.envelope import open_envelope
from protocol.rollouts import RolloutPayload
from tests.integration.cluster import Cluster, Proc
from tests.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def rewards_by_version(samplers: list[Proc]) -> dict[int, list[float]]:
    """Every committed sample's reward, by the adapter version it was sampled at."""
    out: dict[int, list[float]] = defaultdict(list)
    for proc in samplers:
        for path in (proc.home / "payloads").glob("*/*"):
            payload = open_envelope(path.read_bytes(), None).message
            assert isinstance(payload, RolloutPayload)
            out[payload.policy_version] += [s.reward for s in payload.samples]
    return out


def test_the_network_raises_the_reward(tmp_path: Path, tiny_model: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    train = model
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=1", "--audits.floor_rate=0.2"])
        spec = {"name": "add1", "env": {"name": "arith", "args": {"digits": 1}, "seed": 3},
                "rl": {"prompts_per_lease": 16, "group_size": 8, "temperature": 1.0,
                       "max_tokens": 8},
                "diloco": {"inner_steps": 4, "inner_lr": 1e-3}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)
        trainers = [cluster.start_node(f"trainer-{i}", roles="trainer", extra=train)
                    for i in (1, 2, 3)]  # fmt: skip
        samplers = [cluster.start_node(f"sampler-{i}", extra=model) for i in (1, 2)]
        cluster.start_node("verifier", roles="verifier", extra=model)

        def version() -> int:
            return int(cluster.api("GET", "/v1/runs/add1")["policy_version"])

        wait_until(lambda: version() >= 2, 600, what="two versions from three trainers")
        trainers[2].signal(signal.SIGKILL)
        killed_at = version()
        wait_until(lambda: version() >= killed_at + 3, 600, what="rounds after a kill -9")
        late = cluster.start_node("trainer-4", roles="trainer", extra=train)
        late_id = wait_until(lambda: cluster.nodes().get("trainer-4", {}).get("peer_id"), 60)
        joined_at = version()
        target = max(joined_at + 4, 18)
        wait_until(lambda: version() >= target, 900, what=f"version {target}")

        versions = cluster.api("GET", "/v1/runs/add1/versions")["data"]
        assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
        shared = [v["version"] for v in versions if len(v["holders"]) >= 2]
        assert len(shared) >= 0.75 * len(versions), f"versions with 2+ identical makers: {shared}"
        late_holds = [v["version"] for v in versions if late_id in v["holders"]]
        assert late_holds, "the late trainer never matched the others bit for bit"
        assert all(t.alive() for t in (*trainers[:2], late, *samplers))

        rewards = rewards_by_version(samplers)
        first = statistics.mean(rewards[0])
        recent = [r for v in range(target - 3, target + 1) for r in rewards.get(v, [])]
        last = statistics.mean(recent)
        curve = {v: round(statistics.mean(r), 3) for v, r in sorted(rewards.items())}
        print(f"reward by version: {curve}")
        assert len(rewards[0]) >= 128 and len(recent) >= 128
        assert last >= first + 0.15, f"reward {first:.3f} -> {last:.3f}: {curve}"

        # rollouts were audited (at the versions they were sampled at) and none failed
        assert cluster.metric("bazaar_verdicts_total", 'outcome="recorded"') >= 1
        assert cluster.metric("bazaar_verdicts_total", 'outcome="confirmed_failure"') == 0
    finally:
        cluster.stop_all()
