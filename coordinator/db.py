"""The coordinator's entities, each defined once: a dataclass that is also its table.

SQLAlchemy's dataclass mapping makes every entity one class: the coordinator keeps the objects
in memory (``coordinator/state.py``) and one long-lived session tracks what changed, so a
handler changes objects and commits, and never lists what it touched. Messages inside an
entity are stored as they travel: a lease as its exact encoded bytes, a run's plan as JSON.

Tables: ``nodes`` (membership), ``runs``, ``leases`` (each with the exact lease a node was
given), ``receipts`` (every receipt received, with its outcome: the audit trail of what was
counted), ``audits`` and ``verdicts`` (each with the verifier's signed frame; known-answer
audits among them), ``trust`` (each node's record as a producer and as a verifier),
``adapter_versions``, ``round_reports``, the ``ledger``, and ``gateways`` (the gateways
admitted to serving nodes, ``coordinator/gateways.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import msgspec
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
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    mapped_column,
    relationship,
)
from sqlalchemy.types import TypeDecorator

import protocol.service.database
from protocol.codec import decode_struct, encode_struct
from protocol.leases import Lease
from protocol.runs import RunPlan


class Base(MappedAsDataclass, DeclarativeBase):
    pass


class LeaseColumn(TypeDecorator[Lease]):
    """A lease, stored as the exact bytes the node was sent."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Lease | None, dialect: Dialect) -> bytes | None:
        return None if value is None else encode_struct(value)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> Lease | None:
        return None if value is None else decode_struct(value, Lease, "stored lease")


class PlanColumn(TypeDecorator[RunPlan]):
    """A run's plan, stored as JSON."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: RunPlan | None, dialect: Dialect) -> Any:
        return None if value is None else msgspec.to_builtins(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> RunPlan | None:
        return None if value is None else msgspec.convert(value, RunPlan)


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


class RunState(Base):
    """A run: its plan, where it stands, and how far its examples have been leased."""

    __tablename__ = "runs"
    plan: Mapped[RunPlan] = mapped_column(PlanColumn)
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True, init=False)
    """The plan's run id (the key)."""
    policy_version: Mapped[int] = mapped_column(Integer, default=0)
    cursor: Mapped[int] = mapped_column(Integer, default=0)
    """The next never-leased example index."""
    state: Mapped[str] = mapped_column(String(16), default="running")
    """queued → running → completed | failed | cancelled."""
    stop_reason: Mapped[str] = mapped_column(Text, default="")
    """Why it is no longer running: ``max_examples``, ``max_rounds``, ``target_reward``,
    ``budget``, ``cancelled``, or what made it fail."""
    owner: Mapped[str] = mapped_column(String(128), default="")
    """The name of the API key that submitted it (billed for it); empty on an open network."""
    owner_key_id: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    """Tokens of counted rollouts: what the run is billed for on the rollout side."""
    created_at: Mapped[float] = mapped_column(Float, default=0.0)
    deployed: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    """The adapter version served as model ``<run>`` (``bazaar run deploy``)."""

    def __post_init__(self) -> None:
        self.run_id = self.plan.run_id


