"""The coordinator on PostgreSQL: ``--db postgresql://...`` holds membership across a restart."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration import postgres
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(180)
_why = postgres.unavailable_reason()


@pytest.fixture
def pg_url() -> Iterator[str]:
    if _why is not None:
        pytest.skip(reason=f"needs a PostgreSQL server: {_why}")
    with postgres.postgres_server() as url:
        yield url


def test_coordinator_state_lives_in_postgresql(pg_url: str, tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        coord = cluster.start_coordinator(extra=["--db", pg_url])
        node = cluster.start_node("pg-node")
        cluster.wait_status({"pg-node": "alive"}, 90)
        # alive comes with the join; wait for a heartbeat too, so there is one to persist
        wait_until(lambda: cluster.nodes()["pg-node"]["heartbeats"] >= 1, 30, what="a beat")
        assert not (cluster.coordinator_home / "coordinator.db").exists()  # not SQLite
        coord.signal(signal.SIGTERM)
        assert coord.wait(15) == 0
        engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            rows = conn.execute(text("select name, status, heartbeats from nodes")).all()
        engine.dispose()
        assert [(r[0], r[1]) for r in rows] == [("pg-node", "alive")] and rows[0][2] >= 1
        cluster.start_coordinator(extra=["--db", pg_url])
        assert cluster.statuses() == {"pg-node": "alive"}  # restored before the node speaks
        before = cluster.nodes()["pg-node"]["heartbeats"]
        wait_until(lambda: cluster.nodes()["pg-node"]["heartbeats"] > before + 1, 60, what="beats")
        assert node.alive()
    finally:
        cluster.stop_all()
