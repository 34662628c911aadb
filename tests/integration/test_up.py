"""``bazaar up`` end to end, as a user runs it: a coordinator, a gateway and three nodes as real
processes train the demo run (1-digit additions on the tiny model), deploy it and serve it. The
test then checks what the issue promises: the reward improved by a clear margin (measured
through the gateway with ``bazaar eval``, base and adapter on the same examples and seeds), the
adapter answers through the gateway with the official ``openai`` client, the ledger reconciles
exactly, and Ctrl+C leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from protocol.accounts import KeyStore, open_database
from tests.conftest import REPO
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(420)


def bazaar(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bazaar", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})  # fmt: skip


def test_up_trains_deploys_serves_bills_and_stops_cleanly(home: Path, tiny_model: Path) -> None:
    log = home.parent / "up.log"
    cache = tiny_model.parent.parent
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "bazaar", "up", "--nodes", "3", "--rounds", "24",
             "--model-cache", str(cache)],
            cwd=REPO, env={**os.environ, "BAZAAR_HOME": str(home)}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    local = home / "local"
    try:
        result_file = local / "demo-result.json"
        wait_until(lambda: result_file.exists() or up.poll(), 300,
                   what="the demo run trained, deployed, answering and evaluated")  # fmt: skip
        text = log.read_text()
        assert up.poll() is None, text[-3000:]
        gateway = re.search(r"gateway (http://[\d.:]+)", text)
        coordinator = re.search(r"coordinator (http://[\d.:]+)", text)
        assert gateway and coordinator, text[:2000]
        key = (local / "demo-key").read_text().strip()
        assert (local / "demo-key").stat().st_mode & 0o077 == 0  # the secret is the user's only

        # the adapter answers through the gateway, metered to the key
        client = openai.OpenAI(base_url=f"{gateway[1]}/v1", api_key=key, max_retries=0)
        assert {"tiny", "arith-tiny", "arith-tiny@24"} <= {m.id for m in client.models.list().data}
        done = client.chat.completions.create(
            model="arith-tiny", messages=[{"role": "user", "content": "3 + 4 ="}], max_tokens=8
        )
        assert done.choices[0].message.content and done.usage and done.usage.total_tokens > 0

        # the reward improved by a clear margin, measured through the gateway by the demo
        # itself (200 held-out examples, base and adapter on the same seeds), shown as a table
        demo = json.loads(result_file.read_text())
        assert demo["run"] == "arith-tiny" and demo["version"] == 24, demo
        base, tuned = demo["eval"]["tiny"], demo["eval"]["arith-tiny"]
        margin = (base["ci95"] ** 2 + tuned["ci95"] ** 2) ** 0.5
        assert tuned["mean"] - base["mean"] > max(margin, 0.1), demo
        assert re.search(r"difference\s+│\s+\+0\.\d+ ± 0\.\d+", text), text[-3000:]
        # and `bazaar eval --compare` finds the same through the CLI
        evaluated = bazaar("eval", "--gateway-url", gateway[1], "--env", "arith", "--env-args",
                           '{"digits": 1}', "--model", "arith-tiny", "--compare", "-n", "100",
                           "--max-tokens", "8", "--json", BAZAAR_API_KEY=key)  # fmt: skip
        assert evaluated.returncode == 0, evaluated.stderr
        scores = json.loads(evaluated.stdout)
        assert scores["arith-tiny"]["mean"] > scores["tiny"]["mean"], scores

        # the run was billed to the demo key, and every total reconciles exactly
        books = bazaar("ledger", "--json", "--coordinator-url", coordinator[1])
        assert books.returncode == 0, books.stdout[-2000:]
        ledger = json.loads(books.stdout)
        (bill,) = ledger["runs"]
        assert bill["run"] == "arith-tiny" and bill["owner"] == "demo-1" and bill["charged"] > 0
        assert bill["charged"] == bill["recounted"] == bill["key_usage"]
        assert ledger["reconciled"] and ledger["balance_sum"] == 0
        accounts = KeyStore(open_database(f"sqlite:///{local / 'coordinator' / 'gateway.db'}"))
        (demo,) = accounts.all()
        # the key paid the run and every request (the chat completions and the evaluation)
        assert demo.used_tokens > bill["charged"]
        assert sum(u.completion_tokens + u.prompt_tokens for u in accounts.usage(demo.id)) == (
            demo.used_tokens
        )

        # the gateway was admitted at the coordinator, by name, and is the one admitted
        listed = bazaar("gateway", "list", "--json", BAZAAR_HOME=str(local / "coordinator"))
        admitted = json.loads(listed.stdout)
        assert [(g["name"], g["revoked_at"]) for g in admitted] == [("local", None)], listed

        # an honest network never meets the admission limits, nor counts a peer fault
        metrics = httpx.get(f"{coordinator[1]}/metrics", timeout=5).text
        assert "rate_limited" not in metrics, metrics
        assert "bazaar_peer_faults_total{" not in metrics, metrics

        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 5  # coordinator, gateway, 3 nodes (and their helpers)
        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0
    finally:
        if up.poll() is None:
            up.kill()
    text = log.read_text()
    assert "stopped 5 processes cleanly" in text, text[-3000:]
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]  # nothing left behind, helpers included
    logs = local / "logs"
    for i in range(3):
        node_log = (logs / f"node-{i}.log").read_text()
        assert "said goodbye" in node_log, node_log[-2000:]
    coordinator_log = (logs / "coordinator.log").read_text()
    left = [line for line in coordinator_log.splitlines() if "-> left" in line]
    assert len(left) == 3, coordinator_log[-3000:]  # every node left at once, by goodbye


@pytest.mark.parametrize("death", ["ctrl-c-with-its-output-gone", "sigkill"])
def test_up_leaves_nothing_behind_however_it_dies(home: Path, tiny_model: Path, death: str) -> None:
    """``bazaar up | tee log`` and Ctrl+C: ``tee`` dies first, and ``bazaar up``'s output breaks
    as it stops — it must stop every process anyway. Killed outright (SIGKILL), it stops none:
    each of its processes must notice and stop by itself."""
    read, write = os.pipe()
    up = subprocess.Popen(
        [sys.executable, "-m", "bazaar", "up", "--nodes", "2", "--rounds", "1000",
         "--model-cache", str(tiny_model.parent.parent)],
        cwd=REPO, env={**os.environ, "BAZAAR_HOME": str(home)}, stdout=write,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.close(write)
    try:
        seen = b""
        with os.fdopen(read, "rb", buffering=0) as output:
            while b"submitted" not in seen and up.poll() is None:
                seen += output.read(4096) or b""
            assert up.poll() is None, seen.decode()[-3000:]
            logs = home / "local" / "logs"
            wait_until(lambda: all("joined coordinator" in (logs / f"node-{i}.log").read_text()
                                   for i in range(2)), 120, what="both nodes joined")  # fmt: skip
            family = psutil.Process(up.pid).children(recursive=True)
            assert len(family) >= 4, family  # coordinator, gateway, 2 nodes (and their helpers)
        # the pipe's reader is gone (``tee`` went first): whatever bazaar up writes next breaks
        if death == "sigkill":
            up.kill()
        else:
            up.send_signal(signal.SIGINT)
        up.wait(90)
    finally:
        if up.poll() is None:
            up.kill()
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    if death != "sigkill":  # stopped in order: each node's goodbye reached the coordinator
        for i in range(2):
            assert "said goodbye" in (logs / f"node-{i}.log").read_text()
