"""What the REST API shows of the coordinator: query functions over the shared work state
(``coordinator/state.py``) and the membership table, so the API reads through these and never
through another object's fields. Each returns plain JSON-ready data.

What the dashboard shows of trust reads through ``trust_summary`` (every node's record, the
bans, the recent verdicts — the coordinator's own convictions among them — and the
known-answer results), ``run_tokens`` (a run's tokens as its producers claimed them and as the
coordinator counted them) and ``ledger`` (the journal, each account's totals by kind, and each
run's reconciliation against the recount)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from coordinator.db import LeaseState, LedgerRow, RunState, Trust
from coordinator.membership import Membership
from coordinator.state import State


def find_run(state: State, run_id: str) -> RunState | None:
    return state.book.runs.get(run_id)


def runs(state: State) -> list[RunState]:
    return list(state.book.runs.values())


def run_view(state: State, run: RunState) -> dict[str, Any]:
    plan = run.plan
    return {
        "id": run.run_id,
        "object": "run",
        "state": run.state,
        "stop_reason": run.stop_reason,
        "owner": run.owner,
        "env": plan.env,
        "env_version": plan.env_version,
        "env_seed": plan.env_seed,
        "base_model": plan.spec.base_model,
        "group_size": plan.spec.rl.group_size,
        "sampling": msgspec.to_builtins(plan.sampling()),
        "total_examples": plan.spec.rl.max_examples,
        "policy_version": run.policy_version,
        "examples_leased": run.cursor,
        "examples_delivered": state.book.delivered(run.run_id),
        "active_leases": state.book.active_of(run.run_id),
        "completion_tokens": run.completion_tokens,
        **run_tokens(state, run),
        "tokens_trained": state.billing.charged(run.run_id, "trained"),
        "billed_tokens": state.billing.charged(run.run_id),
        "refunded_tokens": state.billing.refunded(run.run_id),
        "held_tokens": state.billing.outstanding(run.run_id),
        "max_tokens": plan.spec.budget.max_tokens,
        "reward": rewards(state, run.run_id)[-1:] or None,
        "created_at": run.created_at,
        "deployed": run.deployed,
    }


def run_tokens(state: State, run: RunState) -> dict[str, int]:
    """The completion tokens of the run's counted rollouts: ``claimed`` by their receipts (the
    producers' word), ``confirmed`` by the coordinator's own count of the payloads (only these
    are ever billed), and ``unconfirmed``: claimed by rollouts it has not counted yet."""
    counted = state.book.counted_of(run.run_id)
    confirmed = [s for s in counted if s.confirmed]
    return {
        "claimed_tokens": run.completion_tokens,
        "confirmed_tokens": sum(s.recounted_tokens or 0 for s in confirmed),
        "unconfirmed_tokens": sum(s.completion_tokens for s in counted if not s.confirmed),
        "counted_rollouts": len(counted),
        "confirmed_rollouts": len(confirmed),
    }


def trust(state: State, peer: str) -> dict[str, Any]:
    """A node's audit record (all zero for one never audited): as a producer, and under
    ``verifier`` as a verifier — known answers right and wrong, verdicts agreeing with their
    audit's decision or outvoted, strikes, the tokens of checks credited and forfeited, its
    reputation, and whether it is still on probation (new: it gets known answers only)."""
    record = (state.audits.trust.get(peer) or Trust(peer)).view()
    right = record["verifier"]["known_right"]
    record["verifier"]["probation"] = right < state.audits.config.verifier_trusted_after
    return record


def nodes(membership: Membership, state: State, now: float) -> list[dict[str, Any]]:
    """Every node in the table with its audit record, live ones first."""
    out = [{**n.view(now), "trust": trust(state, n.peer_id)} for n in membership.nodes.values()]
    out.sort(key=lambda v: (v["status"] != "alive", str(v["name"])))
    return out


def _name(membership: Membership, peer: str) -> str:
    node = membership.nodes.get(peer)
    return node.name if node else peer[:12]


def verdicts(state: State, membership: Membership) -> list[dict[str, Any]]:
    """Every verdict, oldest first, with the verifier's signed frame (hex) as evidence.
    ``known_answer`` is empty for a real audit's verdict; ``pass`` or ``fail`` for a
    known-answer audit's (its ``audit_status`` is then ``right`` or ``wrong``)."""
    out = [
        {
            "audit_id": a.audit_id,
            "lease_id": a.lease_id,
            "run_id": a.run_id,
            "producer": a.producer,
            "producer_name": _name(membership, a.producer),
            "stage": "first" if i == 0 else "confirm",
            "audit_status": a.status,
            "known_answer": a.known_answer,
            "verifier": v.verifier,
            "verifier_name": _name(membership, v.verifier),
            "passed": v.passed,
            "failed_check": v.failed_check,
            "detail": v.detail,
            "at": v.at,
            "signed_frame": v.frame.hex(),
        }
        for a in state.audits.audits.values()
        for i, v in enumerate(a.verdicts)
    ]
    out.sort(key=lambda v: v["at"])
    return out


