"""PostgreSQL by ``--db postgresql://...``: the coordinator's membership across a restart; the
gateway's keys, budget holds (exact under racing threads) and usage records across a restart."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import create_engine, text

from protocol.accounts import KeyStore, open_database
from tests.integration import postgres
from tests.integration.cluster import Cluster
from tests.integration.fake_node import FakeNode, Setup
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


def test_gateway_keys_holds_and_usage_live_in_postgresql(
    pg_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    store = KeyStore(open_database(pg_url))
    _, racing = store.create("racing", budget_tokens=1000)
    granted: list[bool] = []

    def hold(i: int) -> None:
        granted.append(store.hold(f"gw{i % 2}", racing.id, 30))  # list.append is atomic

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000 // 30  # PostgreSQL's row locks: exactly what fits
    assert store.release_all("gw0") + store.release_all("gw1") == 30 * sum(granted)

    secret, key = store.create("app", budget_tokens=5000)
    with FakeNode() as node:
        setup = Setup(Cluster(tmp_path), node, pg_url, tiny_model)
        try:
            setup.start_gateway()
            client = openai.OpenAI(base_url=f"{setup.url}/v1", api_key=secret, max_retries=0)
            answers = [client.completions.create(model="tiny", prompt="hi", max_tokens=2)
                       for _ in range(2)]  # fmt: skip
            totals = [a.usage.total_tokens for a in answers if a.usage is not None]
            assert setup.proc is not None
            setup.proc.signal(signal.SIGTERM)
            setup.proc.wait()
            setup.start_gateway()
            records = setup.usage(secret)
            assert [r["prompt_tokens"] + r["completion_tokens"] for r in records] == totals
        finally:
            setup.cluster.stop_all()
    (after,) = [k for k in store.all() if k.id == key.id]
    assert (after.used_tokens, after.reserved_tokens) == (sum(totals), 0)
    assert not (tmp_path / "gw" / "gateway.db").exists()  # not SQLite


def test_runs_leases_billing_and_the_lifecycle_live_in_postgresql(pg_url: str) -> None:
    """The coordinator's run, lease, report and ledger tables and the accounts tables in one
    PostgreSQL database (as compose.yaml has them): the billing and lifecycle tests, restarts
    included, against it."""
    from tests.unit import test_billing

    with postgres.database(pg_url, "billing") as url:
        test_billing.test_a_round_is_billed_to_the_owner_and_credited_to_who_moved_the_model(
            (url, url)
        )
    with postgres.database(pg_url, "budget") as url:
        test_billing.test_a_run_completes_cleanly_when_its_budget_is_spent((url, url))
    with postgres.database(pg_url, "lifecycle") as url:
        test_billing.test_lifecycle_queued_running_and_the_stop_rules((url, url))
