"""Opening a process's database: SQLAlchemy over SQLite (WAL) by default, PostgreSQL by URL.

The coordinator (membership, runs, leases, audits) and the gateway (keys, usage) each keep their
own database; both open it here, so the URL rules and SQLite settings are one piece of code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine


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
    return engine
