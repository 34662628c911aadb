"""The researcher's run commands against a real coordinator process: submit a TOML spec (checked
locally first), list, status, logs (and following them), cancel; a cancelled run gets no more
leases, and stays cancelled across a coordinator restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.versions import LEASES
from tests.conftest import REPO
from tests.integration.cluster import Cluster
from tests.integration.peer import peer
from tests.wait import wait_until


def bazaar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bazaar", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_submit_list_status_cancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        monkeypatch.setenv("BAZAAR_API_KEY", cluster.api_key)  # the CLI bills runs to it
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
        follower = subprocess.Popen(
            [sys.executable, "-m", "bazaar", "run", "logs", "arith-tiny", "-f", *url], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        follower_lines: list[str] = []
        assert follower.stdout is not None
        reader = threading.Thread(target=lambda: follower_lines.extend(follower.stdout or []))
        reader.start()  # the follower prints lines as they come

        def followed(text: str) -> bool:
            return any(text in line for line in list(follower_lines))

        try:
            wait_until(lambda: followed("created"), 30, what="the follower's first line")
            assert not followed("cancelled")
            cancelled = bazaar("run", "cancel", "arith-tiny", *url)
            assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
            wait_until(lambda: followed("cancelled"), 30, what="a new line, followed")
        finally:
            follower.kill()
            reader.join(10)
        again = bazaar("run", "cancel", "arith-tiny", *url)
        assert again.returncode == 2 and "is cancelled" in again.stderr
        logs = bazaar("run", "logs", "arith-tiny", *url).stdout
        assert logs.index("run arith-tiny created") < logs.index("run arith-tiny cancelled")
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
