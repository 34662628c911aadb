"""Trainers under attack, with real processes: only the trainers a round is dealt to make its
version, and only by all signing the same manifest.

- Two trainers all-reduce a round; one publishes an adapter it poisoned (its LoRA weights
  scaled tenfold, ``PoisonsAdapter``). Their manifests differ, so neither makes the version:
  the round is trained again, again and again; the poisoned adapter never becomes a version,
  so no node samples or serves it. Once the poisoner is gone, the honest trainer alone makes
  every version. (Telling which of two disagreeing trainers lied takes a replay of their
  round; until that exists the poisoner stalls the run but cannot move the model.)
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(420)

CHEATS = "tests.adversarial.cheating_node"


def test_a_poisoned_adapter_from_one_of_two_trainers_never_becomes_a_version(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator(extra=["--leases.round_leases=1", "--audits.trusted_after=0"])
    cluster.api("POST", "/v1/runs", json={
        "name": "r", "env": {"name": "arith", "args": {"digits": 1}},
        "rl": {"prompts_per_lease": 2, "group_size": 4, "max_tokens": 8},
        "diloco": {"inner_steps": 1}, "stop": {"max_rounds": 3},
    })  # fmt: skip
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    cluster.start_node("sampler", extra=model)
    cluster.start_node("trainer", roles="trainer", extra=model)
    poisoner = cluster.start_node("poisoner", roles="trainer", extra=model, module=CHEATS,
                                  env={"BAZAAR_CHEAT": "PoisonsAdapter"})  # fmt: skip
    coordinator = cluster.coordinator
    assert coordinator is not None

    def conflicts() -> int:
        return coordinator.output().count("signed different manifests")

    wait_until(lambda: conflicts() >= 2, 300, every_s=0.5, what="two rounds in conflict")
    assert cluster.api("GET", "/v1/runs/r")["policy_version"] == 0
    assert cluster.api("GET", "/v1/runs/r/versions")["data"] == []  # nothing was made

    poisoner.signal(signal.SIGTERM)  # it leaves: the round is the honest trainer's alone
    assert poisoner.wait(30) == 0
    run = cluster.wait_run("r", "completed", timeout_s=240)
    assert run["stop_reason"] == "max_rounds"
    nodes = cluster.nodes()
    honest, bad = nodes["trainer"]["peer_id"], nodes["poisoner"]["peer_id"]
    versions = cluster.api("GET", "/v1/runs/r/versions")["data"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert all(v["holders"][0] == honest and bad not in v["holders"] for v in versions)
    # no trainer was struck for a conflict: which one lied is not known from this alone
    assert nodes["trainer"]["trust"]["strikes"] == 0
