"""API keys, budgets and usage records: the accounts the gateway meters requests to and the
coordinator bills runs to, in one database both open (the gateway's; a shared PostgreSQL URL
when they run on different machines).

- **Keys** are random (``bz-`` + 32 url-safe bytes), shown once at creation and stored only as
  their SHA-256; a presented key is hashed, looked up, and compared with ``hmac.compare_digest``.
- **Budgets** are in tokens. A gateway process *holds* part of a key's budget: ``hold`` moves
  tokens into ``reserved_tokens`` with one conditional ``UPDATE`` that succeeds only if used +
  reserved + the new hold stays within the budget, so the holds of any number of gateway
  processes sharing the database never add up to more than the budget. Each gateway's holds are
  also written per gateway name (``budget_holds``), in the same transaction, so a restarted
  gateway gives back what its previous run held (``release_all``). Requests are reserved
  against a hold in the gateway's memory (``gateway/budgets.py``).
- **Settlement** charges the tokens a request used (counted by the gateway with the model's
  tokenizer) out of the gateway's hold, and records the request, in one transaction.
- **Usage**: every request writes a record (key, model, tokens, latency, node, status). The
  coordinator holds and settles a run's charges the same way, under the holder name
  ``run:<id>``, with one usage record per charge (model ``run:<id>``), and a negative one for
  each refund.

SQLAlchemy over SQLite (WAL) by default, PostgreSQL by URL (``protocol/service/database.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import protocol.service.database

KEY_PREFIX = "bz-"


class Base(DeclarativeBase):
    pass


class KeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    budget_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    used_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class UsageRow(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    node: Mapped[str] = mapped_column(String(128))
    status: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class HoldRow(Base):
    """Tokens of a key's budget held by one gateway process (part of the key's reserved)."""

    __tablename__ = "budget_holds"
    gateway: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    tokens: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class Bill:
    """One request's usage record, and how much of it comes out of the gateway's hold."""

    key_id: int
    charged: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    node: str
    status: int
    created_at: float

    def row(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in _USAGE_FIELDS}


_USAGE_FIELDS = ("key_id", "model", "prompt_tokens", "completion_tokens", "latency_ms", "node",
                 "status", "created_at")  # fmt: skip


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    budget_tokens: int | None
    used_tokens: int
    reserved_tokens: int
    rpm: int | None
    tpm: int | None
    revoked: bool

    @classmethod
    def of(cls, row: KeyRow) -> ApiKey:
        return cls(
            row.id, row.name, row.budget_tokens, row.used_tokens, row.reserved_tokens, row.rpm,
            row.tpm, row.revoked,
        )  # fmt: skip


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def open_database(url: str) -> Engine:
    """The gateway's engine, with its tables in place."""
    return protocol.service.database.open_database(url, Base.metadata)


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        name: str,
        budget_tokens: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: ``(the secret, shown only now, its record)``. ``ValueError`` if the name
        is taken."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            if s.scalar(select(KeyRow).where(KeyRow.name == name)) is not None:
                raise ValueError(f"a key named {name!r} already exists")
            row = KeyRow(
                name=name, key_hash=hash_key(secret), budget_tokens=budget_tokens, rpm=rpm,
                tpm=tpm, used_tokens=0, reserved_tokens=0, revoked=False, created_at=time.time(),
            )  # fmt: skip
            s.add(row)
        return secret, ApiKey.of(row)

    def all(self) -> list[ApiKey]:
        with Session(self.engine) as s:
            return [ApiKey.of(r) for r in s.scalars(select(KeyRow).order_by(KeyRow.id))]

    def revoke(self, name: str) -> bool:
        with Session(self.engine) as s, s.begin():
            result = s.execute(update(KeyRow).where(KeyRow.name == name).values(revoked=True))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def authenticate(self, presented: str) -> ApiKey | None:
        """The live key matching ``presented``, or None (unknown, malformed or revoked)."""
        if not presented.startswith(KEY_PREFIX):
            return None
        digest = hash_key(presented)
        with Session(self.engine) as s:
            row = s.scalar(select(KeyRow).where(KeyRow.key_hash == digest))
            if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked:
                return None
            return ApiKey.of(row)

    def hold(self, gateway: str, key_id: int, tokens: int) -> bool:
        """Move ``tokens`` of the key's budget into ``gateway``'s hold, atomically; False if
        they do not fit (or the key is revoked or gone)."""
        with Session(self.engine) as s, s.begin():
            q = update(KeyRow).where(KeyRow.id == key_id, KeyRow.revoked.is_(False))
            q = q.where(
                (KeyRow.budget_tokens.is_(None))
                | (KeyRow.used_tokens + KeyRow.reserved_tokens + tokens <= KeyRow.budget_tokens)
            )
            result = s.execute(q.values(reserved_tokens=KeyRow.reserved_tokens + tokens))
            if not result.rowcount:  # type: ignore[attr-defined]
                return False
            self._change_hold(s, gateway, key_id, tokens)
            return True

    def release(self, gateway: str, key_id: int, tokens: int) -> None:
        """Give ``tokens`` of ``gateway``'s hold back to the key's budget."""
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(KeyRow)
                .where(KeyRow.id == key_id)
                .values(reserved_tokens=KeyRow.reserved_tokens - tokens)
            )
            self._change_hold(s, gateway, key_id, -tokens)

    def release_all(self, gateway: str) -> int:
        """Give back everything ``gateway`` holds (its previous run's holds, at start); returns
        the tokens given back."""
        with Session(self.engine) as s, s.begin():
            holds = list(s.scalars(select(HoldRow).where(HoldRow.gateway == gateway)))
            for h in holds:
                s.execute(
                    update(KeyRow)
                    .where(KeyRow.id == h.key_id)
                    .values(reserved_tokens=KeyRow.reserved_tokens - h.tokens)
                )
                s.delete(h)
            return sum(h.tokens for h in holds)

    def holds(self, gateway: str) -> dict[int, int]:
        with Session(self.engine) as s:
            rows = s.scalars(select(HoldRow).where(HoldRow.gateway == gateway))
            return {h.key_id: h.tokens for h in rows if h.tokens}

    def settle(self, gateway: str, bill: Bill) -> None:
        """Charge a request's tokens — ``bill.charged`` of them out of ``gateway``'s hold (0 for
        a key without a budget) — and record the request, in one transaction."""
        self.settle_many(gateway, [bill])

    def settle_many(self, gateway: str, bills: list[Bill]) -> None:
        """``settle`` for several requests, in one transaction (SQLAlchemy Core: a bill is a
        few statements, not a unit of work of ORM objects)."""
        used: dict[int, int] = {}
        charged: dict[int, int] = {}
        for b in bills:
            used[b.key_id] = used.get(b.key_id, 0) + b.prompt_tokens + b.completion_tokens
            charged[b.key_id] = charged.get(b.key_id, 0) + b.charged
        with self.engine.begin() as conn:
            for key_id in used:
                conn.execute(
                    update(KeyRow)
                    .where(KeyRow.id == key_id)
                    .values(
                        reserved_tokens=KeyRow.reserved_tokens - charged[key_id],
                        used_tokens=KeyRow.used_tokens + used[key_id],
                    )
                )
                if charged[key_id]:  # a hold row exists: the tokens were held before
                    conn.execute(
                        update(HoldRow)
                        .where(HoldRow.gateway == gateway, HoldRow.key_id == key_id)
                        .values(tokens=HoldRow.tokens - charged[key_id])
                    )
            conn.execute(insert(UsageRow), [b.row() for b in bills])

    def refund(self, key_id: int, tokens: int, model: str, node: str) -> None:
        """Give back ``tokens`` the key was charged (a cheat's forfeited work), with a usage
        record of minus those tokens, so the records still add up to what the key used."""
        with self.engine.begin() as conn:
            conn.execute(
                update(KeyRow)
                .where(KeyRow.id == key_id)
                .values(used_tokens=KeyRow.used_tokens - tokens)
            )
            conn.execute(insert(UsageRow), [{
                "key_id": key_id, "model": model, "prompt_tokens": 0,
                "completion_tokens": -tokens, "latency_ms": 0.0, "node": node, "status": 200,
                "created_at": time.time(),
            }])  # fmt: skip

    @staticmethod
    def _change_hold(s: Session, gateway: str, key_id: int, delta: int) -> None:
        row = s.get(HoldRow, (gateway, key_id))
        if row is None:
            s.add(HoldRow(gateway=gateway, key_id=key_id, tokens=delta))
        else:
            row.tokens += delta

    def usage(self, key_id: int) -> list[UsageRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            q = select(UsageRow).where(UsageRow.key_id == key_id).order_by(UsageRow.id)
            return list(s.scalars(q))

    def usage_tokens(self, key_id: int, model: str) -> int:
        """All tokens the key's usage records for ``model`` count."""
        with Session(self.engine) as s:
            q = select(
                func.coalesce(func.sum(UsageRow.prompt_tokens + UsageRow.completion_tokens), 0)
            )
            return int(s.scalar(q.where(UsageRow.key_id == key_id, UsageRow.model == model)) or 0)
