"""Benchmark: a live coordinator and node under a hostile peer, beside honest lease work.

A coordinator and an inference node (the real tiny model) run as processes; the node takes
leases of a long run and delivers rollouts. For ``T`` seconds nothing else happens (the
baseline); then for ``T`` seconds a hostile peer in this process mixes every attack the
transport has met, against both processes at once:

- malformed gossipsub frames (the 11 bytes that used to end a process) and seeded fuzz inputs
  at every layer (TCP, multistream-select, Noise, yamux, gossipsub, identify, ping, ours);
- request streams stalled part-way through a frame, hundreds at a time, on one connection and
  across several (each stream's release time is recorded);
- a yamux stream sent past its receive window, a multistream-select message declared at 1 GiB,
  connections that complete the handshake and leave;
- a Sybil joining with a fresh identity per request.

Metrics (bench-results/hostile.json):
  honest_lease_throughput_ratio  rollouts the honest node delivered per second, attack / baseline
  max_rss_growth_mb              largest growth of either process's memory over its baseline
  crashes                        processes that died
  stalled_stream_release_s_p99   p99 of the time the target took to let go of a stalled stream
  request_deadline_s             the configured read deadline (the goal is <= it + 1 s)
  plus the attack counts and the faults each process counted, by layer.

Run: ``python scripts/bench_hostile.py [--quick]`` (quick: 20 s a phase; full: 60 s).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from node.model.tiny import ensure_tiny_model  # noqa: E402
from protocol.errors import ProtocolError  # noqa: E402
from protocol.versions import MEMBERSHIP  # noqa: E402
from tests.adversarial import attacks as A  # noqa: E402
from tests.adversarial.fuzz_live import LAYERS  # noqa: E402
from tests.adversarial.inputs import inputs  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.integration.cluster import Cluster, Proc  # noqa: E402
from tests.integration.peer import peer  # noqa: E402

DEADLINE_S = 5.0
SPEC = {"name": "hostile", "env": {"name": "arith", "args": {"digits": 1}},
        "rl": {"max_examples": 1_000_000, "prompts_per_lease": 2, "group_size": 2,
               "max_tokens": 4}}  # fmt: skip


class Watch:
    """Resident memory of the processes, sampled while the attack runs."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.base = {p.name: A.rss_mb(p.pid) for p in procs}
        self.peak = dict(self.base)

    async def run(self) -> None:
        while True:
            for p in self.procs:
                if p.alive():
                    self.peak[p.name] = max(self.peak[p.name], A.rss_mb(p.pid))
            await trio.sleep(0.25)

    def growth(self, name: str | None = None) -> float:
        return max(self.peak[n] - self.base[n] for n in self.base if name in (None, n))


class Hostile:
    """Every attack, in loops, until cancelled; what it did is counted."""

    def __init__(self, coordinator: str, node: str, seed: int) -> None:
        self.targets = [coordinator, node]
        self.coordinator = coordinator
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.releases: list[float] = []

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._gossip)
            nursery.start_soon(self._fuzz)
            nursery.start_soon(self._stalls, 1, 200)
            nursery.start_soon(self._stalls, 4, 40)
            nursery.start_soon(self._floods)
            nursery.start_soon(self._sybil)

    async def _gossip(self) -> None:
        while True:
            for target in self.targets:
                await A.raw_protocol_stream(target, A.MESHSUB[1], b"\x0a\x0b\x0a\x09\x12\x07garb")
                self._count("malformed_gossip")
            await trio.sleep(0.2)

    async def _fuzz(self) -> None:
        sources = {layer: inputs(gen, self.rng) for layer, (gen, _) in LAYERS.items()}
        while True:
            for layer, (_, send) in LAYERS.items():
                target = self.rng.choice(self.targets)
                with trio.move_on_after(10):
                    await send(target, next(sources[layer]))
                self._count("fuzz_inputs")

    async def _stalls(self, connections: int, per_connection: int) -> None:
        while True:
            await self._attempt("stalls", self._stall_round, connections, per_connection)

    async def _stall_round(self, connections: int, per_connection: int) -> None:
        async with A.stall_across(
            self.coordinator, MEMBERSHIP, connections, per_connection,
            declared=16_000, sent=8_000,
        ) as stalls:  # fmt: skip
            with trio.move_on_after(DEADLINE_S + 10):
                while any(s.held for s in stalls):
                    await trio.sleep(0.1)
            for s in stalls:
                self.releases += [r for r in s.released_s if r is not None]
                self._count("stalled_streams", len(s.streams) + s.refused)

    async def _floods(self) -> None:
        while True:
            for target in self.targets:
                await A.yamux_overrun(target, 16, hold_s=0.5)
                await A.multistream_flood(target, 8)
                self._count("floods", 2)
                for _ in range(50):
                    await self._attempt("handshake_churn", self._handshake, target)

    async def _handshake(self, target: str) -> None:
        async with A.secured_session(target) as s:
            await s.write(A.yamux_frame(A.GO_AWAY, 0, 0, 0))

    async def _sybil(self) -> None:
        while True:
            await self._attempt("sybil_joins", self._join)
            await trio.sleep(0.05)

    async def _join(self) -> None:
        async with peer(self.coordinator) as p:
            await p.join(["inference"], name="sybil")

    async def _attempt(self, what: str, fn: Any, *args: Any) -> None:
        """One attack; the target refusing it (the point of the limits) is counted apart."""
        try:
            await fn(*args)
            self._count(what)
        except Exception as e:
            if not _refused(e):
                raise
            self._count(f"{what}_refused")
            await trio.sleep(0.1)


