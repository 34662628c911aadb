"""Trainers under attack, with real processes: a version is made only by the trainers its round
was dealt to, all signing the same manifest, each having committed to its part before the
all-reduce; verifiers replay trainers' rounds, and a trainer whose replay fails is banned and
its run rolled back to before its first round no replay confirmed.

- Two trainers all-reduce a round; one publishes an adapter it poisoned (``PoisonsAdapter``).
  Their manifests conflict, so no version is made; the replays of both rounds, each against the
  manifest its trainer signed, show which one is not the step the committed parts make: the
  poisoner is banned, the honest trainer makes every version, and its replays pass.
- Lone cheating trainers, one after another on one network: it skips its inner steps
  (``SkipsInnerSteps``), puts its part in three times over (``ScalesItsPart``), trains on
  rollouts it was not dealt (``TrainsOnRolloutsNotDealt``), publishes a poisoned adapter alone
  (``PoisonsAdapter``). Each makes versions (nobody else trains), is caught by the replays of
  its first rounds (new trainers are replayed every round), banned, and every version it made
  is withdrawn: the run is back where it was, the nodes drop those versions. Then an honest
  trainer finishes the run, every replay of it passing.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

CHEATS = "tests.adversarial.cheating_node"
RUN = {
    "name": "r", "env": {"name": "arith", "args": {"digits": 1}},
    "rl": {"prompts_per_lease": 2, "group_size": 4, "max_tokens": 8},
    "diloco": {"inner_steps": 2},
}  # fmt: skip


def network(cluster: Cluster, tiny_model: Path, max_rounds: int) -> list[str]:
    """A coordinator, a run, a sampler that also verifies and a second verifier (a failed
    replay is confirmed by another verifier); the model flags for more nodes."""
    cluster.start_coordinator(extra=["--leases.round_leases=1", "--audits.trusted_after=0"])
    cluster.api("POST", "/v1/runs", json={**RUN, "stop": {"max_rounds": max_rounds}})
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    cluster.start_node("sampler", roles="inference,verifier", extra=model)
    cluster.start_node("verifier", roles="verifier", extra=model)
    return model


def banned(cluster: Cluster, name: str) -> bool:
    node = cluster.nodes().get(name)
    return bool(node and node["trust"]["banned"])


def live(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [v for v in versions if not v["revoked"]]


def replays_of(cluster: Cluster, peer: str) -> list[dict[str, Any]]:
    return [r for r in cluster.api("GET", "/v1/runs/r/replays")["data"] if r["trainer"] == peer]


@pytest.mark.timeout(600)
def test_of_two_trainers_in_conflict_the_replays_ban_the_poisoner(
    cluster: Cluster, tiny_model: Path
) -> None:
    model = network(cluster, tiny_model, max_rounds=3)
    cluster.start_node("trainer", roles="trainer", extra=model)
    cluster.start_node("poisoner", roles="trainer", extra=model, module=CHEATS,
                       env={"BAZAAR_CHEAT": "PoisonsAdapter"})  # fmt: skip
    wait_until(lambda: banned(cluster, "poisoner"), 360, every_s=1, what="the poisoner banned")
    run = cluster.wait_run("r", "completed", timeout_s=300)
    assert run["stop_reason"] == "max_rounds"
    nodes = cluster.nodes()
    honest, bad = nodes["trainer"]["peer_id"], nodes["poisoner"]["peer_id"]
    versions = live(cluster.api("GET", "/v1/runs/r/versions")["data"])
    assert len(versions) == 3 and all(v["holders"] == [honest] for v in versions)
    failed = [r for r in replays_of(cluster, bad) if r["status"] == "failed"]
    assert failed and failed[0]["verdicts"][-1]["failed_check"] == "version_sum"
    assert all(r["status"] != "failed" for r in replays_of(cluster, honest))
    assert not nodes["trainer"]["trust"]["banned"] and nodes["trainer"]["trust"]["strikes"] == 0


LONE_CHEATS = [
    ("SkipsInnerSteps", "part_replay"),
    ("ScalesItsPart", "part_replay"),
    ("TrainsOnRolloutsNotDealt", "part_replay"),
    ("PoisonsAdapter", "version_sum"),
]


@pytest.mark.timeout(900)
def test_lone_cheating_trainers_are_caught_banned_and_rolled_back(
    cluster: Cluster, tiny_model: Path
) -> None:
    model = network(cluster, tiny_model, max_rounds=4)
    for cheat, check in LONE_CHEATS:
        cheater = cluster.start_node(cheat, roles="trainer", extra=model, module=CHEATS,
                                     env={"BAZAAR_CHEAT": cheat})  # fmt: skip
        wait_until(lambda c=cheat: banned(cluster, c), 240, every_s=1, what=f"{cheat} banned")
        peer = cluster.nodes()[cheat]["peer_id"]
        failed = [r for r in replays_of(cluster, peer) if r["status"] == "failed"]
        assert failed and {v["failed_check"] for v in failed[0]["verdicts"]} == {check}, failed
        versions = cluster.api("GET", "/v1/runs/r/versions")["data"]
        assert all(peer not in v["holders"] for v in live(versions)), versions  # withdrawn
        assert cluster.api("GET", "/v1/runs/r")["policy_version"] == 0  # back where it was
        cheater.signal(signal.SIGTERM)
        assert cheater.wait(30) == 0

    honest = cluster.start_node("honest", roles="trainer", extra=model)
    run = cluster.wait_run("r", "completed", timeout_s=300)
    assert run["stop_reason"] == "max_rounds"
    me = cluster.nodes()["honest"]["peer_id"]
    versions = cluster.api("GET", "/v1/runs/r/versions")["data"]
    assert [v["holders"] for v in live(versions)] == [[me]] * 4
    mine = replays_of(cluster, me)
    assert len([r for r in mine if r["status"] == "passed"]) >= 2  # new: every round replayed
    assert all(r["status"] != "failed" for r in mine)
    revoked = {v["version"] for v in versions if v["revoked"]}
    assert len(revoked) >= len(LONE_CHEATS)  # each cheater made at least one version

    def sampler_dropped_them() -> bool:
        held = cluster.root / "home-sampler" / "adapters" / "r"
        return held.is_dir() and not revoked & {int(p.name) for p in held.iterdir()
                                                if p.name.isdigit()}  # fmt: skip

    wait_until(sampler_dropped_them, 60, what="the sampler drops the withdrawn versions")
    assert not banned(cluster, "honest") and honest.alive()
