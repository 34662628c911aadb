"""Metering under attack, with real processes: nothing a node claims is billed until the
coordinator confirmed it in the payloads themselves.

- A producer that inflates its receipts — after a few honest leases, trained and paid for — is
  convicted on its own signed payload (``token_count``), banned, and every token it was paid
  for its unaudited work goes back to the researcher's key; the run redoes those examples.
- A trainer that reports perfect rewards (to trip ``target_reward``) and ten times the tokens it
  trained on is not paid for its round, and struck; the run stops on the rewards the
  coordinator recomputed, never on a trainer's.
- Through it all the ledger reconciles against the kept payloads, counted again, and the key's
  usage equals the charges less the refunds. Honest nodes are never penalized.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(420)

CHEATS = "tests.adversarial.cheating_node"


def test_inflated_receipts_and_lying_trainers_are_caught_and_refunded(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator(extra=[
        f"--tokenizers.tiny={tiny_model}", "--leases.round_leases=1", "--audits.max_strikes=1",
        # no audits: every producer trusted at once, so unaudited work trains and is paid —
        # what a cheat caught later must give back
        "--audits.trusted_after=0", "--audits.floor_rate=0",
    ])  # fmt: skip
    cluster.api("POST", "/v1/runs", json={
        "name": "r", "env": {"name": "arith", "args": {"digits": 1}},
        "rl": {"prompts_per_lease": 2, "group_size": 4, "max_tokens": 8},
        "diloco": {"inner_steps": 1},
        "stop": {"max_rounds": 5, "target_reward": 0.99, "min_samples": 8},
    })  # fmt: skip
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    inflater = cluster.start_node("inflater", extra=model, module=CHEATS,
                                  env={"BAZAAR_CHEAT": "InflatesReceipts",
                                       "BAZAAR_CHEAT_FROM": "2"})  # fmt: skip
    cluster.start_node("trainer", roles="trainer", extra=model)
    cluster.start_node("liar", roles="trainer", extra=model, module=CHEATS,
                       env={"BAZAAR_CHEAT": "LiesInReports"})  # fmt: skip

    def banned(name: str) -> bool:
        node = cluster.nodes().get(name)
        return bool(node and node["trust"]["banned"])

    wait_until(lambda: banned("inflater") and banned("liar"), 240, every_s=0.5,
               what="the inflating producer and the lying trainer banned")  # fmt: skip
    cluster.start_node("honest", extra=model)  # redoes what the inflater's count lost
    run = cluster.wait_run("r", "completed", timeout_s=240)
    assert run["stop_reason"] == "max_rounds"  # never the liar's perfect rewards
    assert all(r["mean"] < 0.99 for r in cluster.api("GET", "/v1/runs/r/rewards")["data"])
    nodes = cluster.nodes()
    ids = {name: n["peer_id"] for name, n in nodes.items()}

    # convicted by the coordinator on its own signed payload
    verdicts = cluster.api("GET", "/v1/network/verdicts")["data"]
    against = [v for v in verdicts if v["producer"] == ids["inflater"]]
    assert against and {v["failed_check"] for v in against} == {"token_count"}
    assert {v["verifier"] for v in against} == {cluster.peer_id}
    assert "claims" in against[0]["detail"]

    books = cluster.api("GET", "/v1/ledger", params={"run": "r"})
    entries = books["entries"]
    paid = sum(e["tokens"] for e in entries
               if e["kind"] == "sampled" and e["credit"] == f"node:{ids['inflater']}")  # fmt: skip
    refunded = [e for e in entries if e["kind"] == "refund"]
    # its honest leases were trained and paid before it cheated: all of it went back
    assert paid > 0 and sum(e["tokens"] for e in refunded) == paid
    assert {(e["debit"], e["credit"]) for e in refunded} == {
        (f"node:{ids['inflater']}", "key:researcher")
    }
    assert books["balances"][f"node:{ids['inflater']}"] == 0
    # the liar was not paid for training; the honest trainer was
    assert f"node:{ids['liar']}" not in books["balances"]
    assert books["balances"][f"node:{ids['trainer']}"] > 0
    (bill,) = books["runs"]
    assert bill["reconciled"] and books["reconciled"] and books["balance_sum"] == 0
    assert bill["charged_sampled"] == bill["recounted_sampled"] > 0
    assert bill["refunded"] == paid and bill["key_usage"] == bill["charged"] - paid
    assert bill["disputed_by_trainers"]  # the liar's counts are on record
    assert run["refunded_tokens"] == paid

    # honest nodes: never penalized
    for name in ("trainer", "honest"):
        assert nodes[name]["trust"]["strikes"] == 0 and not nodes[name]["trust"]["banned"]
    assert nodes["liar"]["trust"]["strikes"] == 1
    wait_until(lambda: "banned after 1" in inflater.output(), 30, what="the inflater told")


def test_a_coordinator_killed_between_hold_and_settle_holds_again_first(
    cluster: Cluster, tiny_model: Path
) -> None:
    """kill -9 while a round holds part of the key's budget: the restarted coordinator holds
    the open round again before it answers anyone, so the key's reserved tokens always match
    what its runs may still charge, and at the end every hold is given back and the books
    reconcile."""
    cluster.start_coordinator(extra=["--leases.round_leases=1"])
    cluster.api("POST", "/v1/runs", json={
        "name": "r", "env": {"name": "arith", "args": {"digits": 1}},
        "rl": {"prompts_per_lease": 2, "group_size": 4, "max_tokens": 8},
        "diloco": {"inner_steps": 16}, "stop": {"max_rounds": 3},
        "verification": {"trusted_only": False},
    })  # fmt: skip
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    cluster.start_node("sampler", extra=model)
    cluster.start_node("trainer", roles="trainer", extra=model)
    accounts = cluster.accounts()

    def reserved() -> int:
        (key,) = [k for k in accounts.all() if k.name == "researcher"]
        return key.reserved_tokens

    held = wait_until(lambda: cluster.api("GET", "/v1/runs/r")["held_tokens"], 120,
                      what="a round dealt: its worst case held")  # fmt: skip
    assert reserved() >= held > 0
    coordinator = cluster.coordinator
    assert coordinator is not None
    coordinator.popen.kill()  # no goodbye: holds stay in the database as they were
    coordinator.wait()
    cluster.start_coordinator(extra=["--leases.round_leases=1"])
    # held again, not given back: the key's reservation is what the runs may still charge
    wait_until(lambda: reserved() == cluster.api("GET", "/v1/runs/r")["held_tokens"] > 0, 30,
               what="the open round held again")  # fmt: skip
    cluster.wait_run("r", "completed", timeout_s=240)
    wait_until(lambda: reserved() == 0, 60, what="every hold given back")
    books = cluster.api("GET", "/v1/ledger", params={"run": "r"})
    (bill,) = books["runs"]
    assert bill["reconciled"] and bill["charged"] == bill["recounted"] > 0
    (key,) = [k for k in accounts.all() if k.name == "researcher"]
    assert key.used_tokens == bill["key_usage"] == bill["charged"]
