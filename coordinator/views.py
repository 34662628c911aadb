"""What the REST API shows of the coordinator's work: runs, their rollouts and versions, and
the ledger with its reconciliation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from coordinator.leases import RunState

if TYPE_CHECKING:
    from coordinator.work import RolloutService


def run_view(work: RolloutService, run: RunState) -> dict[str, Any]:
    plan = run.plan
    active = sum(s.lease.run_id == plan.run_id for s in work.book.active.values())
    return {
        "id": plan.run_id,
        "object": "run",
        "state": run.state,
        "stop_reason": run.stop_reason,
        "owner": run.owner,
        "env": plan.env,
        "env_version": plan.env_version,
        "env_seed": plan.env_seed,
        "base_model": plan.base_model,
        "group_size": plan.group_size,
        "sampling": msgspec.to_builtins(plan.sampling),
        "total_examples": plan.total_examples,
        "policy_version": run.policy_version,
        "examples_leased": run.cursor,
        "examples_delivered": len(run.done),
        "active_leases": active,
        "completion_tokens": run.completion_tokens,
        "tokens_trained": work.reports.tokens_trained(plan.run_id),
        "billed_tokens": work.billing.charged(plan.run_id),
        "held_tokens": work.billing.outstanding(plan.run_id),
        "max_tokens": plan.max_tokens,
        "reward": work.reports.rewards(plan.run_id)[-1:] or None,
        "created_at": run.created_at,
        "deployed": run.deployed,
    }


def rollouts(work: RolloutService, run_id: str) -> list[dict[str, Any]]:
    """The counted rollouts of a run: what a consumer needs to fetch and re-score each."""
    done = [
        s
        for s in work.book.leases.values()
        if s.lease.run_id == run_id and s.status == "completed" and s.counted
    ]
    done.sort(key=lambda s: s.completed_at or 0.0)
    out: list[dict[str, Any]] = []
    for s in done:
        lease = s.lease
        out.append(
            {
                "lease_id": lease.lease_id,
                "producer": s.node,
                "payload_hash": (s.payload_hash or b"").hex(),
                "counted_examples": s.counted,
                "completion_tokens": s.completion_tokens,
                "issued_at": s.issued_at,
                "completed_at": s.completed_at,
                "lease": {**msgspec.to_builtins(lease), "lease_seed": lease.lease_seed.hex()},
            }
        )
    return out


def versions(work: RolloutService, run_id: str) -> list[dict[str, Any]]:
    return [
        {"version": v, "manifest_sha256": row.manifest_hash, "holders": row.signers,
         "created_at": row.created_at}
        for v, row in sorted(work.versions.get(run_id, {}).items())
    ]  # fmt: skip


async def ledger(
    work: RolloutService, run_id: str | None = None, peer: str | None = None
) -> dict[str, Any]:
    """The journal (of one run, or one node's entries), the accounts' balances, and each run's
    reconciliation: charges = tokens processed = the key's usage records."""
    billing = work.billing
    account = f"node:{peer}" if peer else None
    entries = [e for e in billing.entries
               if (run_id is None or e.run_id == run_id)
               and (account is None or account in (e.debit, e.credit))]  # fmt: skip
    balances = billing.balances()
    runs = [r for r in work.book.runs.values() if run_id is None or r.plan.run_id == run_id]
    checks = []
    for run in runs:
        signers = {v: row.signers for v, row in work.versions.get(run.plan.run_id, {}).items()}
        reports = work.reports.by_run.get(run.plan.run_id, {}).values()
        checks.append(billing.reconcile(run, work.book.leases.values(), reports, signers,
                                        await billing.key_usage(run)))  # fmt: skip
    return {
        "object": "ledger",
        "entries": [
            {k: getattr(e, k) for k in ("run_id", "kind", "debit", "credit", "tokens", "ref", "at")}
            for e in entries[-1000:]
        ],
        "entry_count": len(entries),
        "balances": {a: b for a, b in sorted(balances.items()) if account in (None, a)},
        "balance_sum": sum(balances.values()),
        "runs": checks,
        "reconciled": all(c["reconciled"] for c in checks) and sum(balances.values()) == 0,
    }
