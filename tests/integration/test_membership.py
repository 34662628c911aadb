"""Membership with real processes on loopback: a coordinator process and node processes."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, interval_s=1.0, dead_after=3.0)
    yield c
    c.stop_all()


def _status_json(cluster: Cluster) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bazaar",
            "network",
            "status",
            "--coordinator-url",
            cluster.url,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_five_nodes_join_and_are_alive_in_network_status(cluster: Cluster) -> None:
    cluster.start_coordinator()
    roles = ["inference", "trainer", "verifier", "inference,verifier", "inference,trainer,verifier"]
    for i, r in enumerate(roles):  # the last one finds the coordinator from its REST URL
        cluster.start_node(f"n{i}", roles=r, coordinator=cluster.url if i == 4 else None)

    def all_alive() -> list[dict[str, object]] | None:
        rows = _status_json(cluster)
        return rows if len(rows) == 5 and all(r["status"] == "alive" for r in rows) else None

    rows = {r["name"]: r for r in wait_until(all_alive, 90, what="5 alive nodes")}
    assert rows["n4"]["roles"] == ["inference", "trainer", "verifier"]
    assert rows["n1"]["roles"] == ["trainer"]
    for r in rows.values():
        assert str(r["peer_id"]).startswith("12D3KooW")
        assert r["device"] == "cpu" and r["version"] and r["torch_version"] == "2.13.0+cpu"
        assert int(r["ram_bytes"]) > 0  # type: ignore[call-overload]
    # the human table names every node
    table = subprocess.run(
        [sys.executable, "-m", "bazaar", "network", "status", "--coordinator-url", cluster.url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(f"n{i}" in table for i in range(5)) and "alive" in table


def test_kill9_is_detected_dead_and_sigterm_leaves_at_once(cluster: Cluster) -> None:
    cluster.start_coordinator()
    victim, leaver, _witness = (cluster.start_node(n) for n in ("victim", "leaver", "witness"))
    cluster.wait_status({"victim": "alive", "leaver": "alive", "witness": "alive"}, 90)

    victim.signal(signal.SIGKILL)
    t0 = time.monotonic()
    cluster.wait_status({"victim": "dead"}, 30)
    detect_s = time.monotonic() - t0
    # dead after `dead_after` silent intervals, counted from the last beat (<= 1 interval ago)
    assert detect_s <= cluster.interval_s * cluster.dead_after + 1.0, detect_s

    leaver.signal(signal.SIGTERM)
    t0 = time.monotonic()
    cluster.wait_status({"leaver": "left"}, 10)
    assert time.monotonic() - t0 < cluster.interval_s * 1.5  # at once, not by missed beats
    assert leaver.wait(10) == 0
    assert "said goodbye" in leaver.output()
    assert cluster.statuses()["witness"] == "alive"


def test_coordinator_restart_recovers_from_database(cluster: Cluster) -> None:
    coord = cluster.start_coordinator()
    nodes = [cluster.start_node(f"r{i}") for i in range(3)]
    cluster.wait_status({f"r{i}": "alive" for i in range(3)}, 90)

    coord.signal(signal.SIGTERM)
    assert coord.wait(15) == 0
    db = sqlite3.connect(cluster.coordinator_home / "coordinator.db")
    rows = dict(db.execute("select name, status from nodes").fetchall())
    db.close()
    assert rows == {f"r{i}": "alive" for i in range(3)}

    cluster.start_coordinator()  # same ports, same key, same database
    before = {n: v["heartbeats"] for n, v in cluster.nodes().items()}
    assert set(before) == {"r0", "r1", "r2"}  # known before any node has spoken again

    def beating_again() -> bool:
        now = cluster.nodes()
        return all(
            now[n]["status"] == "alive" and now[n]["heartbeats"] > before[n] + 1 for n in before
        )

    rejoined = lambda: all("rejoined coordinator" in p.output() for p in nodes)  # noqa: E731
    wait_until(rejoined, 60, what="every node to rejoin by itself")
    wait_until(beating_again, 60, what="heartbeats after the restart")
    assert all(p.alive() for p in nodes)  # nobody was restarted


def test_second_process_with_the_same_identity_is_refused(cluster: Cluster) -> None:
    cluster.start_coordinator()
    first = cluster.start_node("first")
    cluster.wait_status({"first": "alive"}, 90)
    twin = cluster.start_node("twin", home=first.home)
    assert twin.wait(60) == 3
    assert "refused: duplicate_identity" in twin.output()
    assert "same key file" in twin.output()
    # the twin's dial (same peer id) can displace the first node's connection for a moment;
    # the first node reconnects by itself and remains the only node the coordinator knows
    cluster.wait_status({"first": "alive"}, 30)
    assert set(cluster.statuses()) == {"first"} and first.alive()


def test_a_node_killed_and_started_again_at_once_rejoins(cluster: Cluster) -> None:
    """A machine that crashed and came back: the coordinator has found the old instance overdue
    (suspect) but not dead (12 s of silence, here) and refuses the new one with a wait; the new
    one waits it out and joins, where it used to exit as a twin does."""
    cluster.dead_after = 12.0
    cluster.start_coordinator()
    crashed = cluster.start_node("crashy")
    cluster.wait_status({"crashy": "alive"}, 90)
    crashed.signal(signal.SIGKILL)
    crashed.wait()
    cluster.wait_status({"crashy": "suspect"}, 10)
    again = cluster.start_node("crashy", home=crashed.home)
    wait_until(lambda: "joining again in" in again.output(), 60, what="the refusal with a wait")
    wait_until(lambda: "joined coordinator" in again.output(), 60, what="the join after it")
    cluster.wait_status({"crashy": "alive"}, 30)
    assert again.alive() and set(cluster.statuses()) == {"crashy"}


def test_gossip_between_nodes_survives_a_coordinator_outage(cluster: Cluster) -> None:
    coord = cluster.start_coordinator()
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        cluster.start_node(f"g{i}", extra=["--metrics-listen", f"127.0.0.1:{port}"])
    cluster.wait_status({"g0": "alive", "g1": "alive"}, 90)
    url = f"http://127.0.0.1:{ports[0]}"
    beats = "bazaar_gossip_accepted_total"
    label = 'type="membership.heartbeat"'
    wait_until(lambda: cluster.metric(beats, label, url) >= 2, 30, what="g0 hears g1")

    coord.signal(signal.SIGTERM)
    assert coord.wait(15) == 0
    heard = cluster.metric(beats, label, url)
    wait_until(
        lambda: cluster.metric(beats, label, url) >= heard + 3, 30, what="beats without coordinator"
    )
    assert cluster.metric("bazaar_coordinator_connected", url=url) == 0
