"""``bazaar up``: a local network comes up, shows every node alive, and Ctrl+C stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(180)


def test_up_runs_a_network_and_ctrl_c_stops_every_process(home: Path) -> None:
    log = home.parent / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "bazaar", "up", "--nodes", "3"],
            cwd=REPO,
            env={**os.environ, "BAZAAR_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        info_file = home / "local" / "coordinator" / "coordinator.json"
        wait_until(info_file.exists, 60, what="the coordinator")
        url = json.loads(info_file.read_text())["http"]

        def all_alive() -> bool:
            nodes = httpx.get(f"{url}/v1/network/nodes", timeout=5).json()["data"]
            return len(nodes) == 3 and all(n["status"] == "alive" for n in nodes)

        wait_until(all_alive, 90, what="3 alive nodes")
        wait_until(lambda: "3/3 nodes alive" in log.read_text(), 30, what="the live table")
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    text = log.read_text()
    assert "stopped 4 processes cleanly" in text, text[-2000:]
    logs = home / "local" / "logs"
    for i in range(3):
        node_log = (logs / f"node-{i}.log").read_text()
        assert "said goodbye" in node_log, node_log[-2000:]
    coordinator_log = (logs / "coordinator.log").read_text()
    left = [line for line in coordinator_log.splitlines() if "-> left" in line]
    assert len(left) == 3, coordinator_log[-3000:]  # every node left at once, by goodbye
