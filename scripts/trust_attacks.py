"""The attacks ``bench_trust.py`` plays, one row of ``ATTACKS`` each: how the attacker is
started (its roles and ``BAZAAR_CHEAT``, a class of ``tests/adversarial/cheating_roles.py`` or
``cheaters.py``), what the coordinator needs for it, and how to tell it was caught — a
predicate over ``Seen``, what the coordinator's REST views and the accounts database show once
the run is over. An attack without a node of its own acts through ``during`` (the coordinator's
``kill -9``).

Adding an attacker (see the TODO list in ``bench_trust.py``): its cheat in ``tests/adversarial/``,
then a row here, e.g. ``Attack("freeloading_verifier", "verifier passing every audit unchecked",
"verifier", "FreeloadsVerdicts", caught=...)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench_trust import Scenario

CHEATS = "tests.adversarial.cheating_node"
RUN = "trust"
ATTACKER = "attacker"


# -- what a scenario saw ----------------------------------------------------------------------


@dataclass
class Seen:
    """A finished scenario, as the coordinator's REST views and the accounts database show it."""

    run: dict[str, Any]
    bill: dict[str, Any]
    """The run's reconciliation (``GET /v1/ledger?run=``)."""
    trust: dict[str, dict[str, Any]]
    """Trust records by node name (``GET /v1/trust``), each with its ``peer_id``."""
    sampled: list[dict[str, Any]]
    trained: list[dict[str, Any]]
    refunds: list[dict[str, Any]]
    """The run's ledger entries of each kind."""
    verdicts: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]
    """The run's counted rollouts (``GET /v1/runs/{id}/rollouts``)."""
    key_used: int
    key_reserved: int
    extra: dict[str, Any] = field(default_factory=dict)
    """What the attack's ``during`` step recorded."""

    def account(self, name: str) -> str:
        return f"node:{self.trust[name]['peer_id']}" if name in self.trust else ""

    @property
    def attacker(self) -> dict[str, Any] | None:
        return self.trust.get(ATTACKER)

    def paid(self, name: str, entries: list[dict[str, Any]]) -> int:
        """Tokens these ledger entries paid to the named node."""
        return sum(e["tokens"] for e in entries if e["credit"] == self.account(name))


def struck(seen: Seen) -> bool:
    t = seen.attacker
    return bool(t and (t["strikes"] > 0 or t["banned"]))


def liar_refused(seen: Seen) -> bool:
    """Struck, never paid for training, and the run stopped on rewards the coordinator
    recomputed, never on the liar's."""
    unpaid = seen.paid(ATTACKER, seen.trained) == 0
    return struck(seen) and unpaid and seen.run["stop_reason"] != "target_reward"


def held_again(seen: Seen) -> bool:
    return bool(seen.extra.get("held_again"))


# -- the attacks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    key: str
    label: str
    roles: str = ""
    """The attacker node's roles; empty: the attack needs no node of its own."""
    cheat: str = ""
    """``BAZAAR_CHEAT`` of ``tests/adversarial/cheating_node.py``: a role or producer class."""
    env: tuple[tuple[str, str], ...] = ()
    coordinator: tuple[str, ...] = ()
    """Coordinator options the attack needs besides everyone's."""
    caught: Callable[[Seen], bool] = struck
    refund_applies: bool = True
    during: Callable[[Scenario, dict[str, Any]], dict[str, Any] | None] | None = None
    """Called with the run's view while it runs until it returns what it did (not None)."""


def kill_between_hold_and_settle(sc: Scenario, run: dict[str, Any]) -> dict[str, Any] | None:
    """Once a round holds budget (dealt, not yet settled), ``kill -9`` the coordinator and start
    it again: it must hold the open round again before it answers anyone."""
    if run["held_tokens"] <= 0 or run["policy_version"] < 1:
        return None
    coordinator = sc.cluster.coordinator
    assert coordinator is not None
    coordinator.popen.kill()  # no goodbye: holds stay in the database as they were
    coordinator.wait()
    sc.cluster.start_coordinator(extra=sc.coordinator_args)
    end, seen = time.monotonic() + 30, (0, 0)
    while time.monotonic() < end:
        seen = (sc.reserved(), sc.cluster.api("GET", f"/v1/runs/{RUN}")["held_tokens"])
        if seen[0] == seen[1] > 0:
            break
        time.sleep(0.1)
    return {"killed_holding": run["held_tokens"], "held_again": seen[0] == seen[1] > 0,
            "restart_reserved": seen[0], "restart_held": seen[1]}  # fmt: skip


ATTACKS = [
    Attack("inflated_receipts", "inflated receipts (after being paid)", "inference",
           "InflatesReceipts", (("BAZAAR_CHEAT_FROM", "2"),),
           ("--audits.trusted_after=0", "--audits.floor_rate=0")),
    Attack("lying_trainer", "lying trainer (perfect rewards, 10x tokens)", "trainer",
           "LiesInReports", caught=liar_refused),
    Attack("inflated_logprobs", "logprob-inflating producer", "inference", "InflatedLogprobs"),
    Attack("withheld_payloads", "producer withholding payloads", "inference",
           "WithholdsPayloads"),
    Attack("coordinator_kill", "coordinator kill -9 between hold and settle",
           caught=held_again, refund_applies=False, during=kill_between_hold_and_settle),
]  # fmt: skip
# TODO (bench_trust.py's docstring): freeloading, always-failing and colluding verifiers; a
# gateway bypass.


# -- observing ------------------------------------------------------------------------------


def observe(sc: Scenario, extra: dict[str, Any]) -> Seen:
    """What the coordinator and the accounts database show now (``extra``: what the attack's
    ``during`` step recorded)."""
    c = sc.cluster
    trust = {n["name"]: {**n["trust"], "peer_id": n["peer_id"]}
             for n in c.api("GET", "/v1/trust")["nodes"]}  # fmt: skip
    books = c.api("GET", "/v1/ledger", params={"run": RUN, "kind": "sampled"})
    refunds = c.api("GET", "/v1/ledger", params={"run": RUN, "kind": "refund"})["entries"]
    if books["entry_count"] > len(books["entries"]):
        raise RuntimeError("more ledger entries than the view lists: run fewer rounds")
    (key,) = [k for k in c.accounts().all() if k.name == "researcher"]
    return Seen(
        run=c.api("GET", f"/v1/runs/{RUN}"), bill=books["runs"][0], trust=trust,
        sampled=books["entries"], refunds=refunds,
        trained=c.api("GET", "/v1/ledger", params={"run": RUN, "kind": "trained"})["entries"],
        verdicts=c.api("GET", "/v1/network/verdicts")["data"],
        rollouts=c.api("GET", f"/v1/runs/{RUN}/rollouts")["data"],
        key_used=key.used_tokens, key_reserved=key.reserved_tokens, extra=dict(extra),
    )  # fmt: skip
