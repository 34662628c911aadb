"""Benchmark: churn is the normal case — the demo run while its nodes crash and come back,
beside the same run on a calm network.

Both scenarios are a fresh network of real processes on loopback (``tests/integration/
cluster.py``): a coordinator that recounts every payload (``--tokenizers.tiny``), three
samplers (``sampler-1`` also verifies; ``sampler-slow`` hands each payload over only after
five times as long as generating it took: a machine five times slower,
``tests/integration/slow_node.py``), a verifier and two trainers. The run is the demo's
(``examples/arith-tiny.toml``: one-digit additions on the tiny model, 32 prompts × 8
completions a lease, one lease per trainer a round) to ``--rounds`` versions, paid by a
researcher's key.

In the chaos scenario, every 20–40 s (``--every``) a random node among the samplers, the
verifier and ``trainer-2`` is killed with SIGKILL (its whole process group: node and model
process, as a machine that loses power) and started again 1–5 s later with the same home
(identity, payload store, model cache); the coordinator is killed the same way once,
``--coordinator-at`` seconds into the run, and restarted on its database.

An observer polls the coordinator's views and the accounts database every second and keeps
every record it was ever shown: counted rollouts (receipts), verdicts, versions, ledger
entries and the key's usage records. Whatever the coordinator shows has been committed, so a
crash may lose none of it.

Metrics (JSON keys; the table shows both scenarios):

- ``chaos_reward_parity``: the mean reward of the completions sampled at the last
  ``--tail`` versions (as the coordinator recomputed them), chaos ÷ calm (goal ≥ 0.9);
- ``chaos_time_ratio``: seconds from submission to the run's completion, chaos ÷ calm (goal
  ≤ 2);
- ``lost_records``: records the observer saw that are gone at the end, after every crash
  (goal 0);
- ``ledger_reconciled``: 1 when, after the run's holds are settled, the coordinator's
  reconciliation holds (every charge equal to the recount of the kept payloads, the key's usage
  records equal to the charges less refunds, the balances summing to zero) and the key holds
  nothing (goal 1);
- ``kills``, ``coordinator_restarts``: what the chaos did.

Run: ``python scripts/bench_chaos.py [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import check_alive, wait_until, write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bazaar.up import DEMO_SPEC, tiny_model  # noqa: E402
from protocol.runs import load_spec  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from tests.integration.cluster import Cluster, Proc  # noqa: E402

console = Console()
if not console.is_terminal:
    console.width = 200
RUN = "chaos"
NODES = {"sampler-1": "inference,verifier", "sampler-2": "inference",
         "sampler-slow": "inference", "verifier": "verifier", "trainer-1": "trainer",
         "trainer-2": "trainer"}  # fmt: skip
CHURNED = ["sampler-1", "sampler-2", "sampler-slow", "verifier", "trainer-2"]
SLOW = "sampler-slow"
GOALS = {"chaos_reward_parity": 0.9, "chaos_time_ratio": 2.0, "lost_records": 0,
         "ledger_reconciled": 1}  # fmt: skip


@dataclass
class Records:
    """Every record the observer was shown, by kind, keyed so that a record changed in place
    counts as the old one lost."""

    seen: dict[str, set[tuple[Any, ...]]] = field(default_factory=dict)

    def add(self, kind: str, keys: set[tuple[Any, ...]]) -> None:
        self.seen.setdefault(kind, set()).update(keys)

    def lost(self, now: dict[str, set[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
        """What was seen once and is not in ``now``, by kind."""
        return {k: sorted(v - now.get(k, set()), key=repr) for k, v in self.seen.items()
                if v - now.get(k, set())}  # fmt: skip


def snapshot(cluster: Cluster, key_id: int) -> dict[str, set[tuple[Any, ...]]]:
    """The records the coordinator and the accounts database show now."""
    api = cluster.api
    ledger = api("GET", "/v1/ledger", params={"run": RUN})
    if ledger["entry_count"] > len(ledger["entries"]):
        raise RuntimeError("more ledger entries than the view lists: run fewer rounds")
    return {
        "receipts": {(r["lease_id"], r["payload_hash"], r["completion_tokens"])
                     for r in api("GET", f"/v1/runs/{RUN}/rollouts")["data"]},
        "verdicts": {(v["audit_id"], v["verifier"], v["stage"], v["passed"])
                     for v in api("GET", "/v1/network/verdicts")["data"]},
        "versions": {(v["version"], v["manifest_sha256"])
                     for v in api("GET", f"/v1/runs/{RUN}/versions")["data"]},
        "ledger_entries": {(e["kind"], e["debit"], e["credit"], e["tokens"], e["ref"], e["at"])
                           for e in ledger["entries"]},
        "usage_records": {(u.id, u.model, u.prompt_tokens, u.completion_tokens)
                          for u in cluster.accounts().usage(key_id)},
    }  # fmt: skip


@dataclass
class Network:
    cluster: Cluster
    coordinator_args: list[str]
    model_args: list[str]
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str) -> None:
        slow = name == SLOW
        self.procs[name] = self.cluster.start_node(
            name, roles=NODES[name], extra=self.model_args,
            module="tests.integration.slow_node" if slow else "bazaar",
        )  # fmt: skip

    def kill(self, proc: Proc) -> None:
        """SIGKILL to its whole process group (the node and its model process)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def check(self) -> None:
        check_alive([*self.procs.items(), ("coordinator", self.cluster.coordinator)])