class LeaseState(Base):
    """A lease as issued and what became of it."""

    __tablename__ = "leases"
    lease: Mapped[Lease] = mapped_column(LeaseColumn)
    node: Mapped[str] = mapped_column(String(128), index=True)
    issued_at: Mapped[float] = mapped_column(Float)
    lease_id: Mapped[str] = mapped_column(String(64), primary_key=True, init=False)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True, init=False)
    status: Mapped[str] = mapped_column(String(16), default="active")
    """active | completed | expired | rejected | quarantined | unconfirmed (its payload never
    reached the coordinator)."""
    counted: Mapped[list[int]] = mapped_column(JSON, default_factory=list)
    """The examples this lease's receipt delivered first (what the run counts). Replaced,
    never changed in place (the session sees assignments)."""
    payload_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), default=None)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completed_at: Mapped[float | None] = mapped_column(Float, default=None)
    trained_in: Mapped[int | None] = mapped_column(Integer, default=None)
    """The round (the version trained from) whose trainers were dealt this rollout."""
    trained_by: Mapped[str | None] = mapped_column(String(128), default=None)
    """The trainer whose share of that round it was."""
    recounted_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    """The completion tokens the coordinator counted in the payload itself
    (``coordinator/recount.py``); None until it has."""
    rewards: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    """Every sample's reward as the coordinator recomputed it with the environment (None: not
    scored here, for want of the base model's tokenizer)."""
    audit: Mapped[str] = mapped_column(String(16), default="")
    """Its audit: empty when none was drawn, then pending → passed | failed."""

    def __post_init__(self) -> None:
        self.lease_id, self.run_id = self.lease.lease_id, self.lease.run_id

    @property
    def confirmed(self) -> bool:
        """The receipt's token count is what the payload holds, as counted by the coordinator."""
        return self.recounted_tokens is not None and self.recounted_tokens == self.completion_tokens


class ReceiptRow(Base):
    """Every receipt received, with its outcome — duplicates and refusals included."""

    __tablename__ = "receipts"
    lease_id: Mapped[str] = mapped_column(String(128), index=True)
    run_id: Mapped[str] = mapped_column(String(128))
    node: Mapped[str] = mapped_column(String(128))
    payload_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    num_samples: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[float] = mapped_column(Float)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, init=False)


class Trust(Base):
    """A node's audit record: as a producer (its work audited) and as a verifier (its verdicts
    scored against known answers and majorities); one ban for both."""

    __tablename__ = "trust"
    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    clean_streak: Mapped[int] = mapped_column(Integer, default=0)
    passed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    strikes: Mapped[int] = mapped_column(Integer, default=0)
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    credited_tokens: Mapped[int] = mapped_column(Integer, default=0)
    """Completion tokens of its counted rollouts: what it is credited for."""
    forfeited_tokens: Mapped[int] = mapped_column(Integer, default=0)
    known_right: Mapped[int] = mapped_column(Integer, default=0)
    """Known-answer audits it answered right."""
    known_wrong: Mapped[int] = mapped_column(Integer, default=0)
    """Known-answer audits it answered wrong: a known cheat passed, a known-honest one failed."""
    agreed: Mapped[int] = mapped_column(Integer, default=0)
    """Its verdicts that agreed with the decision of their audit."""
    outvoted: Mapped[int] = mapped_column(Integer, default=0)
    """Its verdicts outvoted by the decision of their audit (marks)."""
    verifier_strikes: Mapped[int] = mapped_column(Integer, default=0)
    verified_tokens: Mapped[int] = mapped_column(Integer, default=0)
    """Tokens of the checks it was credited for, less those forfeited."""
    verified_forfeited_tokens: Mapped[int] = mapped_column(Integer, default=0)
    """Credit for checks it forfeited to the network with its strikes."""
    replays_passed: Mapped[int] = mapped_column(Integer, default=0)
    """Its rounds as a trainer that a replay confirmed (``coordinator/replays.py``)."""

    @property
    def reputation(self) -> float:
        """In (0, 1]: 1 for a producer never caught; each confirmed failure weighs five passes."""
        return (self.passed + 1) / (self.passed + 1 + 5 * self.failed)

    @property
    def verifier_reputation(self) -> float:
        """In (0, 1]: 1 for a verifier never wrong; a wrong known answer weighs five right
        verdicts, an outvoted one two."""
        right = self.known_right + self.agreed + 1
        return right / (right + 5 * self.known_wrong + 2 * self.outvoted)

    def view(self) -> dict[str, Any]:
        """The producer's record, with the verifier's under ``verifier``."""
        record = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name != "peer_id" and f.name not in VERIFIER_FIELDS}  # fmt: skip
        verifier = {name: getattr(self, name) for name in VERIFIER_FIELDS}
        verifier["reputation"] = round(self.verifier_reputation, 4)
        return {**record, "reputation": round(self.reputation, 4), "verifier": verifier}


