"""The coordinator's database: SQLAlchemy over SQLite (WAL) by default, PostgreSQL by URL.

Tables: ``nodes`` (membership), ``runs``, ``leases`` (each with the exact lease a node was given)
and ``receipts`` (every receipt received, with its outcome: the audit trail of what was counted).
Calls here are synchronous and quick; the server runs them off its event loop in a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import protocol.service.database


class Base(DeclarativeBase):
    pass


class NodeRow(Base):
    """One node ever seen, keyed by peer id."""

    __tablename__ = "nodes"
    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    instance_id: Mapped[str] = mapped_column(String(64))
    roles: Mapped[list[str]] = mapped_column(JSON)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    addrs: Mapped[list[str]] = mapped_column(JSON)
    protocol_version: Mapped[str] = mapped_column(String(16))
    software_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    heartbeats: Mapped[int] = mapped_column(Integer, default=0)


class RunRow(Base):
    """A run: its plan (JSON), where it stands, and how far its examples have been leased."""

    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    policy_version: Mapped[int] = mapped_column(Integer)
    cursor: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    deployed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stop_reason: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(128), default="")
    owner_key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class AdapterRow(Base):
    """A run's adapter version: the trainer's signed manifest frame, as it arrived, and the
    trainers that submitted the same manifest (its first holders)."""

    __tablename__ = "adapter_versions"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_hash: Mapped[str] = mapped_column(String(64))
    frame: Mapped[bytes] = mapped_column(LargeBinary)
    signers: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class ReportRow(Base):
    """A trainer's report of one round: rewards by sampled version, tokens trained, samples."""

    __tablename__ = "round_reports"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    trainer: Mapped[str] = mapped_column(String(128), primary_key=True)
    rewards: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    tokens_trained: Mapped[int] = mapped_column(Integer)
    samples: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)


class LedgerRow(Base):
    """One journal entry: ``tokens`` move from account ``debit`` to account ``credit``
    (``coordinator/billing.py``); ``(kind, ref)`` is unique, so nothing is posted twice."""

    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    debit: Mapped[str] = mapped_column(String(160), index=True)
    credit: Mapped[str] = mapped_column(String(160), index=True)
    tokens: Mapped[int] = mapped_column(Integer)
    ref: Mapped[str] = mapped_column(String(200))
    at: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("kind", "ref"),)


class LeaseRow(Base):
    """A lease as issued (``lease`` holds the exact encoded message) and what became of it."""

    __tablename__ = "leases"
    lease_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    node: Mapped[str] = mapped_column(String(128), index=True)
    lease: Mapped[bytes] = mapped_column(LargeBinary)
    issued_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    counted: Mapped[list[int]] = mapped_column(JSON)
    payload_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    trained_in: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class ReceiptRow(Base):
    """Every receipt received, with its outcome — duplicates and refusals included."""

    __tablename__ = "receipts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lease_id: Mapped[str] = mapped_column(String(128), index=True)
    run_id: Mapped[str] = mapped_column(String(128))
    node: Mapped[str] = mapped_column(String(128))
    payload_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    num_samples: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[float] = mapped_column(Float)


class TrustRow(Base):
    """A producer's audit record (``coordinator.audits.Trust`` as JSON)."""

    __tablename__ = "trust"
    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)


class AuditRow(Base):
    """An audit and where it stands."""

    __tablename__ = "audits"
    audit_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    lease_id: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str] = mapped_column(String(128))
    producer: Mapped[str] = mapped_column(String(128), index=True)
    payload_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    stage: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)


class VerdictRow(Base):
    """A verdict exactly as its verifier signed it: the evidence behind every penalty."""

    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    audit_id: Mapped[str] = mapped_column(String(64), index=True)
    verifier: Mapped[str] = mapped_column(String(128))
    passed: Mapped[bool] = mapped_column(Boolean)
    failed_check: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    frame: Mapped[bytes] = mapped_column(LargeBinary)
    at: Mapped[float] = mapped_column(Float)


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'coordinator.db'}"


def open_database(url: str) -> Engine:
    """The coordinator's engine, with its tables in place."""
    return protocol.service.database.open_database(url, Base.metadata)


class NodeStore:
    """Reads and writes node rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load_all(self) -> list[NodeRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(NodeRow)))

    def upsert(self, rows: list[NodeRow]) -> None:
        if not rows:
            return
        with Session(self.engine) as s, s.begin():
            for row in rows:
                s.merge(row)

    def delete(self, peer_ids: list[str]) -> None:
        if not peer_ids:
            return
        with Session(self.engine) as s, s.begin():
            s.execute(delete(NodeRow).where(NodeRow.peer_id.in_(peer_ids)))

    def touch(self, seen: dict[str, tuple[float, int, str]]) -> None:
        """Write ``last_seen``, heartbeat count and status for many nodes in one transaction."""
        if not seen:
            return
        with Session(self.engine) as s, s.begin():
            for peer_id, (last_seen, beats, status) in seen.items():
                row = s.get(NodeRow, peer_id)
                if row is not None:
                    row.last_seen, row.heartbeats, row.status = last_seen, beats, status


class WorkStore:
    """Reads and writes runs, leases and receipts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self) -> tuple[list[RunRow], list[LeaseRow]]:
        with Session(self.engine, expire_on_commit=False) as s:
            runs = list(s.scalars(select(RunRow).order_by(RunRow.created_at)))
            return runs, list(s.scalars(select(LeaseRow)))

    def load_adapters(self) -> list[AdapterRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(
                s.scalars(select(AdapterRow).order_by(AdapterRow.run_id, AdapterRow.version))
            )

    def load_reports(self) -> list[ReportRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(ReportRow).order_by(ReportRow.at)))

    def load_ledger(self) -> list[LedgerRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(LedgerRow).order_by(LedgerRow.id)))

    def load_audits(self) -> tuple[list[TrustRow], list[AuditRow], list[VerdictRow]]:
        with Session(self.engine, expire_on_commit=False) as s:
            return (
                list(s.scalars(select(TrustRow))),
                list(s.scalars(select(AuditRow).order_by(AuditRow.created_at))),
                list(s.scalars(select(VerdictRow).order_by(VerdictRow.id))),
            )

    def save(self, rows: Sequence[Base], receipts: Sequence[Base] = ()) -> None:
        """Merge rows (runs, leases, audits, trust) and append others (receipts, verdicts), in
        one transaction."""
        with Session(self.engine) as s, s.begin():
            for row in rows:
                s.merge(row)
            s.add_all(receipts)

    def receipts(self, lease_id: str) -> list[ReceiptRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            q = select(ReceiptRow).where(ReceiptRow.lease_id == lease_id).order_by(ReceiptRow.id)
            return list(s.scalars(q))