def _refused(e: BaseException) -> bool:
    if isinstance(e, BaseExceptionGroup):
        return all(_refused(x) for x in e.exceptions)
    return isinstance(e, (ProtocolError, OSError, trio.BrokenResourceError,
                          trio.ClosedResourceError, trio.TooSlowError))  # fmt: skip


def delivered(cluster: Cluster) -> float:
    return cluster.metric("bazaar_receipts_total", 'outcome="counted"')


def measure(cluster: Cluster, seconds: float) -> float:
    """Rollouts counted per second over ``seconds``."""
    start = delivered(cluster)
    time.sleep(seconds)  # the processes work meanwhile; nothing here to wait on
    return (delivered(cluster) - start) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s a phase instead of 60")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "hostile.json")
    args = parser.parse_args()
    # the attacker's own hosts log every stream the targets refuse: not what is measured
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    phase_s = 20.0 if args.quick else 60.0
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    cache = root / "cache"
    with console.status("building the tiny model (cached after the first run)"):
        ensure_tiny_model(cache)
    cluster = Cluster(root, interval_s=1.0)
    try:
        coordinator = cluster.start_coordinator(
            extra=[f"--transport.request_timeout_s={DEADLINE_S}"]
        )
        cluster.api("POST", "/v1/runs", json=SPEC)
        node = cluster.start_node(
            "honest",
            extra=[f"--model_cache={cache}", "--torch_threads=1",
                   f"--metrics-listen=127.0.0.1:{free_port()}",
                   f"--transport.request_timeout_s={DEADLINE_S}"],
        )  # fmt: skip
        cluster.wait_status({"honest": "alive"}, 60)
        node_addr = next(a for a in cluster.nodes()["honest"]["addrs"] if "/127." in a)
        with console.status("warming up: the node's first lease loads its model"):
            while delivered(cluster) < 5:
                time.sleep(0.5)
        with console.status(f"baseline: {phase_s:.0f} s of honest work"):
            baseline = measure(cluster, phase_s)

        watch = Watch([coordinator, node])
        hostile = Hostile(cluster.multiaddr, node_addr, args.seed)
        under_attack = 0.0

        async def attack() -> None:
            nonlocal under_attack
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run)
                nursery.start_soon(hostile.run)
                under_attack = await trio.to_thread.run_sync(measure, cluster, phase_s)
                nursery.cancel_scope.cancel()

        with console.status(f"under attack: {phase_s:.0f} s"):
            trio.run(attack)
        crashes = sum(not p.alive() for p in (coordinator, node))
        faults = (
            {} if coordinator.alive() is False else cluster.metric_lines("bazaar_peer_faults_total")
        )
    finally:
        cluster.stop_all()

    releases = sorted(hostile.releases) or [float("nan")]
    p99 = releases[min(len(releases) - 1, int(0.99 * len(releases)))]
    result: dict[str, Any] = {
        "honest_lease_throughput_ratio": round(under_attack / baseline, 3) if baseline else 0.0,
        "max_rss_growth_mb": round(watch.growth(), 1),
        "coordinator_rss_growth_mb": round(watch.growth("coordinator"), 1),
        "node_rss_growth_mb": round(watch.growth("honest"), 1),
        "crashes": crashes,
        "stalled_stream_release_s_p99": round(p99, 2),
        "request_deadline_s": DEADLINE_S,
        "baseline_rollouts_per_s": round(baseline, 2),
        "attack_rollouts_per_s": round(under_attack, 2),
        "stalled_stream_release_s_median": round(statistics.median(releases), 2),
        "phase_s": phase_s,
        **{f"attack_{k}": v for k, v in sorted(hostile.counts.items())},
        **{f"coordinator_faults_{_label(k)}": v for k, v in sorted(faults.items())},
    }
    table = Table(title="a hostile peer against a live coordinator and node")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("goal")
    goals = {"honest_lease_throughput_ratio": ">= 0.8", "max_rss_growth_mb": "<= 50",
             "crashes": "0", "stalled_stream_release_s_p99": f"<= {DEADLINE_S + 1:g}"}  # fmt: skip
    for k, v in result.items():
        table.add_row(k, f"{v}", goals.get(k, ""))
    console.print(table)
    write_result(args.out, result)


def _label(key: str) -> str:
    inner = key[key.index("{") + 1 : -1]
    return "_".join(part.split("=")[1].strip('"') for part in inner.split(","))


if __name__ == "__main__":
    main()
