"""The coordinator's state as database rows, and back: what ``RolloutService`` writes and
restores. Rows kept in memory are copied before a session merges them, so the kept ones stay
detached from every session."""

from __future__ import annotations

import msgspec

from coordinator.audits import Audit
from coordinator.db import AdapterRow, AuditRow, LeaseRow, LedgerRow, ReportRow, RunRow
from coordinator.leases import LeaseState, RunPlan, RunState
from protocol.codec import decode_struct, encode_struct
from protocol.leases import Lease


def run_state(r: RunRow) -> RunState:
    return RunState(
        plan=msgspec.convert(r.plan, RunPlan),
        policy_version=r.policy_version,
        cursor=r.cursor,
        state=r.state,
        completion_tokens=r.completion_tokens,
        created_at=r.created_at,
        deployed=r.deployed,
        stop_reason=r.stop_reason,
        owner=r.owner,
        owner_key_id=r.owner_key_id,
    )


def lease_state(r: LeaseRow) -> LeaseState:
    return LeaseState(
        lease=decode_struct(r.lease, Lease, "stored lease"),
        node=r.node,
        issued_at=r.issued_at,
        status=r.status,
        counted=list(r.counted),
        payload_hash=r.payload_hash,
        completion_tokens=r.completion_tokens,
        completed_at=r.completed_at,
        trained_in=r.trained_in,
        trained_by=r.trained_by,
    )


def run_row(run: RunState) -> RunRow:
    return RunRow(
        run_id=run.plan.run_id,
        plan=msgspec.to_builtins(run.plan),
        state=run.state,
        policy_version=run.policy_version,
        cursor=run.cursor,
        completion_tokens=run.completion_tokens,
        created_at=run.created_at,
        deployed=run.deployed,
        stop_reason=run.stop_reason,
        owner=run.owner,
        owner_key_id=run.owner_key_id,
    )


def lease_row(s: LeaseState) -> LeaseRow:
    return LeaseRow(
        lease_id=s.lease.lease_id,
        run_id=s.lease.run_id,
        node=s.node,
        lease=encode_struct(s.lease),
        issued_at=s.issued_at,
        status=s.status,
        counted=s.counted,
        payload_hash=s.payload_hash,
        completion_tokens=s.completion_tokens,
        completed_at=s.completed_at,
        trained_in=s.trained_in,
        trained_by=s.trained_by,
    )


def audit_row(a: Audit) -> AuditRow:
    return AuditRow(
        audit_id=a.audit_id,
        lease_id=a.lease_id,
        run_id=a.run_id,
        producer=a.producer,
        payload_hash=a.payload_hash,
        stage=a.stage,
        status=a.status,
        created_at=a.created_at,
    )


def report_row(row: ReportRow) -> ReportRow:
    """A fresh copy to merge (the kept one stays detached from any session)."""
    return ReportRow(
        run_id=row.run_id, round=row.round, trainer=row.trainer, rewards=list(row.rewards),
        tokens_trained=row.tokens_trained, samples=list(row.samples), at=row.at,
    )  # fmt: skip


def adapter_row(row: AdapterRow) -> AdapterRow:
    """A fresh copy to merge (the kept one stays detached from any session)."""
    return AdapterRow(
        run_id=row.run_id, version=row.version, manifest_hash=row.manifest_hash, frame=row.frame,
        signers=list(row.signers), created_at=row.created_at,
    )  # fmt: skip


def ledger_row(row: LedgerRow) -> LedgerRow:
    """A fresh copy to add (the kept one stays detached from any session)."""
    return LedgerRow(run_id=row.run_id, kind=row.kind, debit=row.debit, credit=row.credit,
                     tokens=row.tokens, ref=row.ref, at=row.at)  # fmt: skip
