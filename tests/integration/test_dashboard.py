"""The coordinator's dashboard in headless Chromium (Debian's ``chromium``), against a real
coordinator driven by in-process peers over the real protocols:

- a run whose trainer reported two rounds: the page lists the run, draws its reward curve (one
  point per version, rising) and shows its rollouts as text;
- a run with an honest producer, a producer that lies about its tokens, a verifier and a
  trainer: the page shows the run's tokens as claimed and as the coordinator counted them, the
  ledger (charges, earnings, the liar's forfeit refunded to the researcher, the run reconciled
  against the recount), every node's record, the liar's ban and the coordinator's conviction
  among the audits, and no known-answer results yet."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol.adapters import (
    LeaseCount,
    ManifestAck,
    ReportAck,
    RoundReport,
    SampleText,
    TrainAssignment,
    TrainRequest,
    TurnText,
    VersionRewards,
)
from protocol.payload_store import PayloadStore
from protocol.payloads import serve_payloads
from protocol.verification import AuditAssignment, AuditRequest, Verdict, VerdictAck
from protocol.versions import AUDITS
from tests.integration.cluster import Cluster
from tests.integration.peer import peer
from tests.integration.rounds import NO_REPLAYS, dealt_round, deliver, take_lease
from tests.integration.test_versions import ADAPTERS, manifest
from tests.wait import wait_until

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


TURNS = [TurnText("model", "8<|end|>"),
         TurnText("environment", "<|user|>higher<|end|><|assistant|>"),
         TurnText("model", "12<|end|>")]  # fmt: skip


def test_the_dashboard_shows_runs_curves_and_rollouts(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=30.0)  # the in-process trainer sends no heartbeats
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=1", *NO_REPLAYS])
        cluster.api("POST", "/v1/runs", json={"name": "r1", "rl": {"max_examples": 100},
                                              "verification": {"trusted_only": False}})  # fmt: skip

        async def main() -> None:
            async with peer(cluster.multiaddr) as trainer, peer(cluster.multiaddr) as producer:
                await trainer.join(["trainer"], "trainer")
                await producer.join(["inference"], "producer")
                store = PayloadStore(tmp_path / "producer")
                serve_payloads(producer.host, store)
                for version, (mean, text) in enumerate([(0.25, "7"), (0.75, "12")]):
                    # a round is reported once it made its version
                    await dealt_round(cluster, producer, store, [trainer])
                    made = await trainer.ask(ADAPTERS, manifest(version + 1, version))
                    assert isinstance(made, ManifestAck) and made.outcome == "recorded"
                    report = RoundReport(
                        run_id="r1", version=version,
                        rewards=[VersionRewards(version, 8, 8 * mean, 8 * mean)],
                        samples=[SampleText(version=version, prompt="<|user|>5 + 7 =",
                                            completion=text, reward=float(text == "12"),
                                            turns=TURNS if version else [])],
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
    assert len(rows) == 2 and any("<pre>7</pre>" in r for r in rows)
    assert "5 + 7 =" in rows[0]
    # an episode is shown turn by turn, the environment's apart from the model's
    episode = next(r for r in rows if "turn env" in r)
    turns = re.findall(r'<pre class="turn (model|env)"[^>]*>(.*?)</pre>', episode, re.S)
    assert [(by, html.unescape(t)) for by, t in turns] == [
        ("model", "8<|end|>"), ("env", "<|user|>higher<|end|><|assistant|>"),
        ("model", "12<|end|>"),
    ]  # fmt: skip


def cells(dom: str, table: str) -> list[list[str]]:
    """The text of every cell of a table's body rows, row by row."""
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, f"no table {table}"
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c))
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows]  # fmt: skip


