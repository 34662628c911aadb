"""Opening a process's database: SQLAlchemy over SQLite (WAL) by default, PostgreSQL by URL.

The coordinator (membership, runs, leases, audits) and the gateway (keys, usage) each keep their
own database; both open it here, so the URL rules and SQLite settings are one piece of code.

A database an earlier version made gets the columns added since (``ALTER TABLE ... ADD COLUMN``
with the column's default, logged), so an upgrade loses no state. Only additions are automatic:
a new column that needs a value no default gives, or a changed or removed one, is an error that
names it. (A migration tool, Alembic, earns its keep once schema changes are more than additions;
until then it would be a second description of every table.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)


class SchemaError(RuntimeError):
    """The database was made by another version in a way that cannot be upgraded in place."""


def open_database(url: str, metadata: MetaData) -> Engine:
    """An engine with ``metadata``'s tables in place; SQLite gets WAL and a busy timeout.

    ``postgresql://`` means the psycopg 3 driver (SQLAlchemy's plain scheme means psycopg2).
    """
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    metadata.create_all(engine)
    _add_missing_columns(engine, metadata)
    return engine


def _add_missing_columns(engine: Engine, metadata: MetaData) -> None:
    """Add the columns ``metadata`` has and the database's tables lack (an earlier version's)."""
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = _add_column(engine, table.name, column)
            with engine.begin() as conn:
                conn.execute(text(ddl))
            log.warning("database upgraded: %s", ddl)


def _add_column(engine: Engine, table: str, column: Column[Any]) -> str:
    """``ALTER TABLE`` adding ``column``, its default filling the existing rows."""
    kind = column.type.compile(dialect=engine.dialect)
    default = getattr(column.default, "arg", None)
    if callable(default) or (default is None and not column.nullable):
        raise SchemaError(
            f"the database's table {table!r} lacks column {column.name!r}, which needs a value "
            "for the rows already there: start from a fresh database, or migrate it by hand"
        )
    if default is None:
        return f"ALTER TABLE {table} ADD COLUMN {column.name} {kind}"
    literal = column.type.literal_processor(engine.dialect)
    value = literal(default) if literal is not None else repr(default)
    return f"ALTER TABLE {table} ADD COLUMN {column.name} {kind} DEFAULT {value}"
