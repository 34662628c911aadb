"""Benchmark: membership and gossip at N = 8, 16, 32 nodes (in-process py-libp2p hosts).

The main process runs the real ``Coordinator`` (SQLite database, REST API); the N real
``NodeAgent``s, each with its own py-libp2p host on loopback, are spread over one worker process
per core (a single process would serialize all N nodes' gossip work on one core and measure that
instead). Times cross processes as ``time.time()``, one clock on one machine. Per N it measures:

  join_visible_p50_s / _p99_s   node start -> alive at the coordinator (nodes start staggered)
  gossip_p50_ms / gossip_p99_ms one signed heartbeat frame, published by a node, until each other
                                node has verified and accepted it (every hop runs the gate)
  raw_gossip_p50_ms / _p99_ms   the baseline, same hosts, same run: raw bytes on a topic with no
                                validation; gossip_p99_vs_raw_ratio compares the two
  failure_detect_s              a node killed without goodbye -> marked dead (also in intervals)
  heartbeat_bytes_per_node_s    loopback bytes per node per second while only membership traffic
                                flows (heartbeats, gossipsub control, keepalives: the real cost)

Goals: join visible <= 2 s p99 and gossip p99 <= 500 ms at 32 nodes; detection <= 3 intervals.
The flat JSON keys for the goals are the N=32 values; every N is also recorded with a suffix.

Run: ``python scripts/bench_membership.py [--quick]``
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import trio
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from coordinator.config import CoordinatorConfig, MembershipConfig  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402
from node.agent import MEMBERSHIP, NodeAgent  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.model.probe import probe_machine  # noqa: E402
from protocol.envelope import seal  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.membership import Heartbeat  # noqa: E402

RAW_TOPIC = "/bazaar/bench-raw/1.0.0"
console = Console()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def wait_for(cond: Any, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while not cond():
            await trio.sleep(0.01)


# -- worker processes: each runs a share of the node agents on its own core ------------------


def worker_main(conn: Any, coordinator_addrs: list[str], interval_s: float) -> None:
    """Runs node agents on command from the main process; reports times as ``time.time()``."""
    logging.basicConfig(level=logging.ERROR)
    caps = probe_machine(["inference"])
    agents: dict[str, NodeAgent] = {}
    scopes: dict[str, trio.CancelScope] = {}
    got: dict[bytes, dict[str, float]] = {}  # probe key -> receiver -> time received

    async def run_agent(agent: NodeAgent, scope: trio.CancelScope) -> None:
        with scope:
            await agent.run(trio.Event())

    def wrap(agent: NodeAgent) -> None:
        gate_accept = agent.gate.accept

        def accept(fwd: str, data: bytes) -> Any:
            env = gate_accept(fwd, data)
            if env is not None and isinstance(env.message, Heartbeat) and env.message.seq >= PROBE:
                got.setdefault(env.nonce, {})[agent.name] = time.time()
            return env

        agent.gate.accept = accept  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            while True:
                cmd, *args = await trio.to_thread.run_sync(conn.recv)
                if cmd == "start":
                    (name,) = args
                    agent = NodeAgent(
                        NodeConfig(name=name, listen="/ip4/127.0.0.1/tcp/0"),
                        Identity.generate(),
                        caps,
                        coordinator_addrs,
                    )
                    wrap(agent)
                    agents[name], scopes[name] = agent, trio.CancelScope()
                    conn.send((agent.identity.peer_id, time.time()))
                    nursery.start_soon(run_agent, agent, scopes[name])
                elif cmd == "raw_topic":
                    for agent in agents.values():

                        def raw(fwd: str, data: bytes, me: str = agent.name) -> bytes:
                            if data.startswith(b"probe"):
                                got.setdefault(data, {})[me] = time.time()
                            return data

                        await agent.host.subscribe(RAW_TOPIC, raw)
                    conn.send("ok")
                elif cmd == "meshed":
                    conn.send(
                        all(
                            len(a.host.gossip_peers(t)) >= 2
                            for a in agents.values()
                            for t in (MEMBERSHIP, RAW_TOPIC)
                        )
                    )
                elif cmd == "probe":
                    name, nonce, k = args
                    src = agents[name]
                    frame = seal(src.identity, Heartbeat(seq=PROBE + k, uptime_s=1.0), nonce=nonce)
                    t_sent = time.time()
                    await src.host.publish(MEMBERSHIP, frame)
                    conn.send(t_sent)
                elif cmd == "raw_probe":
                    name, raw_bytes = args
                    t_sent = time.time()
                    await agents[name].host.publish(RAW_TOPIC, raw_bytes)
                    conn.send(t_sent)
                elif cmd == "kill":
                    scopes[args[0]].cancel()
                    conn.send(time.time())
                elif cmd == "report":
                    conn.send(got)
                elif cmd == "stop":
                    nursery.cancel_scope.cancel()
                    conn.send("bye")
                    return

    trio.run(main)


PROBE = 1 << 40
"""Heartbeat ``seq`` values at or above this are benchmark probes, not real beats."""


async def run_network(
    n: int, interval_s: float, probes: int, stagger_s: float, workers: int
) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="bench-membership-"))
    cfg = CoordinatorConfig(
        listen="/ip4/127.0.0.1/tcp/0",
        http="127.0.0.1:0",
        membership=MembershipConfig(heartbeat_interval_s=interval_s),
    )
    out: dict[str, float] = {}
    ctx = multiprocessing.get_context("spawn")
    async with trio.open_nursery() as nursery:
        coord_stop = trio.Event()
        coord: Coordinator = await nursery.start(
            lambda task_status: Coordinator(cfg, Identity.generate(), home).run(
                coord_stop, task_status=task_status
            )
        )
        pipes, procs = [], []
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(there, coord.multiaddrs, interval_s))
            proc.start()
            pipes.append(here)
            procs.append(proc)

        async def ask(w: int, *msg: Any) -> Any:
            pipes[w].send(msg)
            return await trio.to_thread.run_sync(pipes[w].recv)

        names = [f"b{i}" for i in range(n)]
        home_of = {name: i % workers for i, name in enumerate(names)}
        peer_of: dict[str, str] = {}
        join_s: list[float] = []
        for name in names:
            peer, t_start = await ask(home_of[name], "start", name)
            peer_of[name] = peer
            await wait_for(lambda peer=peer: _alive(coord, peer), 60)
            join_s.append(time.time() - t_start)
            await trio.sleep(stagger_s)
        console.log(f"N={n}: all joined, p99 {pct(join_s, 0.99):.2f}s")

        for w in range(workers):
            await ask(w, "raw_topic")
        with trio.fail_after(60):
            while not all([await ask(w, "meshed") for w in range(workers)]):
                await trio.sleep(0.2)
        await trio.sleep(2 * interval_s)  # let the meshes settle
        console.log(f"N={n}: mesh formed; measuring bytes")
        lo0, t0 = _lo_bytes(), time.perf_counter()
        cpu = [psutil.Process(p.pid) for p in procs]
        for c in cpu:
            c.cpu_percent()
        await trio.sleep(max(4.0, 2 * interval_s))
        out["heartbeat_bytes_per_node_s"] = (_lo_bytes() - lo0) / n / (time.perf_counter() - t0)
        # how busy the simulation is: each worker process carries n/workers nodes on one core
        busy = [c.cpu_percent() for c in cpu]
        out["worker_cpu_percent_max"] = max(busy)
        out["cpu_percent_per_node"] = sum(busy) / n
        beat = Heartbeat(seq=1, uptime_s=1.0)
        out["heartbeat_frame_bytes"] = len(seal(Identity.generate(), beat))

        console.log(f"N={n}: probing gossip latency")
        sent: dict[bytes, tuple[str, float]] = {}
        for k in range(probes):
            # one probe in flight at a time, ours and the baseline alternating: each measures
            # propagation through an idle network, not a queue behind the previous probe
            src = random.choice(names)
            nonce, raw = os.urandom(16), b"probe" + os.urandom(16)
            sent[nonce] = (src, await ask(home_of[src], "probe", src, nonce, k))
            await trio.sleep(0.5)
            sent[raw] = (src, await ask(home_of[src], "raw_probe", src, raw))
            await trio.sleep(0.5)
        await trio.sleep(2.0)
        got: dict[bytes, dict[str, float]] = {}
        for w in range(workers):
            for key, by in (await ask(w, "report")).items():
                got.setdefault(key, {}).update(by)
        ours_ms: list[float] = []
        raw_ms: list[float] = []
        for key, (src, t) in sent.items():
            lat = [(r - t) * 1000 for who, r in got.get(key, {}).items() if who != src]
            (raw_ms if key.startswith(b"probe") else ours_ms).extend(lat)
        out["gossip_delivery_ratio"] = len(ours_ms) / (probes * (n - 1))
        out["raw_gossip_delivery_ratio"] = len(raw_ms) / (probes * (n - 1))

        console.log(f"N={n}: killing a node")
        victim = names[-1]
        killed = await ask(home_of[victim], "kill", victim)
        await wait_for(lambda: _status(coord, peer_of[victim]) == "dead", 60)
        detect = time.time() - killed

        out.update(
            join_visible_p50_s=pct(join_s, 0.5),
            join_visible_p99_s=pct(join_s, 0.99),
            gossip_p50_ms=pct(ours_ms, 0.5),
            gossip_p99_ms=pct(ours_ms, 0.99),
            raw_gossip_p50_ms=pct(raw_ms, 0.5),
            raw_gossip_p99_ms=pct(raw_ms, 0.99),
            gossip_p99_vs_raw_ratio=pct(ours_ms, 0.99) / max(pct(raw_ms, 0.99), 1e-9),
            failure_detect_s=detect,
            failure_detect_intervals=detect / interval_s,
            heartbeat_interval_s=interval_s,
            worker_processes=workers,
        )
        for w in range(workers):
            await ask(w, "stop")
        for proc in procs:
            proc.join(10)
        coord_stop.set()
    return out


def _alive(coord: Coordinator, peer_id: str) -> bool:
    return _status(coord, peer_id) == "alive"


def _status(coord: Coordinator, peer_id: str) -> str | None:
    node = coord.membership.nodes.get(peer_id)
    return node.status if node else None


def _lo_bytes() -> int:
    counters = psutil.net_io_counters(pernic=True)
    return int(counters["lo"].bytes_sent) if "lo" in counters else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 cores)")
    parser.add_argument("--sizes", default="", help="comma-separated N (default 8,16,32)")
    parser.add_argument("--interval", type=float, default=2.0, help="heartbeat interval (s)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="node worker processes"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "membership.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [8, 16, 32]
    if args.quick and not args.sizes:
        sizes = [8, 16]
    probes, stagger = (8, 0.05) if args.quick else (30, 0.25)

    results: dict[int, dict[str, float]] = {}
    for n in sizes:
        results[n] = trio.run(run_network, n, args.interval, probes, stagger, args.workers)

    flat: dict[str, float | int | str] = {}
    for n, r in results.items():
        for k, v in r.items():
            flat[f"{k}_n{n}"] = v
    largest = results[max(results)]
    flat.update(largest)  # the goal metrics, at the largest N
    flat.update(
        nodes=max(results),
        quick=int(args.quick),
    )
    table = Table(title=f"membership (heartbeat interval {args.interval}s, in-process hosts)")
    cols = [
        ("N", None),
        ("join p50/p99 s", ("join_visible_p50_s", "join_visible_p99_s", "{:.2f}")),
        ("gossip p50/p99 ms", ("gossip_p50_ms", "gossip_p99_ms", "{:.1f}")),
        ("raw gossip p50/p99 ms", ("raw_gossip_p50_ms", "raw_gossip_p99_ms", "{:.1f}")),
        ("p99 ours/raw", ("gossip_p99_vs_raw_ratio", None, "{:.2f}x")),
        ("detect s (intervals)", ("failure_detect_s", "failure_detect_intervals", "{:.2f}")),
        ("bytes/node/s", ("heartbeat_bytes_per_node_s", None, "{:,.0f}")),
        ("delivered", ("gossip_delivery_ratio", None, "{:.0%}")),
    ]
    for name, _ in cols:
        table.add_column(name, justify="right")
    for n, r in results.items():
        row = [str(n)]
        for _, spec in cols[1:]:
            assert spec is not None
            a, b, fmt = spec
            cell = fmt.format(r[a])
            if b:
                cell += " / " + fmt.format(r[b]) if "detect" not in a else f" ({r[b]:.2f})"
            row.append(cell)
        table.add_row(*row)
    console.print(table)
    write_result(args.out, flat)


if __name__ == "__main__":
    main()