def trust_summary(
    state: State, membership: Membership, judge: str, recent: int = 50
) -> dict[str, Any]:
    """What the network knows of its nodes' honesty: every node's record (each node in the
    table and each peer with a record, gone ones included), the banned producers with the check
    that convicted them, the ``recent`` newest verdicts (the coordinator's own convictions are
    those whose verifier is ``judge``, its peer id, named "coordinator"), and the known-answer
    results."""

    def name(peer: str) -> str:
        return "coordinator" if peer == judge else _name(membership, peer)

    peers = sorted({*membership.nodes, *state.audits.trust}, key=lambda p: (name(p), p))
    nodes: list[dict[str, Any]] = []
    for peer in peers:
        node = membership.nodes.get(peer)
        nodes.append({"peer_id": peer, "name": name(peer),
                      "status": node.status if node else "gone",
                      "roles": list(node.capabilities.roles) if node else [],
                      "trust": trust(state, peer)})  # fmt: skip
    convicted: dict[str, dict[str, Any]] = {}  # producer -> its newest confirmed failure
    for a in sorted(state.audits.audits.values(), key=lambda a: a.created_at):
        if a.status == "failed" and a.verdicts:
            v = a.verdicts[-1]
            convicted[a.producer] = {"check": v.failed_check, "detail": v.detail, "at": v.at,
                                     "by": name(v.verifier)}  # fmt: skip
    bans = [{"peer_id": peer, "name": name(peer), "strikes": t.strikes,
             "forfeited_tokens": t.forfeited_tokens, "convicted": convicted.get(peer)}
            for peer, t in sorted(state.audits.trust.items()) if t.banned]  # fmt: skip
    audits = []
    for v in reversed(verdicts(state, membership)[-recent:]):
        v.pop("signed_frame")  # the evidence stays at /v1/network/verdicts
        audits.append({**v, "producer_name": name(v["producer"]),
                       "verifier_name": name(v["verifier"]),
                       "by_coordinator": v["verifier"] == judge,
                       "outcome": "passed" if v["passed"] else "failed"})  # fmt: skip
    return {"object": "trust", "coordinator": judge, "nodes": nodes, "bans": bans,
            "audits": audits, "known_answers": known_answers(state, membership)}  # fmt: skip


def known_answers(state: State, membership: Membership, recent: int = 50) -> list[dict[str, Any]]:
    """The ``recent`` newest known-answer audits scored: verifiers handed, blind, a payload
    whose verdict the coordinator already knew, and whether they answered it right."""
    scored = [a for a in state.audits.audits.values()
              if a.known_answer and a.verdicts and a.status != "cancelled"]  # fmt: skip
    scored.sort(key=lambda a: a.verdicts[-1].at)
    out = []
    for a in reversed(scored[-recent:]):
        v = a.verdicts[-1]
        out.append({"audit_id": a.audit_id, "lease_id": a.lease_id, "producer_name":
                    _name(membership, a.producer), "verifier_name": _name(membership, v.verifier),
                    "known": a.known_answer, "answered": "pass" if v.passed else "fail",
                    "right": v.passed == (a.known_answer == "pass"),
                    "failed_check": v.failed_check, "at": v.at})  # fmt: skip
    return out


def known_answer_stock(state: State, held: Callable[[bytes], bool]) -> dict[str, int]:
    """The known answers kept to check verifiers with, by answer (``pass``: known-honest
    payloads, ``fail``: known cheats), counting those whose payload is ``held``."""
    return {answer: sum(held(a.payload_hash) for a in refs.values())
            for answer, refs in state.audits.references.items()}  # fmt: skip


def rollouts(state: State, run_id: str, membership: Membership) -> list[dict[str, Any]]:
    """The counted rollouts of a run: what a consumer needs to fetch and re-score each, and
    where to dial its producer."""
    out: list[dict[str, Any]] = []
    for s in state.book.counted_of(run_id):
        lease = s.lease
        node = membership.nodes.get(s.node)
        out.append(
            {
                "lease_id": s.lease_id,
                "producer": s.node,
                "producer_addrs": list(node.addrs) if node else [],
                "payload_hash": (s.payload_hash or b"").hex(),
                "counted_examples": s.counted,
                "completion_tokens": s.completion_tokens,
                "issued_at": s.issued_at,
                "completed_at": s.completed_at,
                "lease": {**msgspec.to_builtins(lease), "lease_seed": lease.lease_seed.hex()},
            }
        )
    return out


def rewards(state: State, run_id: str) -> list[dict[str, Any]]:
    """Reward by the version completions were sampled at (count, mean, std): as the
    coordinator recomputed them, or as trainers reported them where it cannot score the run."""
    return state.rewards.rewards(run_id) or state.reports.rewards(run_id)


def samples(state: State, run_id: str) -> list[dict[str, Any]]:
    """The completions trainers reported as text, oldest round first."""
    return state.reports.samples(run_id)


