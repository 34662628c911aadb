"""The coordinator's hivemind DHT bootstrap peer (a child process): it starts and stops, and a
coordinator stopping while it still starts (a trainer asked for it a moment before) kills it
at once, instead of waiting out hivemind's start and then the child's exit."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from coordinator.hivemind_dht import DhtBootstrap
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_started_dht_names_its_addresses_and_stops() -> None:
    dht = DhtBootstrap()
    addrs = dht.start()
    pid = dht._proc.pid
    assert addrs and all("/p2p/" in a for a in addrs)
    t0 = time.monotonic()
    dht.close()
    assert time.monotonic() - t0 < 8
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_closing_a_dht_that_is_still_starting_kills_it_and_fails_the_start() -> None:
    dht = DhtBootstrap()
    failure: list[BaseException] = []

    def start() -> None:
        try:
            dht.start()
        except RuntimeError as e:
            failure.append(e)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()

    def started() -> int | None:  # the process object exists a moment before its pid
        proc = dht._proc
        return proc.pid if proc is not None else None

    pid = wait_until(started, 30, every_s=0.01, what="the DHT's child process")
    t0 = time.monotonic()
    dht.close()  # hivemind's start takes seconds: it has not answered yet
    closed_s = time.monotonic() - t0
    starter.join(30)
    assert not starter.is_alive() and failure, "the start did not end with a failure"
    assert not dht.addrs
    assert closed_s < 3, closed_s
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(RuntimeError, match="closed"):
        dht.start()  # a closed bootstrap starts nothing more
