"""Audits end to end, with real processes: a cheating inference node is audited, its failure is
confirmed by a second independent verifier, and it is penalized — its rollout rejected, its
unaudited work quarantined and redone by an honest node, its credit forfeited, and (with
``max_strikes = 1``) banned. Honest work passes its audits. Every verdict is stored signed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.envelope import open_envelope
from protocol.verification import Verdict
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, interval_s=1.0)
    yield c
    c.stop_all()


def test_a_cheater_is_caught_confirmed_penalized_and_banned(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator(
        extra=["--audits.trusted_after=1000", "--audits.max_strikes=1", "--audits.deadline_s=60"]
    )
    cluster.api("POST", "/v1/runs", json={
        "run_id": "r", "total_examples": 16, "prompts_per_lease": 4, "group_size": 4,
        "sampling": {"max_tokens": 12},
    })  # fmt: skip
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    cheater = cluster.start_node("cheater", extra=model, module="tests.adversarial.cheating_node")

    def cheater_delivered() -> bool:
        peers = {n["name"]: n["peer_id"] for n in cluster.nodes().values()}
        rollouts = cluster.api("GET", "/v1/runs/r/rollouts")["data"]
        return any(r["producer"] == peers.get("cheater") for r in rollouts)

    wait_until(cheater_delivered, 120, what="a rollout from the cheater")
    for name in ("verifier-1", "verifier-2"):
        cluster.start_node(name, roles="verifier", extra=model)
    cluster.start_node("honest", extra=model)

    def settled() -> bool:
        # the cheater may finish the run before any audit lands: its penalty reopens it
        nodes = cluster.nodes()
        if "honest" not in nodes or not nodes["cheater"]["trust"]["banned"]:
            return False
        rollouts = cluster.api("GET", "/v1/runs/r/rollouts")["data"]
        producers = {r["producer"] for r in rollouts}
        done = cluster.api("GET", "/v1/runs/r")["state"] == "completed"
        return done and producers == {nodes["honest"]["peer_id"]}

    wait_until(settled, 240, every_s=0.5, what="cheater banned and the run redone honestly")
    run = cluster.api("GET", "/v1/runs/r")
    nodes = cluster.nodes()
    cheater_id, honest_id = nodes["cheater"]["peer_id"], nodes["honest"]["peer_id"]

    # the cheater: caught, confirmed, penalized, banned; nothing of it is left in the run
    t = nodes["cheater"]["trust"]
    assert t["strikes"] == 1 and t["banned"] and t["failed"] == 1 and t["reputation"] < 1
    assert t["forfeited_tokens"] > 0
    rollouts = cluster.api("GET", "/v1/runs/r/rollouts")["data"]
    assert {r["producer"] for r in rollouts} == {honest_id}
    assert run["examples_delivered"] == 16
    wait_until(lambda: "banned after 1 confirmed" in cheater.output(), 30, what="ban seen")

    # two failed verdicts from two different verifiers, both naming the check, both signed
    verdicts = cluster.api("GET", "/v1/network/verdicts")["data"]
    against = [v for v in verdicts if v["producer"] == cheater_id and not v["passed"]]
    confirmed = [v for v in against if v["audit_status"] == "failed"]
    assert len(confirmed) == 2, against
    assert {v["failed_check"] for v in confirmed} == {"logprobs"}
    assert confirmed[0]["verifier"] != confirmed[1]["verifier"]
    assert {v["verifier_name"] for v in confirmed} == {"verifier-1", "verifier-2"}
    for v in verdicts:
        env = open_envelope(bytes.fromhex(v["signed_frame"]), None)
        assert env.sender == v["verifier"] and isinstance(env.message, Verdict)
        assert env.message.passed == v["passed"]

    # honest work passed every audit it had
    honest = [v for v in verdicts if v["producer"] == honest_id]
    assert honest and all(v["passed"] for v in honest)
    assert nodes["honest"]["trust"]["failed"] == 0

    # and the operator sees it
    table = subprocess.run(
        [sys.executable, "-m", "bazaar", "network", "status", "--coordinator-url", cluster.url],
        capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "250"},
    ).stdout  # fmt: skip
    assert "banned" in table and "failed logprobs" in table
