"""Trainers under attack, with real processes: a version is made only by the trainers its round
was dealt to, all signing the same manifest, each having committed to its part before the
all-reduce; verifiers replay trainers' rounds, and a trainer whose replay fails is banned and
its run rolled back to before its first round no replay confirmed.

- Three trainers all-reduce a round; one publishes an adapter it poisoned (``PoisonsAdapter``),
  or puts its part into the all-reduce threefold while committing to the honest one and signs
  what the all-reduce gave (``TampersAllReduce``: the honest trainers find the all-reduce is
  not the sum of the committed parts and sign those parts' step instead). The manifests
  conflict, so no version is made; the replays of every round, each against the manifest its
  trainer signed, show which one is not the step the committed parts make: the cheat is
  banned, the two honest trainers make every version, and their replays pass. (A round with
  no learning signal leaves every part zero, and tripled zero is zero: the all-reducing
  cheat signs that version with them, and its replay confirms it — no cheat happened.)
- Lone cheating trainers, one after another on one network: it skips its inner steps
  (``SkipsInnerSteps``), puts its part in three times over (``ScalesItsPart``), trains on
  rollouts it was not dealt (``TrainsOnRolloutsNotDealt``), publishes a poisoned adapter alone
  (``PoisonsAdapter``). Each makes versions (nobody else trains), is caught by the replays of
  its first rounds (new trainers are replayed every round), banned, and every version it made
  after its first round no replay confirmed is withdrawn (a run completed on them runs again):
  the nodes drop those versions. Then an honest trainer finishes the run, every replay of it
  passing.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

CHEATS = "tests.adversarial.cheating_node"
RUN = {
    "name": "r", "env": {"name": "arith", "args": {"digits": 1}},
    "rl": {"prompts_per_lease": 8, "group_size": 4, "max_tokens": 8},
    "diloco": {"inner_steps": 2},
}  # fmt: skip


def network(cluster: Cluster, tiny_model: Path, max_rounds: int) -> list[str]:
    """A coordinator, a run, a sampler that also verifies and a second verifier (a failed
    replay is confirmed by another verifier); the model flags for more nodes. Eight prompts a
    lease: a round whose groups all scored alike takes no inner step, and a cheat on nothing
    is no cheat — with eight, nearly every round has something to train on."""
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


def decided_replays(cluster: Cluster, peer: str) -> list[dict[str, Any]]:
    """The replays of ``peer``'s rounds, once none is waiting for a verifier."""

    def decided() -> list[dict[str, Any]] | None:
        mine = replays_of(cluster, peer)
        return mine if all(r["status"] in ("passed", "failed", "cancelled") for r in mine) else None

    return wait_until(decided, 120, every_s=1, what=f"the replays of {peer} decided")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cheat", ["PoisonsAdapter", "TampersAllReduce"])
def test_of_trainers_in_conflict_the_replays_ban_the_poisoner(
    cluster: Cluster, tiny_model: Path, cheat: str
) -> None:
    model = network(cluster, tiny_model, max_rounds=3)
    for name in ("trainer-a", "trainer-b"):
        cluster.start_node(name, roles="trainer", extra=model)
    cluster.start_node("poisoner", roles="trainer", extra=model, module=CHEATS,
                       env={"BAZAAR_CHEAT": cheat})  # fmt: skip
    wait_until(lambda: banned(cluster, "poisoner"), 360, every_s=1, what="the poisoner banned")
    run = cluster.wait_run("r", "completed", timeout_s=300)
    assert run["stop_reason"] == "max_rounds"
    nodes = cluster.nodes()
    honest = {nodes[n]["peer_id"] for n in ("trainer-a", "trainer-b")}
    bad = nodes["poisoner"]["peer_id"]
    versions = live(cluster.api("GET", "/v1/runs/r/versions")["data"])
    assert len(versions) == 3 and all(set(v["holders"]) - {bad} == honest for v in versions)
    # the cheat co-signs a version only where its cheat changed nothing (a round without
    # learning signal: its part is zero, and three times zero is zero): a replay confirmed it
    confirmed = {r["made"] for r in replays_of(cluster, bad) if r["status"] == "passed"}
    assert all(v["version"] in confirmed for v in versions if bad in v["holders"]), versions
    failed = [r for r in replays_of(cluster, bad) if r["status"] == "failed"]
    assert failed and failed[0]["verdicts"][-1]["failed_check"] == "version_sum"
    for peer in honest:  # new trainers: every round of theirs is replayed, and passes
        mine = decided_replays(cluster, peer)
        assert mine and all(r["status"] == "passed" for r in mine), mine
    for n in ("trainer-a", "trainer-b"):
        assert not nodes[n]["trust"]["banned"] and nodes[n]["trust"]["strikes"] == 0


PART = {"part_replay"}
LONE_CHEATS = [
    ("SkipsInnerSteps", PART),
    ("ScalesItsPart", PART),
    ("TrainsOnRolloutsNotDealt", PART),
    ("PoisonsAdapter", {"version_sum"}),
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
        assert failed and {v["failed_check"] for v in failed[0]["verdicts"]} <= check, failed
        versions = cluster.api("GET", "/v1/runs/r/versions")["data"]
        # every version of its left is one a replay confirmed (a round without learning
        # signal takes no inner step: skipping them is no cheat); the run is at the last
        confirmed = {r["made"] for r in replays_of(cluster, peer) if r["status"] == "passed"}
        left = [v for v in live(versions) if peer in v["holders"]]
        assert all(v["version"] in confirmed for v in left), versions
        assert any(v["revoked"] and peer in v["holders"] for v in versions)  # it made some
        current = max([0, *(v["version"] for v in live(versions))])
        assert cluster.api("GET", "/v1/runs/r")["policy_version"] == current
        cheater.signal(signal.SIGTERM)
        assert cheater.wait(30) == 0

    joined = time.time()
    honest = cluster.start_node("honest", roles="trainer", extra=model)
    run = cluster.wait_run("r", "completed", timeout_s=300)
    assert run["stop_reason"] == "max_rounds"
    me = cluster.nodes()["honest"]["peer_id"]
    versions = cluster.api("GET", "/v1/runs/r/versions")["data"]
    assert len(live(versions)) == 4
    assert all(v["holders"] == [me] for v in live(versions) if v["created_at"] > joined)
    mine = decided_replays(cluster, me)  # new: every round of it is replayed
    assert len(mine) >= 2 and all(r["status"] == "passed" for r in mine), mine
    revoked = {v["version"] for v in versions if v["revoked"]}

    def sampler_dropped_them() -> bool:
        held = cluster.root / "home-sampler" / "adapters" / "r"
        return held.is_dir() and not revoked & {int(p.name) for p in held.iterdir()
                                                if p.name.isdigit()}  # fmt: skip

    wait_until(sampler_dropped_them, 60, what="the sampler drops the withdrawn versions")
    assert not banned(cluster, "honest") and honest.alive()
