"""The researcher's run commands against a real coordinator process: submit a TOML spec (checked
locally first), list, status, cancel; a cancelled run gets no more leases, and stays cancelled
across a coordinator restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from protocol.leases import Lease, LeaseRequest, NoLease
from tests.conftest import REPO
from tests.integration.cluster import Cluster
from tests.integration.peer import LEASES, peer


def bazaar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bazaar", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_submit_list_status_cancel(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        url = ["--coordinator-url", cluster.url]
        done = bazaar("run", "submit", str(REPO / "examples" / "arith-tiny.toml"), *url)
        assert done.returncode == 0, done.stderr
        assert "arith-tiny" in done.stdout
        typo = tmp_path / "typo.toml"
        typo.write_text('name = "typo"\n[rl]\ngroup_sise = 4\n')
        refused = bazaar("run", "submit", str(typo), *url)
        assert refused.returncode == 2 and "rl.group_sise" in refused.stderr
        listed = json.loads(bazaar("run", "list", "--json", *url).stdout)
        assert [(r["id"], r["state"]) for r in listed] == [("arith-tiny", "running")]
        status = json.loads(bazaar("run", "status", "arith-tiny", "--json", *url).stdout)
        assert status["env"] == 'arith {"digits":1}' and status["group_size"] == 8
        assert status["versions"] == []
        assert "arith-tiny" in bazaar("run", "list", *url).stdout  # the table

        async def ask() -> object:
            async with peer(cluster.multiaddr) as node:
                await node.join(["inference"], "sampler")
                return await node.ask(LEASES, LeaseRequest(max_prompts=8, base_model="tiny"))

        assert isinstance(trio.run(ask), Lease)  # it hands out work until cancelled
        cancelled = bazaar("run", "cancel", "arith-tiny", *url)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        again = bazaar("run", "cancel", "arith-tiny", *url)
        assert again.returncode == 2 and "is cancelled" in again.stderr
        missing = bazaar("run", "status", "nope", *url)
        assert missing.returncode == 2 and "no run 'nope'" in missing.stderr
        assert isinstance(trio.run(ask), NoLease)  # a cancelled run hands out no work
        assert cluster.coordinator is not None
        cluster.coordinator.signal(signal.SIGTERM)
        cluster.coordinator.wait()
        cluster.start_coordinator()
        assert cluster.api("GET", "/v1/runs/arith-tiny")["state"] == "cancelled"
    finally:
        cluster.stop_all()
