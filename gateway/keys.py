"""API keys, budgets and usage records, in the gateway's database.

- **Keys** are random (``bz-`` + 32 url-safe bytes), shown once at creation and stored only as
  their SHA-256; a presented key is hashed, looked up, and compared with ``hmac.compare_digest``.
- **Budgets** are in tokens. Before a request is forwarded, its worst case (prompt + max tokens ×
  n) is *reserved* with one conditional ``UPDATE``: it succeeds only if used + reserved + the new
  reservation stays within the budget, so no number of concurrent requests — in one gateway
  process or several sharing a database — can overspend. After the response, the reservation is
  *settled*: released, and the tokens actually used (counted by the gateway with the model's
  tokenizer) are charged.
- **Usage**: every request writes a record (key, model, tokens, latency, node, status).

SQLAlchemy over SQLite (WAL) by default, PostgreSQL by URL (``protocol/database.py``).
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
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import protocol.database

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
    return protocol.database.open_database(url, Base.metadata)


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

    def reserve(self, key_id: int, tokens: int) -> bool:
        """Reserve ``tokens`` of the key's budget, atomically; False if they do not fit."""
        with Session(self.engine) as s, s.begin():
            q = update(KeyRow).where(KeyRow.id == key_id, KeyRow.revoked.is_(False))
            q = q.where(
                (KeyRow.budget_tokens.is_(None))
                | (KeyRow.used_tokens + KeyRow.reserved_tokens + tokens <= KeyRow.budget_tokens)
            )
            result = s.execute(q.values(reserved_tokens=KeyRow.reserved_tokens + tokens))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def settle(self, key_id: int, reserved: int, usage: UsageRow) -> None:
        """Release a reservation, charge what was used, and record the request, in one go."""
        used = usage.prompt_tokens + usage.completion_tokens
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(KeyRow)
                .where(KeyRow.id == key_id)
                .values(
                    reserved_tokens=KeyRow.reserved_tokens - reserved,
                    used_tokens=KeyRow.used_tokens + used,
                )
            )
            s.add(usage)

    def usage(self, key_id: int) -> list[UsageRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            q = select(UsageRow).where(UsageRow.key_id == key_id).order_by(UsageRow.id)
            return list(s.scalars(q))
