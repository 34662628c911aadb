"""What every benchmark shares: the machine it ran on, writing its flat JSON result, and
waiting on a network of processes that must stay up."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count() or 0,
        "torch_version": str(torch.__version__),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` plus the machine description to ``out`` (bench-results/<name>.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, **machine()}, indent=2) + "\n")
    print(f"wrote {out}")


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its 95 % interval (Student's t; 0 for one
    value)."""
    import statistics

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    from scipy import stats

    sem = statistics.stdev(values) / len(values) ** 0.5
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * sem


def check_alive(procs: Iterable[tuple[str, Any]]) -> None:
    """RuntimeError naming the first of ``(name, process)`` that exited, and its log (a
    ``tests.integration.cluster.Proc``; None: not started)."""
    for name, p in procs:
        if p is not None and not p.alive():
            raise RuntimeError(f"{name} exited ({p.popen.returncode}); see {p.log}")


def wait_until(check: Callable[[], None], what: str, probe: Callable[[], Any],
               timeout_s: float) -> Any:  # fmt: skip
    """Call ``probe`` every 0.3 s until it returns something truthy, and return that; ``check``
    first each time (it raises when the network broke). A probe that raises counts as not yet:
    a coordinator restarting refuses connections for a moment. RuntimeError on timeout."""
    end = time.monotonic() + timeout_s
    while True:
        check()
        try:
            if got := probe():
                return got
        except Exception:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s: {what}")
        time.sleep(0.3)
