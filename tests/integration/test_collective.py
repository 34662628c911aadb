"""The trainers' all-reduce on real hivemind peers (each in its own child process, on loopback):
every peer gets the same exact integer sum; a peer killed with -9 mid-round is dropped and the
round completes with the others; a trainer alone goes on alone; trainers find each other through
the coordinator's DHT, which leaves with the coordinator."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from node.training.collective import Collective, CollectiveSpec, RoundResult
from node.training.diloco import levels_for
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(240)
SIZE = 20_000


def _q(seed: int) -> np.ndarray:
    levels = levels_for(4)
    return np.random.default_rng(seed).integers(-levels, levels + 1, SIZE).astype(np.float32)


@pytest.fixture
def peers() -> Iterator[list[Collective]]:
    started: list[Collective] = []
    try:
        first = Collective(CollectiveSpec([], "run-test", SIZE, target_group_size=4,
                                          round_timeout_s=40))  # fmt: skip
        first.start()
        started.append(first)
        for _ in range(2):
            other = Collective(CollectiveSpec(first.visible_addrs, "run-test", SIZE,
                                              target_group_size=4, round_timeout_s=40))  # fmt: skip
            other.start()
            started.append(other)
        yield started
    finally:  # side by side: each close gives its child a moment to leave
        closing = [threading.Thread(target=c.close) for c in started]
        for t in closing:
            t.start()
        for t in closing:
            t.join()


def _round(
    peers: list[Collective],
    qs: list[np.ndarray],
    tags: list[str] | None = None,
    expected: int = 1,
    timeouts: list[float | None] | None = None,
) -> list[RoundResult | None]:
    results: list[RoundResult | None] = [None] * len(peers)
    tags = tags or [""] * len(peers)
    timeouts = timeouts or [None] * len(peers)

    def run(i: int) -> None:
        results[i] = peers[i].average(qs[i], tags[i], expected, timeout_s=timeouts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def test_every_trainer_gets_the_same_exact_sum(peers: list[Collective]) -> None:
    qs = [_q(i) for i in range(3)]
    results = _round(peers, qs)
    assert all(r is not None and r.group_size == 3 for r in results)
    assert len({_digest(r.integer_sum) for r in results if r is not None}) == 1  # bit for bit
    assert results[0] is not None and np.array_equal(results[0].integer_sum, sum(qs))
    again = _round(peers, [_q(10 + i) for i in range(3)])  # and the next round too
    assert len({_digest(r.integer_sum) for r in again if r is not None}) == 1


def test_a_trainer_killed_mid_round_is_dropped(peers: list[Collective]) -> None:
    qs = [_q(20 + i) for i in range(3)]
    doomed = peers[2]
    assert doomed._proc is not None
    doomed._conn.send(("average", qs[2]))  # it joins the round...
    os.kill(doomed._proc.pid, signal.SIGKILL)  # ...and dies in it
    results = _round(peers[:2], qs[:2])
    assert all(r is not None and r.group_size == 2 for r in results)
    assert results[0] is not None and results[1] is not None
    assert np.array_equal(results[0].integer_sum, qs[0] + qs[1])
    assert _digest(results[0].integer_sum) == _digest(results[1].integer_sum)
    pgid = doomed._proc.pid
    doomed.close()  # its hivemind daemon outlived it; closing ends the whole group

    def group_gone() -> bool:  # zombies aside: their reaping is up to this machine's init
        def alive(p: psutil.Process) -> bool:
            with contextlib.suppress(psutil.Error):
                return os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
            return False

        return not any(alive(p) for p in psutil.process_iter())

    wait_until(group_gone, 10, what="the killed trainer's hivemind processes gone")


def test_only_peers_of_the_same_round_average_together(peers: list[Collective]) -> None:
    qs = [_q(40), _q(41), _q(42)]
    # the third is a round ahead: the two of version 5 average, it ends alone at its timeout
    results = _round(peers, qs, tags=["r@5", "r@5", "r@6"], expected=2, timeouts=[None, None, 12])
    assert [r.group_size for r in results if r is not None] == [2, 2, 1]
    pair = qs[0] + qs[1]
    assert results[0] is not None and np.array_equal(results[0].integer_sum, pair)
    assert results[2] is not None and np.array_equal(results[2].integer_sum, qs[2])


def test_a_round_waits_for_the_group_it_expects(peers: list[Collective]) -> None:
    qs = [_q(50), _q(51), _q(52)]
    results: list[RoundResult | None] = [None] * 3

    def run(i: int) -> None:
        if i == 2:
            time.sleep(7)  # late, past the 5 s matchmaking window, within the 10 s patience
        results[i] = peers[i].average(qs[i], "r@1", 3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.group_size for r in results if r is not None] == [3, 3, 3]
    assert results[0] is not None and np.array_equal(results[0].integer_sum, sum(qs))


def test_trainers_dealt_a_round_alone_meet_while_both_work_on_it(peers: list[Collective]) -> None:
    """A round dealt to each of two live trainers as a group of one: each waits the trainer's
    ``LONE_WAIT_S``, long enough for one matchmaking window, so they meet though one comes
    2 s late; otherwise each signs its own manifest and the round conflicts."""
    from node.roles.trainer import LONE_WAIT_S

    qs = [_q(70), _q(71)]
    results: list[RoundResult | None] = [None] * 2

    def run(i: int) -> None:
        time.sleep(2.0 * i)
        results[i] = peers[i].average(qs[i], "lone@3", 1, timeout_s=LONE_WAIT_S)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.group_size for r in results if r is not None] == [2, 2]
    assert results[1] is not None and np.array_equal(results[1].integer_sum, qs[0] + qs[1])


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_the_wire_formats_are_exact_and_counted(wire: str) -> None:
    q, rounds = levels_for(2, wire), 3
    first = Collective(CollectiveSpec([], f"run-{wire}", SIZE, wire=wire))
    pair = [first]
    try:
        first.start()
        pair.append(Collective(CollectiveSpec(first.visible_addrs, f"run-{wire}", SIZE, wire=wire)))
        pair[1].start()
        for r in range(rounds):
            qs = [np.random.default_rng(60 + 2 * r + i).integers(-q, q + 1, SIZE)
                  .astype(np.float32) for i in range(2)]  # fmt: skip
            results = _round(pair, qs, tags=[f"w@{r}"] * 2, expected=2)
            assert all(x is not None and x.group_size == 2 for x in results)
            assert all(np.array_equal(x.integer_sum, qs[0] + qs[1]) for x in results if x)

        last = [-1]

        def settled() -> int | None:  # the last replies may still be on their way out
            now = sum(c.sent_bytes() for c in pair)
            stable, last[0] = now == last[0], now
            return now if stable else None

        total = wait_until(settled, 30, every_s=0.5, what="upload counters settled")
    finally:
        for c in pair:
            c.close()
    # a round: the vector goes out once (in parts to their reducers) and its average comes back
    # as deltas; 2 bytes a value with fp16, at most 1 (7 and 8 bits) with int8
    per_value = 2.0 if wire == "fp16" else 15 / 16
    expected_bytes = rounds * 2 * SIZE * per_value
    assert 0.95 * expected_bytes <= total <= 1.05 * expected_bytes, (total, expected_bytes)


def test_a_whole_group_starts_without_waiting_out_the_matchmaking_time() -> None:
    """Two trainers dealt a round of two meet and average as soon as both are there: the
    leader's target is the round's size, not the spec's (8), so the 60 s of matchmaking time
    are never waited out; waited out, every round took at least that."""
    spec = CollectiveSpec([], "run-whole", SIZE, target_group_size=8, matchmaking_s=60,
                          request_timeout_s=3, round_timeout_s=100)  # fmt: skip
    first = Collective(spec)
    pair = [first]
    try:
        first.start()
        pair.append(Collective(dataclasses.replace(spec, initial_peers=first.visible_addrs)))
        pair[1].start()
        for r in range(2):
            results = _round(pair, [_q(r), _q(r + 10)], tags=[f"whole@{r}"] * 2, expected=2)
            assert all(x is not None and x.group_size == 2 for x in results), results
            assert all(x.seconds < 30 for x in results if x), [x.seconds for x in results if x]
    finally:
        for c in pair:
            c.close()


def test_a_trainer_alone_goes_on_alone() -> None:
    alone = Collective(CollectiveSpec([], "run-alone", SIZE, round_timeout_s=4))
    try:
        alone.start()
        result = alone.average(_q(1))
        assert result.group_size == 1 and np.array_equal(result.integer_sum, _q(1))
    finally:
        alone.close()


def test_a_dht_whose_bootstrap_peers_are_gone_fails_to_start_and_leaves_nothing() -> None:
    """Its bootstrap peers restarting (a trainer's or the coordinator's DHT): the start fails
    with a clear error, for the trainer to try again on its next round, and no process of it
    is left behind."""
    gone = "/ip4/127.0.0.1/tcp/9/p2p/QmTzQ1JRkWErjk39mryYw2WVaphAZNAREyMchXzYQ7c15n"
    c = Collective(CollectiveSpec([gone], "run-gone", SIZE))
    with pytest.raises(RuntimeError, match="failed to start"):
        c.start()
    assert c._proc is not None
    pid = c._proc.pid
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
               15, what="the hivemind child gone")  # fmt: skip


def test_trainers_find_each_other_through_the_coordinators_dht(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        peers = cluster.api("GET", "/v1/network/hivemind")["initial_peers"]
        assert peers and all("/p2p/" in a for a in peers)
        assert cluster.api("GET", "/v1/network/hivemind")["initial_peers"] == peers  # one DHT
        trainers = [Collective(CollectiveSpec(peers, "run-dht", SIZE, round_timeout_s=40))
                    for _ in range(2)]  # fmt: skip
        try:
            for t in trainers:
                t.start()
            results = _round(trainers, [_q(30), _q(31)])
            assert [r.group_size for r in results if r is not None] == [2, 2]
        finally:
            for t in trainers:
                t.close()
        assert cluster.coordinator is not None
        pid = cluster.coordinator.pid
        dht_children = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        assert dht_children  # the DHT runs beside the coordinator, not in it
        cluster.coordinator.signal(signal.SIGTERM)
        assert cluster.coordinator.wait(20) == 0

        def alive(pid: int) -> bool:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            return False

        def gone() -> bool:
            return not any(alive(c) for c in dht_children)

        wait_until(gone, 15, what="the coordinator's hivemind processes gone")
    finally:
        cluster.stop_all()
