"""Benchmark: the coordinator's CPU time per lease-and-receipt, after 1,000 and after 100,000
earlier leases of the same run in its database.

A coordinator that walks a run's history on every request gets slower as the run lives on; one
that indexes what is open (active leases, rollouts waiting for a round, the current round's
deal) costs the same per request whatever the history. Both measurements run in one process,
on one run and one database file: the history is written as a long run leaves it (every
earlier lease delivered and trained in a past round, with its receipt), the coordinator's state
is restored from the file as a restarted coordinator does, and then an inference node's cycle
runs through the real handlers (``Rollouts.lease`` with trainers on the network, so the
untrained-lease cap is checked, then ``Rollouts.receipt``, each committed to SQLite).

Metrics (bench-results/coordinator.json):
  cpu_us_per_lease_1k, cpu_us_per_lease_100k   process CPU time per lease + receipt
  per_lease_cost_ratio_100k_vs_1k              their ratio (goal <= 1.2)
  restore_s_1k, restore_s_100k                 loading the state at start-up (grows, once)

Run: ``python scripts/bench_coordinator.py [--quick]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import track
from rich.table import Table
from sqlalchemy import insert
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from coordinator.config import AuditConfig, LeaseConfig  # noqa: E402
from coordinator.db import LeaseState, ReceiptRow, RunState, open_database  # noqa: E402
from coordinator.lifecycle import RunLifecycle  # noqa: E402
from coordinator.metrics import CoordinatorMetrics  # noqa: E402
from coordinator.rollouts import Rollouts  # noqa: E402
from coordinator.state import State  # noqa: E402
from protocol.leases import Lease, LeaseRequest  # noqa: E402
from protocol.rollouts import RolloutReceipt  # noqa: E402
from protocol.runs import RLSpec, RunPlan, RunSpec  # noqa: E402

ROUND = 64
"""Leases per past round (a round's deal is what the current round's handlers look at)."""
SPEC = RunSpec(name="bench", rl=RLSpec(group_size=4, max_tokens=16, prompts_per_lease=1,
                                      lease_ttl_s=3600.0))  # fmt: skip
PLAN = RunPlan(spec=SPEC, run_id="bench", env='arith {"digits":2}', env_version="1", env_seed=1)
PRODUCERS = [f"node-{i}" for i in range(16)]


def write_history(url: str, start: int, stop: int) -> None:
    """Leases ``start..stop`` of the run as a long run leaves them: delivered, counted, trained
    in past rounds, each with its receipt. Written with plain inserts (fast), read back by
    ``State.restore`` like any coordinator's."""
    engine = open_database(url)
    now = time.time() - 86_400
    leases, receipts = [], []
    for i in range(start, stop):
        v = i // ROUND
        lease = Lease(lease_id=uuid.uuid4().hex, run_id=PLAN.run_id, env_id=PLAN.env,
                      env_version=PLAN.env_version, env_seed=PLAN.env_seed, example_indices=[i],
                      group_size=SPEC.rl.group_size, policy_version=v, sampling=SPEC.rl.sampling(),
                      lease_seed=os.urandom(32), deadline_ms=int((now + 60) * 1000))  # fmt: skip
        digest = hashlib.sha256(lease.lease_id.encode()).digest()
        node = PRODUCERS[i % len(PRODUCERS)]
        leases.append({"lease_id": lease.lease_id, "run_id": PLAN.run_id, "node": node,
                       "lease": lease, "issued_at": now + i * 1e-3,
                       "status": "completed", "counted": [i], "payload_hash": digest,
                       "completion_tokens": 50, "completed_at": now + i * 1e-3 + 1,
                       "trained_in": v, "trained_by": "trainer"})  # fmt: skip
        receipts.append({"lease_id": lease.lease_id, "run_id": PLAN.run_id, "node": node,
                         "payload_hash": digest, "num_samples": SPEC.rl.group_size,
                         "completion_tokens": 50, "outcome": "counted",
                         "received_at": now + i * 1e-3 + 1})  # fmt: skip
    if start == 0:
        with Session(engine) as s, s.begin():
            s.add(RunState(PLAN, created_at=now))
    with engine.begin() as db:
        for at in range(0, len(leases), 5000):
            db.execute(insert(LeaseState.__table__), leases[at : at + 5000])
            db.execute(insert(ReceiptRow.__table__), receipts[at : at + 5000])
        db.execute(RunState.__table__.update().values(policy_version=stop // ROUND, cursor=stop))
    engine.dispose()


def open_state(url: str) -> tuple[State, Rollouts, float]:
    config = LeaseConfig(round_leases=4096)  # the untrained cap (2 x 4096) is checked, not hit
    state = State(open_database(url), config, AuditConfig(), CoordinatorMetrics(), time.time)
    t0 = time.perf_counter()
    state.restore()
    return state, Rollouts(state, RunLifecycle(state)), time.perf_counter() - t0


def cycle_cost(state: State, rollouts: Rollouts, cycles: int, rounds: int) -> float:
    """Median over ``rounds`` of the process CPU seconds of one lease + receipt."""
    run = state.book.runs[PLAN.run_id]
    ask = LeaseRequest(max_prompts=1, base_model="tiny",
                       adapter_versions={PLAN.run_id: run.policy_version})  # fmt: skip

    async def one_round() -> float:
        t0 = time.process_time()
        for k in range(cycles):
            lease = await rollouts.lease(PRODUCERS[k % len(PRODUCERS)], ask, trainers=1)
            assert isinstance(lease, Lease), lease
            receipt = RolloutReceipt(
                lease_id=lease.lease_id, run_id=lease.run_id, policy_version=lease.policy_version,
                payload_hash=hashlib.sha256(lease.lease_id.encode()).digest(),
                num_samples=SPEC.rl.group_size, completion_tokens=50,
            )  # fmt: skip
            ack = await rollouts.receipt(PRODUCERS[k % len(PRODUCERS)], receipt)
            assert ack.outcome == "counted", ack
        return (time.process_time() - t0) / cycles

    async def main() -> list[float]:
        await one_round()  # warm-up
        return [await one_round() for _ in range(rounds)]

    return statistics.median(trio.run(main))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles (under a minute)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "coordinator.json")
    args = parser.parse_args()
    cycles, rounds = (100, 5) if args.quick else (300, 9)
    small, large = 1_000, 100_000
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'coordinator.db'}"
        write_history(url, 0, small)
        state, rollouts, restore_small = open_state(url)
        cost_small = cycle_cost(state, rollouts, cycles, rounds)
        state.close()
        for at in track(range(small, large, 10_000), description="writing 100k leases"):
            write_history(url, at, min(at + 10_000, large))
        state, rollouts, restore_large = open_state(url)
        leases_large = len(state.book.leases)
        cost_large = cycle_cost(state, rollouts, cycles, rounds)
        state.close()
    result = {
        "cpu_us_per_lease_1k": round(cost_small * 1e6, 1),
        "cpu_us_per_lease_100k": round(cost_large * 1e6, 1),
        "per_lease_cost_ratio_100k_vs_1k": round(cost_large / cost_small, 3),
        "restore_s_1k": round(restore_small, 3),
        "restore_s_100k": round(restore_large, 3),
        "leases_in_memory_100k": leases_large,
        "cycles_per_round": cycles,
        "rounds": rounds,
    }
    table = Table(title="coordinator: CPU per lease + receipt (median of rounds)")
    table.add_column("earlier leases")
    table.add_column("CPU µs / lease+receipt", justify="right")
    table.add_column("restore s", justify="right")
    table.add_row("1,000", f"{cost_small * 1e6:.0f}", f"{restore_small:.2f}")
    table.add_row("100,000", f"{cost_large * 1e6:.0f}", f"{restore_large:.2f}")
    table.add_row("ratio (goal ≤ 1.2)", f"{cost_large / cost_small:.3f}", "")
    console.print(table)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