def versions(state: State, run_id: str) -> list[dict[str, Any]]:
    """A run's versions, withdrawn ones included (``revoked``), each with the replays of the
    rounds that made it (``coordinator/replays.py``)."""
    replays: dict[int, list[dict[str, Any]]] = {}
    for r in state.replays.replays.values():
        if r.run_id == run_id and r.made >= 0:
            replays.setdefault(r.made, []).append(
                {"audit_id": r.audit_id, "trainer": r.trainer, "status": r.status,
                 "verdicts": [{"verifier": v[0], "passed": v[1], "failed_check": v[2]}
                              for v in r.verdicts]}
            )  # fmt: skip
    return [
        {"version": v, "manifest_sha256": row.manifest_hash, "holders": row.signers,
         "created_at": row.created_at, "trained_from": row.trained_from(),
         "revoked": row.revoked, "replays": replays.get(v, [])}
        for v, row in sorted(state.versions.get(run_id, {}).items())
    ]  # fmt: skip


def replays(state: State, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every replay audit of trainers' rounds (of one run), oldest first."""
    rows = sorted(state.replays.replays.values(), key=lambda r: r.created_at)
    return [
        {"audit_id": r.audit_id, "run_id": r.run_id, "round": r.round, "made": r.made,
         "trainer": r.trainer, "status": r.status, "created_at": r.created_at,
         "verdicts": [{"verifier": v[0], "passed": v[1], "failed_check": v[2], "stats": v[3]}
                      for v in r.verdicts]}
        for r in rows if run_id is None or r.run_id == run_id
    ]  # fmt: skip


async def ledger(
    state: State,
    count: Callable[[LeaseState], int | None],
    run_id: str | None = None,
    peer: str | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """The journal (of one run, or one node's entries; ``kind``: only entries of that kind
    listed), the accounts' balances, their totals by what moved them in that run's or node's
    entries (``accounts``), and each run's reconciliation against the payloads themselves
    (``count``: the reconciler's own count of a rollout's kept payload) and the trainers'
    signed counts."""
    billing = state.billing
    account = f"node:{peer}" if peer else None
    entries = [e for e in billing.entries
               if (run_id is None or e.run_id == run_id)
               and (account is None or account in (e.debit, e.credit))]  # fmt: skip
    totals = account_totals(entries)
    if kind is not None:
        entries = [e for e in entries if e.kind == kind]
    balances = billing.balances()
    checks = []
    for run in state.book.runs.values():
        if run_id is not None and run.run_id != run_id:
            continue
        reports = state.reports.by_run.get(run.run_id, {}).values()
        leases = [s for (r, _), dealt in state.book.dealt.items() if r == run.run_id for s in dealt]
        usage = await billing.key_usage(run)
        checks.append(billing.reconcile(run, leases, reports, usage, count))
    return {
        "object": "ledger",
        "entries": [
            {k: getattr(e, k) for k in ("run_id", "kind", "debit", "credit", "tokens", "ref", "at")}
            for e in entries[-1000:]
        ],
        "entry_count": len(entries),
        "balances": {a: b for a, b in sorted(balances.items()) if account in (None, a)},
        "balance_sum": sum(balances.values()),
        "accounts": {a: t for a, t in sorted(totals.items()) if account in (None, a)},
        "runs": checks,
        "reconciled": all(c["reconciled"] for c in checks) and sum(balances.values()) == 0,
    }


def account_totals(entries: Iterable[LedgerRow]) -> dict[str, dict[str, int]]:
    """Each account's tokens by what moved them: ``paid`` (charges and verification credits it
    paid out), ``earned`` (what it was paid), ``forfeited`` (a penalized producer's pay given
    back), ``refunded`` (what a payer got back), and the ``balance`` they leave."""
    out: dict[str, dict[str, int]] = {}

    def of(account: str) -> dict[str, int]:
        return out.setdefault(account, dict.fromkeys(
            ("paid", "earned", "forfeited", "refunded", "balance"), 0))  # fmt: skip

    for e in entries:
        refund = e.kind == "refund"
        of(e.debit)["forfeited" if refund else "paid"] += e.tokens
        of(e.credit)["refunded" if refund else "earned"] += e.tokens
        of(e.debit)["balance"] -= e.tokens
        of(e.credit)["balance"] += e.tokens
    return out


def ban_reason(state: State, peer: str) -> str:
    """Why a node is banned (empty: it is not)."""
    t = state.audits.trust.get(peer)
    if t is None or not t.banned:
        return ""
    if t.strikes >= state.audits.config.max_strikes:
        return f"banned after {t.strikes} confirmed audit failures"
    failed = [r for r in state.replays.replays.values()
              if r.trainer == peer and r.status == "failed"]  # fmt: skip
    if failed:
        return f"banned: its training of {failed[0].run_id} round {failed[0].round} failed a replay"
    return f"banned after {t.verifier_strikes} verifier strikes (wrong known answers, outvoted)"


def has_passed_an_audit(state: State, peer: str) -> bool:
    t = state.audits.trust.get(peer)
    return t is not None and t.passed > 0 and not t.banned


def lease_holders(state: State) -> list[str]:
    """The producer of every active lease (one entry per lease)."""
    return [s.node for s in state.book.active.values()]