def test_the_dashboard_shows_the_ledger_reputation_bans_and_audits(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, interval_s=30.0)  # in-process peers send no heartbeats
    try:
        # a round takes two rollouts; one confirmed failure bans
        cluster.start_coordinator(extra=["--leases.round_leases=2", "--audits.max_strikes=1",
                                         *NO_REPLAYS])  # fmt: skip
        spec = {"name": "r1", "env": {"name": "arith"},
                "rl": {"max_examples": 100, "prompts_per_lease": 1, "group_size": 2},
                "verification": {"trusted_only": False}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)

        def run() -> Any:
            return cluster.api("GET", "/v1/runs/r1")

        async def until(probe: Callable[[], object], what: str) -> None:
            await trio.to_thread.run_sync(lambda: wait_until(probe, 30, what=what))

        async def main() -> None:
            async with (
                peer(cluster.multiaddr) as honest, peer(cluster.multiaddr) as liar,
                peer(cluster.multiaddr) as verifier, peer(cluster.multiaddr) as trainer,
            ):  # fmt: skip
                await honest.join(["inference"], "honest")
                await liar.join(["inference"], "liar")
                await verifier.join(["verifier"], "verifier")
                await trainer.join(["trainer"], "trainer")
                stores = {p: PayloadStore(tmp_path / p) for p in ("honest", "liar")}
                serve_payloads(honest.host, stores["honest"])
                serve_payloads(liar.host, stores["liar"])

                # an honest rollout: the coordinator fetches its payload and confirms the count
                await deliver(honest, await take_lease(honest), stores["honest"])
                await until(lambda: run()["confirmed_tokens"] == 10, "the first recount")
                # the producer is new, so its rollout is audited: a verifier passes it
                a = await verifier.ask(AUDITS, AuditRequest(base_model="tiny"))
                assert isinstance(a, AuditAssignment) and a.producer == honest.identity.peer_id
                ok = await verifier.ask(AUDITS, Verdict(
                    audit_id=a.audit_id, lease_id=a.lease.lease_id, producer=a.producer,
                    payload_hash=a.payload_hash, passed=True,
                ))  # fmt: skip
                assert isinstance(ok, VerdictAck) and ok.outcome == "recorded"
                # the liar's first rollout is honest (and unaudited yet)
                await deliver(liar, await take_lease(liar), stores["liar"])
                await until(lambda: run()["confirmed_tokens"] == 20, "the second recount")

                # the trainer trains both, makes version 1 and reports: the round is billed
                share = await trainer.ask(ADAPTERS, TrainRequest(base_model="tiny"))
                assert isinstance(share, TrainAssignment) and len(share.rollouts) == 2
                ids = [r.lease.lease_id for r in share.rollouts]
                assert (await trainer.commit("r1", 0, ids)).accepted
                made = await trainer.ask(ADAPTERS, manifest(1, 0))
                assert isinstance(made, ManifestAck) and made.outcome == "recorded"
                report = RoundReport(
                    run_id="r1", version=0, rewards=[VersionRewards(0, 4, 2.0, 2.0)],
                    counts=[LeaseCount(r.lease.lease_id, 10) for r in share.rollouts], samples=[],
                )  # fmt: skip
                assert await trainer.ask(ADAPTERS, report) == ReportAck(recorded=True)

                # the liar claims 12 tokens for a payload of 10: convicted, banned, its paid
                # rollout quarantined and refunded to the researcher
                await deliver(liar, await take_lease(liar, 1), stores["liar"], claim=12)

                def refunded() -> bool:
                    books = cluster.api("GET", "/v1/ledger", params={"kind": "refund"})
                    return len(books["entries"]) == 1 and books["runs"][0]["reconciled"]

                await until(refunded, "the liar's refund")
                # an honest rollout whose payload the coordinator cannot fetch yet: claimed,
                # not confirmed
                await deliver(honest, await take_lease(honest, 1), None)
                await until(lambda: run()["claimed_tokens"] == 20, "the last receipt")

        trio.run(main)
        trust = cluster.api("GET", "/v1/trust")
        dom = render(f"{cluster.url}/#run=r1", tmp_path / "chromium")
    finally:
        cluster.stop_all()
    liar_id = next(n["peer_id"] for n in trust["nodes"] if n["name"] == "liar")

    # the run's tokens: claimed by receipts, confirmed by the coordinator's own count
    (r1,) = cells(dom, "runs")
    assert r1[6:8] == ["20", "10 (1 of 2 rollouts, 10 awaiting recount)"], r1

    # the ledger: what the run paid and got back, reconciled against the recount
    assert '<span id="books" class="ok">books reconciled</span>' in dom
    (bill,) = cells(dom, "bills")
    assert bill == ["r1", "researcher", "20", "20", "10", "30", "30", "20 / 20", "20",
                    "reconciled"], bill  # fmt: skip
    accounts = {row[0]: row[1:] for row in cells(dom, "accounts")}  # earned paid forfeited ...
    assert accounts["researcher (API key)"] == ["0", "40", "0", "10", "-30"]
    assert accounts["honest"] == ["10", "0", "0", "0", "10"]
    assert accounts["liar"] == ["10", "0", "10", "0", "0"]
    assert accounts["trainer"] == ["20", "0", "0", "0", "20"]
    assert accounts["verifier"] == ["10", "0", "0", "0", "10"]
    assert accounts["network"] == ["0", "10", "0", "0", "-10"]
    (refund,) = cells(dom, "refunds")
    assert refund[:4] == ["r1", "liar", "researcher (API key)", "10"]

    # reputation: the producer records, extra fields of a record shown by name
    reputation = {row[0]: row[1:] for row in cells(dom, "reputation")}
    # credited: what the coordinator confirmed (not the honest's last, unserved rollout)
    assert reputation["honest"][:8] == ["alive", "1.00", "1", "0", "0", "no", "10", "0"]
    assert "clean_streak: 1" in reputation["honest"][8]
    # the liar forfeits the credit it had: its confirmed rollout (10), not the lie (12)
    assert reputation["liar"][:8] == ["alive", "0.17", "0", "1", "1", "banned", "0", "10"]

    # the ban, convicted by the coordinator itself on the token count
    (ban,) = cells(dom, "bans")
    assert ban[:5] == ["liar", liar_id, "1", "token_count", "coordinator"]
    assert "receipt claims 12 completion tokens, payload holds 10" in ban[5]

    # audits, newest first: the coordinator's conviction, then the verifier's pass
    audits = [row[2:6] for row in cells(dom, "audits")]
    assert audits == [["liar", "coordinator", "token_count", "failed"],
                      ["honest", "verifier", "all passed", "passed"]], audits  # fmt: skip
    assert '<td class="coordinator">coordinator</td>' in dom
    assert cells(dom, "known-answers") == [["none yet"]]
