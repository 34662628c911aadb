"""The lease protocol against a real coordinator process, from in-process peers.

Leases go only to live members with the inference role and the run's base model; a node holds at
most ``max_active_per_node`` leases; receipts are typed outcomes (wrong node, size, version,
unknown lease), counted once however often they are resent, and every one is in the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db import ReceiptRow, default_url, open_database
from protocol.errors import RemoteError
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.rollouts import ReceiptAck, RolloutReceipt
from protocol.versions import LEASES
from tests.integration.cluster import Cluster
from tests.integration.peer import peer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, interval_s=5.0)  # in-process peers do not heartbeat: a long interval
    yield c
    c.stop_all()


def receipt(lease: Lease, *, samples: int | None = None, version: int = 0) -> RolloutReceipt:
    return RolloutReceipt(
        lease_id=lease.lease_id,
        run_id=lease.run_id,
        policy_version=version,
        payload_hash=hashlib.sha256(lease.lease_id.encode()).digest(),
        num_samples=len(lease.example_indices) * lease.group_size if samples is None else samples,
        completion_tokens=40,
    )


def test_runs_api_validates_specs_with_openai_style_errors(cluster: Cluster) -> None:
    cluster.start_coordinator()
    url = f"{cluster.url}/v1/runs"
    auth = {"Authorization": f"Bearer {cluster.api_key}"}
    spec = {"name": "r1", "env": {"name": "sort", "seed": 3}, "rl": {"max_examples": 64}}
    created = httpx.post(url, json=spec, headers=auth).json()
    assert created["id"] == "r1" and created["env"] == "sort" and created["state"] == "running"
    assert created["owner"] == "researcher"
    cases = [
        ({"env": {"name": "nope"}}, 400, "invalid_run", "unknown environment 'nope'"),
        ({"env": {"name": "arith", "args": {"digitz": 2}}}, 400, "invalid_run", "bad arguments"),
        ({"rl": {"group_size": 0}}, 400, "invalid_request", "group_size"),
        ({"name": "bad id!"}, 400, "invalid_request", "name"),
        ({"colour": "red"}, 400, "invalid_request", "colour"),
        ({"rl": {"loss": {"clip": 1}}}, 400, "invalid_request", "clip"),
        ({"name": "r1"}, 409, "run_exists", "already exists"),
    ]
    for body, status, code, text in cases:
        resp = httpx.post(url, json=body, headers=auth)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert error["code"] == code and text in error["message"], (body, error)
    missing = httpx.get(f"{url}/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
    assert [r["id"] for r in cluster.api("GET", "/v1/runs")["data"]] == ["r1"]  # nothing else


def test_runs_api_takes_the_researchers_key(cluster: Cluster) -> None:
    cluster.start_coordinator()
    url = f"{cluster.url}/v1/runs"
    spec = {"name": "r1", "rl": {"max_examples": 8}}
    other, _ = cluster.create_key("other")
    spent, _ = cluster.create_key("spent", budget_tokens=0)
    refusals = [
        (None, 401, "missing_api_key"),
        ("bz-not-a-key", 401, "invalid_api_key"),
        (spent, 402, "insufficient_quota"),
    ]
    for key, status, code in refusals:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.post(url, json=spec, headers=headers)
        assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text
    assert cluster.api("GET", "/v1/runs")["data"] == []  # nothing was created
    assert cluster.api("POST", "/v1/runs", json=spec)["owner"] == "researcher"
    for path in ("/v1/runs/r1/cancel", "/v1/runs/r1/deploy"):
        resp = httpx.post(f"{cluster.url}{path}", json={} if "deploy" in path else None,
                          headers={"Authorization": f"Bearer {other}"})  # fmt: skip
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_run_owner"
    assert cluster.api("GET", "/v1/runs/r1")["state"] == "running"  # untouched
    assert cluster.api("POST", "/v1/runs/r1/cancel")["state"] == "cancelled"
    cluster.accounts().revoke("researcher")  # a revoked key submits nothing more
    resp = httpx.post(
        url, json={"name": "r2"}, headers={"Authorization": f"Bearer {cluster.api_key}"}
    )
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_leases_and_receipts_over_the_wire(cluster: Cluster) -> None:
    cluster.start_coordinator()
    spec = {"name": "r1", "env": {"name": "arith"},
            "rl": {"max_examples": 4, "prompts_per_lease": 2, "group_size": 2}}  # fmt: skip
    cluster.api("POST", "/v1/runs", json=spec)
    ask = LeaseRequest(max_prompts=8, base_model="tiny")
    acks: list[ReceiptAck] = []

    async def main() -> None:
        async with (
            peer(cluster.multiaddr) as outsider,
            peer(cluster.multiaddr) as trainer,
            peer(cluster.multiaddr) as a,
            peer(cluster.multiaddr) as b,
        ):
            with pytest.raises(RemoteError, match=r"not_member.*join first"):
                await outsider.ask(LEASES, ask)
            await trainer.join(["trainer"], "trainer")
            with pytest.raises(RemoteError, match=r"forbidden.*inference role"):
                await trainer.ask(LEASES, ask)
            await a.join(["inference"], "a")
            await b.join(["inference"], "b")
            other_model = LeaseRequest(max_prompts=8, base_model="another-model")
            assert isinstance(await a.ask(LEASES, other_model), NoLease)

            first = await a.ask(LEASES, ask)
            assert isinstance(first, Lease)
            assert first.example_indices == [0, 1] and first.group_size == 2  # capped by the run
            for bad_sender, bad in [
                (b, receipt(first)),
                (a, receipt(first, samples=3)),
                (a, receipt(first, version=7)),
                (a, msgspec.structs.replace(receipt(first), lease_id="no-such-lease")),
                (a, receipt(first)),
                (a, receipt(first)),  # resent: a duplicate, not counted again
            ]:
                ack = await bad_sender.ask(LEASES, bad)
                assert isinstance(ack, ReceiptAck)
                acks.append(ack)

            second = await a.ask(LEASES, ask)
            assert isinstance(second, Lease) and second.example_indices == [2, 3]
            assert isinstance(await b.ask(LEASES, ask), NoLease)  # every example is out
            with pytest.raises(RemoteError, match="unknown_type"):
                await a.ask(LEASES, NoLease())

    trio.run(main)
    outcomes = [(ack.outcome, ack.counted_examples) for ack in acks]
    assert outcomes == [
        ("wrong_node", 0), ("wrong_size", 0), ("wrong_version", 0), ("unknown_lease", 0),
        ("counted", 2), ("duplicate", 0),
    ]  # fmt: skip
    run = cluster.api("GET", "/v1/runs/r1")
    assert run["examples_delivered"] == 2 and run["completion_tokens"] == 40
    assert run["examples_leased"] == 4 and run["active_leases"] == 1
    rollouts = cluster.api("GET", "/v1/runs/r1/rollouts")["data"]
    assert len(rollouts) == 1 and rollouts[0]["counted_examples"] == [0, 1]
    assert rollouts[0]["producer_addrs"]  # where a consumer dials the producer
    assert cluster.metric("bazaar_receipts_total", 'outcome="duplicate"') == 1
    assert cluster.metric("bazaar_requests_refused_total", 'reason="not_member"') == 1
    assert cluster.metric("bazaar_requests_refused_total", 'reason="forbidden"') == 1

    # every receipt is in the database file, with its outcome
    cluster.stop_all()
    engine = open_database(default_url(cluster.coordinator_home))
    lease_id = rollouts[0]["lease_id"]
    with Session(engine) as db:
        q = select(ReceiptRow.outcome).where(ReceiptRow.lease_id == lease_id)
        stored = list(db.scalars(q.order_by(ReceiptRow.id)))
    assert stored == ["wrong_node", "wrong_size", "wrong_version", "counted", "duplicate"]


def test_a_node_holds_at_most_max_active_leases(cluster: Cluster) -> None:
    cluster.start_coordinator(extra=["--leases.max_active_per_node=2"])
    cluster.api("POST", "/v1/runs", json={"name": "big", "rl": {"max_examples": 100}})
    ask = LeaseRequest(max_prompts=4, base_model="tiny")

    async def main() -> None:
        async with peer(cluster.multiaddr) as hoarder, peer(cluster.multiaddr) as other:
            await hoarder.join(["inference"], "hoarder")
            await other.join(["inference"], "other")
            held = [await hoarder.ask(LEASES, ask) for _ in range(3)]
            assert [type(m) for m in held] == [Lease, Lease, NoLease]
            assert isinstance(await other.ask(LEASES, ask), Lease)  # others still get work
            done = held[0]
            assert isinstance(done, Lease)
            ack = await hoarder.ask(LEASES, receipt(done))
            assert isinstance(ack, ReceiptAck) and ack.outcome == "counted"
            assert isinstance(await hoarder.ask(LEASES, ask), Lease)  # a slot is free again

    trio.run(main)
