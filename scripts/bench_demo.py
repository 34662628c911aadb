"""Benchmark: does the demo convince, run after run? ``bazaar up`` from a fresh home, N times.

Each run is the main job as a new user meets it: ``bazaar up`` (default settings: 3 nodes, the
demo spec ``examples/arith-tiny.toml``, its default rounds) in a fresh ``BAZAAR_HOME``, sharing
only the tiny model's cache. The demo trains, deploys, asks its showcase question of the base
model and of the adapter, and evaluates both on 200 held-out examples through the gateway
(``bazaar eval --compare``); it writes that to ``local/demo-result.json``, which this script
reads before stopping the network with SIGINT, as Ctrl+C would.

Metrics (bench-results/demo.json):
  eval_difference_median, eval_difference_worst   adapter minus base mean reward (goal >= 0.3)
  ci_excludes_zero_runs                           runs whose difference's 95 % interval excludes 0
  showcase_right_runs / runs                      the adapter's showcase answer right (goal 9/10)
  seconds_to_result_median                        start to the evaluation table, model cached

Run: ``python scripts/bench_demo.py [--runs 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from bazaar.up import tiny_model  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402

console = Console()


def one_demo(home: Path, cache: Path, extra: list[str]) -> dict[str, Any]:
    """One ``bazaar up`` to its evaluation table; its result and the seconds it took."""
    log = home / "up.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "bazaar", "up", "--model-cache", str(cache), *extra],
            cwd=REPO, env={**os.environ, "BAZAAR_HOME": str(home)}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    result_file = home / "local" / "demo-result.json"
    try:
        while not result_file.exists():
            if up.poll() is not None:
                raise RuntimeError(f"bazaar up exited {up.returncode}: {log.read_text()[-2000:]}")
            if time.perf_counter() - started > 1200:
                raise TimeoutError(f"no demo result after 20 min: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        result = json.loads(result_file.read_text())
        up.send_signal(signal.SIGINT)
        up.wait(120)
    finally:
        if up.poll() is None:
            up.kill()
    return {**result, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "demo.json")
    parser.add_argument("up_args", nargs="*", help="more arguments for `bazaar up` (after --)")
    args = parser.parse_args()
    cache = data_dir()
    tiny_model(cache)  # built once, outside the timed runs
    table = Table(title=f"bazaar up, {args.runs} fresh runs (2 cores, model cached)")
    for col in ("run", "version", "base", "adapter", "difference", "showcase", "seconds"):
        table.add_column(col, justify="right")
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            r = one_demo(Path(tmp), cache, args.up_args)
        (_, b), (adapter, a) = r["eval"].items()
        diff, half = a["mean"] - b["mean"], (a["ci95"] ** 2 + b["ci95"] ** 2) ** 0.5
        show = r["showcase"][adapter]
        runs.append({"difference": diff, "ci95": half, "showcase_right": show["reward"] >= 1,
                     "seconds": r["seconds"], "base": b["mean"], "adapter": a["mean"],
                     "showcase_text": show["text"]})  # fmt: skip
        table.add_row(str(i + 1), str(r["version"]), f"{b['mean']:.3f}", f"{a['mean']:.3f}",
                      f"{diff:+.3f} ± {half:.3f}", f"{show['text']!r} ({r['showcase']['answer']})",
                      f"{r['seconds']:.0f}")  # fmt: skip
        console.print(f"run {i + 1}: difference {diff:+.3f} ± {half:.3f}, showcase "
                      f"{show['text']!r}, {r['seconds']:.0f} s")  # fmt: skip
    diffs = [r["difference"] for r in runs]
    result = {
        "runs": len(runs),
        "eval_difference_median": statistics.median(diffs),
        "eval_difference_worst": min(diffs),
        "ci_excludes_zero_runs": sum(r["difference"] - r["ci95"] > 0 for r in runs),
        "showcase_right_runs": sum(r["showcase_right"] for r in runs),
        "seconds_to_result_median": statistics.median(r["seconds"] for r in runs),
        "per_run": runs,
    }
    console.print(table)
    console.print(f"difference median {result['eval_difference_median']:+.3f}, worst "
                  f"{result['eval_difference_worst']:+.3f}; showcase right in "
                  f"{result['showcase_right_runs']}/{len(runs)}")  # fmt: skip
    write_result(args.out, result)


if __name__ == "__main__":
    main()
