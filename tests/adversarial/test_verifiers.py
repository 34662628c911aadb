"""Lying verifiers, end to end with real processes: each attack is the node's real
``VerifierRole`` with one step changed (``lying_verifiers.py``), run beside an honest producer
(``p``) and two honest verifiers (``v-1``, ``v-2``). Known-answer audits — payloads whose
verdict is settled, sent blind — and decisions by majority catch each liar: it is banned, its pay
forfeited, and no honest producer or verifier is ever penalized.

The coordinator runs with high rates so that each test settles in a minute or two: a quarter of
a trusted producer's receipts are audited (every one of a new or cheating producer's), every
pass is double-checked (so known-honest payloads appear at once), half of a trusted verifier's
audits are known answers, and a new verifier gets known answers only until it has answered two
right; two strikes ban a verifier. (Auditing every receipt would make the producers outrun the
verifiers, and a cheater's audits would wait behind a growing queue.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(600)  # a minute or two each; minutes more on a loaded machine

AUDITS = [
    "--audits.trusted_after=2",
    "--audits.floor_rate=0.25",
    "--audits.double_check_rate=1",
    "--audits.known_answer_rate=0.5",
    "--audits.verifier_trusted_after=2",
    "--audits.max_verifier_strikes=2",
    "--audits.deadline_s=30",
]
RUN = {"name": "r", "rl": {"max_examples": 100_000, "prompts_per_lease": 2, "group_size": 2,
                           "max_tokens": 8}}  # fmt: skip
"""A run that outlasts the test: producers keep making work to audit."""
CHEAT = "tests.adversarial.cheating_node"
HONEST_VERIFIERS = ("v-1", "v-2")


class Network:
    """A coordinator, the run, and the nodes a test starts, over a ``Cluster``."""

    def __init__(self, cluster: Cluster, tiny_model: Path, extra: tuple[str, ...] = ()) -> None:
        self.cluster = cluster
        self.model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
        cluster.start_coordinator(extra=[*AUDITS, *extra])
        cluster.api("POST", "/v1/runs", json=RUN)

    def honest(self, verifiers: tuple[str, ...] = HONEST_VERIFIERS) -> None:
        self.cluster.start_node("p", extra=self.model)
        for name in verifiers:
            self.cluster.start_node(name, roles="verifier", extra=self.model)

    def cheat(self, name: str, cheat: str, roles: str = "verifier", peer: str = "") -> None:
        env = {"BAZAAR_CHEAT": cheat, **({"BAZAAR_PEER": peer} if peer else {})}
        self.cluster.start_node(name, roles=roles, extra=self.model, module=CHEAT, env=env)

    def peer_id(self, name: str) -> str:
        return str(wait_until(lambda: self.cluster.nodes()[name]["peer_id"], 120, 0.2, name))

    def trust(self, name: str) -> dict[str, Any]:
        return dict(self.cluster.nodes()[name]["trust"])

    def banned(self, *names: str) -> bool:
        nodes = self.cluster.nodes()
        return all(n in nodes and nodes[n]["trust"]["banned"] for n in names)

    def verdicts(self) -> list[dict[str, Any]]:
        return list(self.cluster.api("GET", "/v1/network/verdicts")["data"])

    def outvoted(self, verifier: str, status: str = "") -> list[str]:
        """The real audits ``verifier`` failed that another verifier passed (in ``status``)."""
        by_audit: dict[str, list[dict[str, Any]]] = {}
        for v in self.verdicts():
            if not v["known_answer"]:
                by_audit.setdefault(v["audit_id"], []).append(v)
        return [a for a, vs in by_audit.items()
                if any(v["verifier"] == verifier and not v["passed"] for v in vs)
                and any(v["verifier"] != verifier and v["passed"] for v in vs)
                and status in ("", vs[0]["audit_status"])]  # fmt: skip

    def known_answers(self, honest: int = 0, cheats: int = 0) -> bool:
        """At least this many known-honest payloads and known cheats are kept (read from the
        metrics: the verdicts view, every signed frame, is too big to poll)."""
        kept = "bazaar_known_answers_kept"
        return (self.cluster.metric(kept, 'answer="pass"') >= honest
                and self.cluster.metric(kept, 'answer="fail"') >= cheats)  # fmt: skip

    def balance(self, name: str) -> int:
        peer = self.peer_id(name)
        balances = self.cluster.api("GET", f"/v1/ledger?node={peer}")["balances"]
        return int(balances.get(f"node:{peer}", 0))

    def penalties(self) -> float:
        return self.cluster.metric("bazaar_penalties_total")

    def assert_untouched(self, producers: tuple[str, ...], verifiers: tuple[str, ...]) -> None:
        """Honest producers never penalized, honest verifiers never marked, struck nor
        unpaid; no audit of an honest producer decided against it."""
        nodes = self.cluster.nodes()
        for name in producers:
            t = nodes[name]["trust"]
            assert (t["strikes"], t["failed"], t["forfeited_tokens"], t["banned"]) == (
                0, 0, 0, False), (name, t)  # fmt: skip
            peer = nodes[name]["peer_id"]
            against = [v for v in self.verdicts() if v["producer"] == peer
                       and not v["known_answer"] and v["audit_status"] == "failed"]  # fmt: skip
            assert against == [], against
        for name in verifiers:
            t = nodes[name]["trust"]
            v = t["verifier"]
            assert not t["banned"] and v["verified_tokens"] > 0, (name, t)
            assert (v["known_wrong"], v["outvoted"], v["verifier_strikes"],
                    v["verified_forfeited_tokens"]) == (0, 0, 0, 0), (name, v)  # fmt: skip

    def assert_banned_and_unpaid(self, name: str) -> dict[str, Any]:
        t = self.trust(name)
        v = t["verifier"]
        assert t["banned"] and v["verifier_strikes"] >= 2, t
        assert v["verified_tokens"] == 0 and self.balance(name) == 0, t  # every credit forfeited
        proc = next(p for p in self.cluster.procs if p.name == name)
        wait_until(lambda: "verifier strikes" in proc.output(), 60, what=f"{name} refused")
        return dict(v)


def test_a_freeloading_verifier_is_caught_by_known_cheats(
    cluster: Cluster, tiny_model: Path
) -> None:
    """It passes everything without fetching a byte. The coordinator's own count convicts a
    producer whose receipts claim a token too many; those payloads are known cheats, and the
    freeloader passes them: struck, its pay forfeited, banned."""
    net = Network(cluster, tiny_model, ("--audits.max_strikes=4",))
    net.honest()
    net.cheat("c", "ClaimsMoreTokens", roles="inference")
    wait_until(lambda: net.known_answers(honest=1, cheats=3), 300, 1.0, "known answers")
    net.cheat("f", "FreeloadingVerifier")
    wait_until(lambda: net.banned("f", "c"), 300, 1.0, "the freeloader banned")

    v = net.assert_banned_and_unpaid("f")
    assert v["known_wrong"] >= 1
    f = net.peer_id("f")
    wrong = [x for x in net.verdicts() if x["verifier"] == f and x["audit_status"] == "wrong"]
    assert wrong and all(x["known_answer"] == "fail" and x["passed"] for x in wrong)
    # the honest verifiers counted the tokens again and failed the cheats: token_count
    c = net.peer_id("c")
    caught = {x["failed_check"] for x in net.verdicts()
              if x["producer"] == c and not x["passed"] and x["verifier"] != f}  # fmt: skip
    assert "token_count" in caught
    net.assert_untouched(("p",), HONEST_VERIFIERS)


def test_a_verifier_that_always_fails_is_outvoted_and_banned(
    cluster: Cluster, tiny_model: Path
) -> None:
    """It fails every payload. A failure is never decided alone: while one honest verifier
    passes what it failed, the split waits; the second honest verifier outvotes it. Outvoted
    verdicts are marks (three make a strike), and the double-checked passes of honest work are
    known answers it fails (a strike each): banned, unpaid — and the honest producer it failed
    is never penalized."""
    net = Network(cluster, tiny_model)
    net.honest(verifiers=("v-1",))
    net.cheat("a", "FailingVerifier")
    a = net.peer_id("a")
    wait_until(lambda: net.outvoted(a), 300, 1.0, "a split: a failed what v-1 passed")
    cluster.start_node("v-2", roles="verifier", extra=net.model)
    wait_until(lambda: net.banned("a"), 300, 1.0, "the failing verifier banned")

    v = net.assert_banned_and_unpaid("a")
    assert v["outvoted"] >= 1 and net.outvoted(a, "cleared")  # the majority passed them
    real = [x for x in net.verdicts() if x["verifier"] == a and not x["known_answer"]]
    assert all(x["audit_status"] != "failed" for x in real), real  # never a majority
    net.assert_untouched(("p",), HONEST_VERIFIERS)
    assert net.penalties() == 0  # 0 false penalties


def test_a_verifier_covering_for_its_partners_cheats_is_caught(
    cluster: Cluster, tiny_model: Path
) -> None:
    """A colluding pair: a producer that inflates its logprobs and a verifier that passes its
    partner's payloads unchecked (and checks everyone else). Its passes are outvoted, and the
    partner's confirmed failures are known cheats it passes: both banned; no payload of the
    partner's is ever decided honest."""
    net = Network(cluster, tiny_model, ("--audits.max_strikes=4",))
    net.honest()
    net.cheat("c", "InflatedLogprobs", roles="inference")
    partner = net.peer_id("c")
    wait_until(lambda: net.known_answers(honest=1, cheats=2), 300, 1.0, "known answers")
    net.cheat("k", "CoversForPartner", peer=partner)
    wait_until(lambda: net.banned("k", "c"), 300, 1.0, "the pair banned")

    net.assert_banned_and_unpaid("k")
    decided = {x["audit_id"]: x["audit_status"] for x in net.verdicts()
               if x["producer"] == partner and not x["known_answer"]}  # fmt: skip
    assert "failed" in decided.values()
    assert not {"passed", "cleared"} & set(decided.values()), decided
    net.assert_untouched(("p",), HONEST_VERIFIERS)


def test_two_verifiers_failing_an_honest_producer_never_get_it_penalized(
    cluster: Cluster, tiny_model: Path
) -> None:
    """A colluding pair of verifiers that fail one honest producer's payloads (and check the
    rest honestly): together they would make a majority of two failures. New verifiers get
    known answers first, the producer's double-checked passes among them: both fail them and
    are banned before their word decides anything about the producer."""
    net = Network(cluster, tiny_model)
    net.honest()
    target = net.peer_id("p")
    wait_until(lambda: net.known_answers(honest=3), 300, 1.0, "known-honest payloads")
    for name in ("c-1", "c-2"):
        net.cheat(name, "FailsTarget", peer=target)
    wait_until(lambda: net.banned("c-1", "c-2"), 300, 1.0, "both colluders banned")

    for name in ("c-1", "c-2"):
        v = net.assert_banned_and_unpaid(name)
        assert v["known_wrong"] >= 2
    net.assert_untouched(("p",), HONEST_VERIFIERS)
    assert net.penalties() == 0