def run_spec(rounds: int) -> dict[str, Any]:
    spec = load_spec(DEMO_SPEC)
    stop = msgspec.structs.replace(spec.stop, max_rounds=rounds, target_reward=None)
    return {**msgspec.structs.replace(spec, name=RUN, stop=stop).to_dict(), "name": RUN}


def scenario(chaos: bool, args: argparse.Namespace, cache: Path, tiny: Path) -> dict[str, Any]:
    """One run on a fresh network, with churn or without: what it measured."""
    name = "chaos" if chaos else "calm"
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix=f"bench-chaos-{name}-"))
    cluster = Cluster(root, interval_s=2.0, sessions=True)  # the default heartbeat
    net = Network(cluster, [f"--tokenizers.tiny={tiny}", "--leases.round_leases=1",
                            f"--leases.report_deadline_s={args.report_deadline}"],
                  [f"--model_cache={cache}", "--torch_threads=1"])  # fmt: skip
    records = Records()
    kills: list[tuple[float, str]] = []
    out: dict[str, Any] = {}
    try:
        cluster.start_coordinator(extra=net.coordinator_args)
        for n in NODES:
            net.start(n)
        wait_until(net.check, "the nodes joining", lambda: sum(
            s == "alive" for s in cluster.statuses().values()) >= len(NODES), 120)  # fmt: skip
        (key,) = [k for k in cluster.accounts().all() if k.name == "researcher"]
        cluster.api("POST", "/v1/runs", json=run_spec(args.rounds))
        started = time.monotonic()
        next_kill = started + rng.uniform(*args.every)
        coordinator_at = started + args.coordinator_at
        restarts: list[tuple[float, str]] = []  # (when, name): a killed node's return
        end = started + args.timeout
        with console.status(f"{name}: submitted") as status:
            while True:
                now = time.monotonic()
                if now > end:
                    raise RuntimeError(f"the run did not complete in {args.timeout:.0f} s")
                for when, n in [r for r in restarts if r[0] <= now]:
                    restarts.remove((when, n))
                    net.start(n)
                if chaos and coordinator_at and now >= coordinator_at:
                    coordinator_at = 0.0
                    assert cluster.coordinator is not None
                    net.kill(cluster.coordinator)
                    kills.append((now - started, "coordinator"))
                    cluster.start_coordinator(extra=net.coordinator_args)
                if chaos and now >= next_kill:
                    down = {n for _, n in restarts}
                    victim = rng.choice([n for n in CHURNED if n not in down])
                    net.kill(net.procs.pop(victim))
                    kills.append((now - started, victim))
                    restarts.append((now + rng.uniform(1.0, 5.0), victim))
                    next_kill = now + rng.uniform(*args.every)
                net.check()
                try:
                    now_records = snapshot(cluster, key.id)
                    run = cluster.api("GET", f"/v1/runs/{RUN}")
                except RuntimeError:
                    raise
                except Exception:  # the coordinator restarting
                    time.sleep(0.5)
                    continue
                for kind, keys in now_records.items():
                    records.add(kind, keys)
                if run["state"] not in ("queued", "running"):
                    seconds = time.monotonic() - started
                    break
                status.update(f"{name}: v{run['policy_version']} of {args.rounds}, "
                              f"{len(kills)} kills")  # fmt: skip
                time.sleep(1.0)
        for _, n in restarts:  # every node back, so the last rounds can report
            net.start(n)

        def settled() -> dict[str, Any] | None:
            r = cluster.api("GET", f"/v1/runs/{RUN}")
            (k,) = [k for k in cluster.accounts().all() if k.name == "researcher"]
            return r if r["held_tokens"] == 0 and k.reserved_tokens == 0 else None

        run = wait_until(net.check, "the run's holds settling", settled, args.report_deadline + 60)
        final = snapshot(cluster, key.id)
        lost = records.lost(final)
        books = cluster.api("GET", "/v1/ledger", params={"run": RUN})
        rewards = cluster.api("GET", f"/v1/runs/{RUN}/rewards")["data"]
        tail = [r for r in rewards if r["version"] > run["policy_version"] - args.tail]
        samples = sum(r["samples"] for r in tail)
        out = {
            "stop_reason": run["stop_reason"], "seconds": seconds,
            "versions": run["policy_version"],
            "tail_reward": sum(r["mean"] * r["samples"] for r in tail) / max(samples, 1),
            "tail_samples": samples,
            "lost_records": sum(len(v) for v in lost.values()),
            "lost": {k: [list(x) for x in v[:5]] for k, v in lost.items()},
            "records": {k: len(v) for k, v in records.seen.items()},
            "records_seen": sum(len(v) for v in records.seen.values()),
            "ledger_reconciled": int(books["reconciled"] and books["balance_sum"] == 0
                                     and books["runs"][0]["key_usage"] is not None),
            "charged_tokens": books["runs"][0]["charged"],
            "recounted_tokens": books["runs"][0]["recounted"],
            "kills": sum(n != "coordinator" for _, n in kills),
            "coordinator_restarts": sum(n == "coordinator" for _, n in kills),
            "kill_log": [(round(t, 1), n) for t, n in kills],
        }  # fmt: skip
    finally:
        cluster.stop_all()
        for p in cluster.procs:  # the model processes of killed nodes are gone with them
            if p.alive():
                net.kill(p)
    if out:
        shutil.rmtree(root, ignore_errors=True)
    else:
        console.print(f"[red]{name} failed; logs in {root}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="versions the run makes")
    parser.add_argument("--every", type=float, nargs=2, default=(20.0, 40.0),
                        help="seconds between node kills, drawn uniformly")  # fmt: skip
    parser.add_argument("--coordinator-at", type=float, default=45.0,
                        help="seconds into the chaos run the coordinator is killed")  # fmt: skip
    parser.add_argument("--tail", type=int, default=10, help="versions the reward is read on")
    parser.add_argument("--report-deadline", type=float, default=30.0,
                        help="the coordinator's leases.report_deadline_s")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20 versions, the coordinator killed at 15 s",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "chaos.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.coordinator_at, args.tail = 20, 15.0, 5
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cache = data_dir()
    tiny = tiny_model(cache)
    calm = scenario(False, args, cache, tiny)
    chaos = scenario(True, args, cache, tiny)
    if not calm or not chaos:
        raise SystemExit("a scenario failed; see its logs")
    result: dict[str, Any] = {
        "rounds": args.rounds, "every_s": list(args.every), "seed": args.seed,
        "chaos_reward_parity": chaos["tail_reward"] / calm["tail_reward"],
        "chaos_time_ratio": chaos["seconds"] / calm["seconds"],
        "lost_records": calm["lost_records"] + chaos["lost_records"],
        "ledger_reconciled": int(calm["ledger_reconciled"] and chaos["ledger_reconciled"]),
        "calm": calm, "chaos": chaos,
    }  # fmt: skip
    table = Table(title=f"the demo run to {args.rounds} versions, calm and under churn")
    for col in ("", "calm", "chaos"):
        table.add_column(col, justify="right")
    for label, k, fmt in (("seconds to complete", "seconds", "{:.1f}"),
                          (f"reward, last {args.tail} versions", "tail_reward", "{:.3f}"),
                          ("node kills", "kills", "{}"),
                          ("coordinator restarts", "coordinator_restarts", "{}"),
                          ("records seen", "records_seen", "{:,}"),
                          ("records lost", "lost_records", "{}"),
                          ("ledger reconciled", "ledger_reconciled", "{}"),
                          ("tokens charged", "charged_tokens", "{:,}"),
                          ("tokens recounted", "recounted_tokens", "{:,}")):  # fmt: skip
        table.add_row(label, fmt.format(calm[k]), fmt.format(chaos[k]))
    console.print(table)
    goals = Table(title="goals")
    for col in ("metric", "value", "goal", "met"):
        goals.add_column(col, justify="right")
    for k, goal in GOALS.items():
        v = result[k]
        met = v <= goal if k in ("chaos_time_ratio", "lost_records") else v >= goal
        goals.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v), str(goal),
                      "yes" if met else "[red]no")  # fmt: skip
    console.print(goals)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
