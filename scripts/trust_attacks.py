"""The attacks ``bench_trust.py`` plays, one row of ``ATTACKS`` each: how the attacker is
started (its roles and ``BAZAAR_CHEAT``, a class of ``tests/adversarial/cheating_roles.py`` or
``cheaters.py``), what the coordinator needs for it, and how to tell it was caught — a
predicate over ``Seen``, what the coordinator's REST views and the accounts database show once
the run is over. An attack without a node of its own acts through ``during`` (the coordinator's
``kill -9``).

Adding an attacker: its cheat in ``tests/adversarial/``, then a row here. A row may add a
cheating producer beside the attacker (``accomplice``: the verifier attacks need cheats to pass or
a partner to cover for), start its attackers only once the network holds what the attack is
about (``joins_when``: known answers to be tested with), and give them a node's peer id
(``peer``: the partner or the target of colluding verifiers).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from protocol.accounts import KeyStore, open_database
from protocol.identity import Identity
from protocol.serving_tokens import issue
from tests.conftest import free_port

if TYPE_CHECKING:
    from bench_trust import Scenario

CHEATS = "tests.adversarial.cheating_node"
RUN = "trust"
ATTACKER = "attacker"
ACCOMPLICE = "accomplice"


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

    def attackers(self) -> list[dict[str, Any]]:
        """Every attacker node's trust record (a pair's both)."""
        return [t for name, t in self.trust.items() if name.startswith(ATTACKER)]

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


def verifiers_banned_unpaid(seen: Seen) -> bool:
    """Every lying verifier banned, its pay for checks all forfeited."""
    liars = seen.attackers()
    return bool(liars) and all(t["banned"] and t["verifier"]["verified_tokens"] == 0 for t in liars)


def partner_never_cleared(seen: Seen) -> bool:
    """The covering verifier banned and unpaid, its partner banned, and no audit of the
    partner's work decided honest."""
    partner = seen.trust.get(ACCOMPLICE, {})
    decided = {v["audit_status"] for v in seen.verdicts
               if v["producer"] == partner.get("peer_id") and not v["known_answer"]}  # fmt: skip
    return (verifiers_banned_unpaid(seen) and bool(partner.get("banned"))
            and not decided & {"passed", "cleared"})  # fmt: skip


def no_bypass(seen: Seen) -> bool:
    """Every request straight to the serving node refused; the one through the gateway served
    and metered."""
    e = seen.extra
    return bool(e) and e["direct_refused"] == e["direct_attempts"] > 0 and e["gateway_metered"]


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
    attackers: int = 1
    """Nodes playing the cheat (``attacker``, ``attacker-2``, ...): a colluding pair is two."""
    accomplice: str = ""
    """A cheating producer (``tests/adversarial/cheaters.py`` or ``cheating_roles.py``) started
    with the honest nodes, as node ``accomplice``."""
    peer: str = ""
    """The node whose peer id the attackers are given (``BAZAAR_PEER``)."""
    joins_when: Callable[[Scenario], bool] | None = None
    """The attackers join once this holds (default: with everyone, at the start)."""
    serve: bool = False
    """The honest ``sampler-1`` serves the model too (``--serve``)."""


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


def known_answers(cheats: int = 0, honest: int = 0) -> Callable[[Scenario], bool]:
    """The coordinator keeps at least this many known cheats and known-honest payloads."""

    def ready(sc: Scenario) -> bool:
        kept = "bazaar_known_answers_kept"
        return (sc.cluster.metric(kept, 'answer="fail"') >= cheats
                and sc.cluster.metric(kept, 'answer="pass"') >= honest)  # fmt: skip

    return ready


def references_of(name: str, at_least: int) -> Callable[[Scenario], bool]:
    """The coordinator holds ``at_least`` known-honest payloads of the named node's work (two
    passes, no failure), as its verdicts show."""

    def ready(sc: Scenario) -> bool:
        peer = sc.cluster.nodes()[name]["peer_id"]
        passes: dict[str, set[str]] = {}
        for v in sc.cluster.api("GET", "/v1/network/verdicts")["data"]:
            if v["producer"] == peer and not v["known_answer"] and v["audit_status"] == "passed":
                passes.setdefault(v["audit_id"], set()).add(v["verifier"])
        return sum(len(vs) >= 2 for vs in passes.values()) >= at_least

    return ready


def colluders_stopped(seen: Seen) -> bool:
    """Both colluders struck (they failed the target's known-honest work) and unpaid for it,
    and the target never penalized: no audit of its work decided failed."""
    target = seen.trust.get("sampler-1", {})
    against = [v for v in seen.verdicts if v["producer"] == target.get("peer_id")
               and not v["known_answer"] and v["audit_status"] == "failed"]  # fmt: skip
    liars = seen.attackers()
    return (len(liars) == 2 and all(t["verifier"]["verifier_strikes"] >= 1 for t in liars)
            and target.get("strikes", 1) == 0 and not against)  # fmt: skip