VERIFIER_FIELDS = ("known_right", "known_wrong", "agreed", "outvoted", "verifier_strikes",
                   "verified_tokens", "verified_forfeited_tokens")  # fmt: skip
"""The fields of ``Trust`` that are a verifier's record."""


class VerdictRecord(Base):
    """A verdict exactly as its verifier signed it: the evidence behind every penalty."""

    __tablename__ = "verdicts"
    verifier: Mapped[str] = mapped_column(String(128))
    passed: Mapped[bool] = mapped_column(Boolean)
    failed_check: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    frame: Mapped[bytes] = mapped_column(LargeBinary)
    """The verdict exactly as the verifier signed it."""
    at: Mapped[float] = mapped_column(Float)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.audit_id"), index=True, init=False)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, init=False)


class Audit(Base):
    """An audit of one lease's rollout and where it stands: a real audit, or a known-answer
    audit that re-sends a decided one's payload to check its verifier."""

    __tablename__ = "audits"
    audit_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    lease_id: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str] = mapped_column(String(128))
    producer: Mapped[str] = mapped_column(String(128), index=True)
    payload_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[float] = mapped_column(Float)
    stage: Mapped[str] = mapped_column(String(16), default="first")
    """first (no verdict that counts yet) | confirm (a further look: a failure's confirmation,
    a split's tie-break, a double-check)."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending | assigned | passed | cleared (passed by majority over a failed verdict) |
    failed | cancelled; a known answer: assigned | right | wrong | cancelled."""
    verifier: Mapped[str] = mapped_column(String(128), default="")
    deadline: Mapped[float] = mapped_column(Float, default=0.0)
    verdicts: Mapped[list[VerdictRecord]] = relationship(
        default_factory=list, lazy="selectin", order_by=VerdictRecord.id
    )
    known_answer: Mapped[str] = mapped_column(String(8), default="")
    """Empty for a real audit; ``pass`` or ``fail``: a known-answer audit and its answer."""
    dtype: Mapped[str] = mapped_column(String(16), default="")
    """The dtype the payload's receipt declared it was made in (empty: none declared): only a
    verifier that can replay it is handed the audit."""
    device: Mapped[str] = mapped_column(String(128), default="")
    """The device class the payload's receipt declared (empty: none, or one no verifier can
    generate on again exactly): verifiers of that class are handed the audit first."""
    reference: Mapped[str] = mapped_column(String(64), default="")
    """A known answer's: the decided audit whose payload it re-sends."""
    quorum: Mapped[int] = mapped_column(Integer, default=1)
    """Passes that decide it when no verdict failed: 1, or 2 when drawn for a double-check."""
    current_version: Mapped[int | None] = mapped_column(Integer, default=None)
    """The run's version when the audit was first handed out (None before); every look, and
    every known answer made of it, is judged against the same window."""
    max_staleness: Mapped[int] = mapped_column(Integer, default=0)
    decided_at: Mapped[float | None] = mapped_column(Float, default=None)

    def seen_by(self) -> set[str]:
        return {v.verifier for v in self.verdicts}


class AdapterRow(Base):
    """A run's adapter version: the trainer's signed manifest frame, as it arrived, and the
    trainers that submitted the same manifest (its first holders)."""

    __tablename__ = "adapter_versions"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_hash: Mapped[str] = mapped_column(String(64))
    frame: Mapped[bytes] = mapped_column(LargeBinary)
    signers: Mapped[list[str]] = mapped_column(JSON)
    """Replaced, never changed in place (the session sees assignments)."""
    created_at: Mapped[float] = mapped_column(Float)
    parent: Mapped[int] = mapped_column(Integer, default=-1)
    """The version its round was trained from (-1: from an earlier database, ``version - 1``)."""
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    """Withdrawn by a rollback: a failed replay touched the rounds that made it."""

    def trained_from(self) -> int:
        return self.parent if self.parent >= 0 else self.version - 1


