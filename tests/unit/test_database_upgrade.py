"""A database an earlier version made opens with the columns added since, its rows intact; one
that cannot be upgraded in place is a clear error that names the column."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text

from coordinator.db import Trust, open_database
from protocol.service.database import SchemaError
from protocol.service.database import open_database as open_with


def test_an_earlier_coordinator_database_gains_the_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    open_database(url).dispose()
    old = create_engine(url)
    with old.begin() as db:  # as a version before verifier pay and confirmed credit made it
        db.execute(text("ALTER TABLE trust DROP COLUMN verified_forfeited_tokens"))
        db.execute(text("ALTER TABLE trust DROP COLUMN replays_passed"))
        db.execute(text("ALTER TABLE adapter_versions DROP COLUMN revoked"))
        db.execute(text("ALTER TABLE leases DROP COLUMN recounted_tokens"))
        db.execute(text("INSERT INTO trust (peer_id, clean_streak, passed, failed, strikes, "
                        "banned, credited_tokens, forfeited_tokens, known_right, known_wrong, "
                        "agreed, outvoted, verifier_strikes, verified_tokens) "
                        "VALUES ('p', 3, 3, 0, 0, 0, 640, 0, 0, 0, 0, 0, 0, 12)"))  # fmt: skip
    old.dispose()

    engine = open_database(url)
    with engine.connect() as db:
        row = db.execute(select(Trust.__table__)).mappings().one()
        columns = set(db.execute(text("SELECT * FROM leases LIMIT 0")).keys())
    assert row["peer_id"] == "p" and row["credited_tokens"] == 640  # kept
    assert row["verified_forfeited_tokens"] == 0 and row["replays_passed"] == 0  # added
    assert "recounted_tokens" in columns


def test_a_column_no_default_can_fill_is_an_error_naming_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    before = MetaData()
    Table("things", before, Column("id", Integer, primary_key=True))
    open_with(url, before).dispose()
    after = MetaData()
    Table("things", after, Column("id", Integer, primary_key=True),
          Column("name", String(16), nullable=False))  # fmt: skip
    with pytest.raises(SchemaError, match="'things' lacks column 'name'"):
        open_with(url, after)