def bypass_the_gateway(sc: Scenario, run: dict[str, Any]) -> dict[str, Any] | None:
    """Once the run has a version: an admitted gateway starts; a client then calls the serving
    node straight (no credential, a made-up one, a valid gateway API key, and a serving token it
    signed itself), and once through the gateway, which must serve and meter it."""
    if run["policy_version"] < 1:
        return None
    return gateway_bypass(sc)


ATTACKS = [
    Attack("inflated_receipts", "inflated receipts (after being paid)", "inference",
           "InflatesReceipts", (("BAZAAR_CHEAT_FROM", "2"),),
           ("--audits.trusted_after=0", "--audits.floor_rate=0")),
    Attack("lying_trainer", "lying trainer (perfect rewards, 10x tokens)", "trainer",
           "LiesInReports", caught=liar_refused),
    Attack("inflated_logprobs", "logprob-inflating producer", "inference", "InflatedLogprobs"),
    Attack("withheld_payloads", "producer withholding payloads", "inference",
           "WithholdsPayloads"),
    Attack("freeloading_verifier", "freeloading verifier (passes all, fetches nothing)",
           "verifier", "FreeloadingVerifier", caught=verifiers_banned_unpaid,
           accomplice="ClaimsMoreTokens", joins_when=known_answers(cheats=1)),
    Attack("failing_verifier", "verifier failing every audit", "verifier", "FailingVerifier",
           caught=verifiers_banned_unpaid, refund_applies=False),
    Attack("covering_verifier", "colluding verifier covering for its cheating partner",
           "verifier", "CoversForPartner", caught=partner_never_cleared,
           accomplice="InflatedLogprobs", peer=ACCOMPLICE, joins_when=known_answers(cheats=1)),
    Attack("colluding_verifiers", "two colluding verifiers failing an honest producer",
           "verifier", "FailsTarget", coordinator=("--audits.double_check_rate=0.5",),
           caught=colluders_stopped, refund_applies=False, attackers=2,
           peer="sampler-1", joins_when=references_of("sampler-1", 2)),
    Attack("gateway_bypass", "client calling a serving node, skipping the gateway",
           caught=no_bypass, refund_applies=False, during=bypass_the_gateway, serve=True),
    Attack("coordinator_kill", "coordinator kill -9 between hold and settle",
           caught=held_again, refund_applies=False, during=kill_between_hold_and_settle),
]  # fmt: skip


def gateway_bypass(sc: Scenario) -> dict[str, Any]:
    """The gateway-bypass attack (``bypass_the_gateway``), played now: what it got."""
    c = sc.cluster
    route = c.routes()["sampler-1"]
    port = free_port()
    db = f"sqlite:///{c.root / 'edge.db'}"
    sc.procs["edge"] = c.spawn("edge", c.root / "edge", [
        "gateway", "start", "--coordinator-url", c.url, "--listen", f"127.0.0.1:{port}",
        "--db", db, f"--tokenizers.tiny={sc.tiny}", "--name=edge",
    ], env=c.gateway_env("edge"))  # fmt: skip
    gateway = f"http://127.0.0.1:{port}"
    key, _ = KeyStore(open_database(db)).create("app")
    end = time.monotonic() + 120
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            if "tiny" in httpx.get(f"{gateway}/health", timeout=5).json()["models"]:
                break
        time.sleep(0.3)
    body = {"model": "tiny", "prompt": "1 + 1 =", "max_tokens": 4}
    forged = issue(Identity.generate(), "edge", route["peer_id"], time.time(), 60)
    attempts = ["", "sk-made-up", key, forged]  # the last two: a real key, a self-signed token
    served = refused = 0
    for credential in attempts:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        r = httpx.post(f"{route['url']}/v1/completions", json=body, headers=headers, timeout=30)
        refused += r.status_code == 401
        served += r.json().get("usage", {}).get("total_tokens", 0) if r.is_success else 0
    auth = {"Authorization": f"Bearer {key}"}
    through = httpx.post(f"{gateway}/v1/completions", json=body, headers=auth, timeout=60)
    usage = httpx.get(f"{gateway}/v1/usage", headers=auth, timeout=10).json()["data"]
    metered = through.is_success and len(usage) == 1 and usage[0]["status"] == 200
    return {"direct_attempts": len(attempts), "direct_refused": refused,
            "direct_served_tokens": served, "gateway_metered": int(metered)}  # fmt: skip


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