class CommitmentRow(Base):
    """A trainer's commitment to its part of a round, before the all-reduce: the hash of the
    signed part it serves, and the dealt rollouts it trained on, in order."""

    __tablename__ = "round_commitments"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    trainer: Mapped[str] = mapped_column(String(128), primary_key=True)
    part_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    lease_ids: Mapped[list[str]] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)
    history: Mapped[dict[str, list[str]]] = mapped_column(JSON, default_factory=dict)
    """Every part it committed to for the round (a round trained again after a conflict has
    one per try), by hash (hex): the rollouts each was trained on. A manifest names the parts
    it averages; a late one may name a co-trainer's part of the try before. Replaced, never
    changed in place."""


class ReplayRow(Base):
    """A replay audit of one trainer's round: the version (or the proposal) it made, the parts
    its group committed, and the verdicts so far."""

    __tablename__ = "replay_audits"
    audit_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    round: Mapped[int] = mapped_column(Integer)
    parent: Mapped[int] = mapped_column(Integer)
    """The version the round's starting version was trained from (-1: none)."""
    made: Mapped[int] = mapped_column(Integer)
    """The version the round made; -1 for a proposal that conflicted (none made)."""
    trainer: Mapped[str] = mapped_column(String(128), index=True)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    """The manifest frame the trainer signed for the round."""
    parts: Mapped[list[list[str]]] = mapped_column(JSON)
    """``[trainer, part hash hex]`` of every part the manifest averaged (its ``group``), the
    trainer's first."""
    lease_ids: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    signers: Mapped[list[str]] = mapped_column(JSON, default_factory=list)
    """Who signed the manifest: a version several signed that fails only the sum check names
    none of them."""
    status: Mapped[str] = mapped_column(String(16), default="open")
    """open | assigned | passed | failed | cancelled."""
    verifier: Mapped[str] = mapped_column(String(128), default="")
    deadline: Mapped[float] = mapped_column(Float, default=0.0)
    verdicts: Mapped[list[list[Any]]] = mapped_column(JSON, default_factory=list)
    """``[verifier, passed, failed check, stats]`` of each verdict; replaced, never changed in
    place."""


class ReportRow(Base):
    """A trainer's report of one round: rewards by sampled version, samples, its counts."""

    __tablename__ = "round_reports"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    trainer: Mapped[str] = mapped_column(String(128), primary_key=True)
    rewards: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    samples: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)
    counts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default_factory=list)
    """The trainer's signed count of each payload it fetched: ``{"lease_id", "tokens"}``."""


class LedgerRow(Base):
    """One journal entry: ``tokens`` move from account ``debit`` to account ``credit``
    (``coordinator/billing.py``); ``(kind, ref)`` is unique, so nothing is posted twice."""

    __tablename__ = "ledger"
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    debit: Mapped[str] = mapped_column(String(160), index=True)
    credit: Mapped[str] = mapped_column(String(160), index=True)
    tokens: Mapped[int] = mapped_column(Integer)
    ref: Mapped[str] = mapped_column(String(200))
    at: Mapped[float] = mapped_column(Float)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, init=False)
    __table_args__ = (UniqueConstraint("kind", "ref"),)


class GatewayRow(Base):
    """A gateway admitted to the serving nodes (``bazaar gateway admit``): the routes and
    serving tokens are for it alone. Its secret is kept only as a SHA-256."""

    __tablename__ = "gateways"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    admitted_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When it was revoked; None while it is admitted."""


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'coordinator.db'}"


def open_database(url: str) -> Engine:
    """The coordinator's engine, with its tables in place."""
    return protocol.service.database.open_database(url, Base.metadata)


class NodeStore:
    """Reads and writes node rows (membership keeps its nodes in memory as ``NodeState`` and
    writes heartbeats in batches; see ``coordinator/membership.py``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load_all(self) -> list[NodeRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(NodeRow)))

    def upsert(self, rows: Sequence[NodeRow]) -> None:
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
