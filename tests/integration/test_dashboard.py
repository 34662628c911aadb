"""The coordinator's dashboard in headless Chromium (Debian's ``chromium``): against a real
coordinator with a run whose trainer reported two rounds, the page lists the run, draws its
reward curve (one point per version, rising) and shows its rollouts as text."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from protocol.adapters import ReportAck, RoundReport, SampleText, VersionRewards
from tests.integration.cluster import Cluster
from tests.integration.peer import peer
from tests.integration.test_versions import ADAPTERS, manifest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")


def render(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (Chromium's virtual time lets the fetches finish)."""
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000"]  # fmt: skip
    cmd = [CHROMIUM, *flags, "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_dashboard_shows_runs_curves_and_rollouts(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=30.0)  # the in-process trainer sends no heartbeats
    try:
        cluster.start_coordinator()
        cluster.api("POST", "/v1/runs", json={"name": "r1", "rl": {"max_examples": 100}})

        async def main() -> None:
            async with peer(cluster.multiaddr) as trainer:
                await trainer.join(["trainer"], "trainer")
                for version, (mean, text) in enumerate([(0.25, "7"), (0.75, "12")]):
                    if version:  # the run must be at a version for its round to be reported
                        await trainer.ask(ADAPTERS, manifest(version, version - 1))
                    report = RoundReport(
                        run_id="r1", version=version,
                        rewards=[VersionRewards(version, 8, 8 * mean, 8 * mean)],
                        samples=[SampleText(version=version, prompt="<|user|>5 + 7 =",
                                            completion=text, reward=float(text == "12"))],
                    )  # fmt: skip
                    ack = await trainer.ask(ADAPTERS, report)
                    assert isinstance(ack, ReportAck) and ack.recorded

        trio.run(main)
        dom = render(f"{cluster.url}/#run=r1", tmp_path / "chromium")
    finally:
        cluster.stop_all()
    assert re.search(r'<tr class="run selected">\s*<td>r1</td>', dom), dom[:2000]
    assert "<td>trainer</td>" in dom  # the nodes table
    line = re.search(r'<polyline class="mean" points="([^"]+)"', dom)
    assert line, "no reward curve drawn"
    points = [tuple(map(float, p.split(","))) for p in line.group(1).split()]
    assert len(points) == 2 and points[1][1] < points[0][1]  # higher reward is higher up
    rows = re.findall(r'<tr class="rollout">(.*?)</tr>', dom, re.S)
    assert len(rows) == 2 and any("<pre>12</pre>" in r for r in rows)
    assert "5 + 7 =" in rows[0]
