"""Rewards by the version completions were sampled at, and trainers' round reports.

Two sources, kept apart. The coordinator's own (``RewardBook``): every reward it recomputed with
the environment from payloads it fetched (``coordinator/recount.py``) — what stop rules decide
on, since no node can bend it. The trainers' (``ReportBook``): after each round a trainer
reports (``RoundReport``) the rewards it recomputed for the completions it trained on, its
count of every payload it fetched and a few completions as text; shown when the coordinator
cannot score a run itself (it lacks the base model's tokenizer). A resend of the same (round,
trainer) replaces the earlier report.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coordinator.db import ReportRow


def summary(totals: dict[int, list[float]]) -> list[dict[str, Any]]:
    """``version → [count, sum, sum of squares]`` as count, mean, standard deviation."""
    out = []
    for v, (n, total, sq) in sorted(totals.items()):
        mean = total / n if n else 0.0
        out.append({"version": v, "samples": int(n), "mean": mean,
                    "std": max(sq / n - mean * mean, 0.0) ** 0.5 if n else 0.0})  # fmt: skip
    return out


class RewardBook:
    """The rewards the coordinator recomputed, by run and sampled version."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[int, list[float]]] = {}

    def add(self, run_id: str, version: int, rewards: Iterable[float]) -> None:
        t = self.totals.setdefault(run_id, {}).setdefault(version, [0, 0.0, 0.0])
        for r in rewards:
            t[0], t[1], t[2] = t[0] + 1, t[1] + r, t[2] + r * r

    def rewards(self, run_id: str) -> list[dict[str, Any]]:
        return summary(self.totals.get(run_id, {}))


class ReportBook:
    def __init__(self) -> None:
        self.by_run: dict[str, dict[tuple[int, str], ReportRow]] = {}
        """Reports by run, by (round, trainer)."""

    def add(self, row: ReportRow) -> None:
        self.by_run.setdefault(row.run_id, {})[(row.round, row.trainer)] = row

    def rewards(self, run_id: str) -> list[dict[str, Any]]:
        """Reward of the completions trainers trained on, by the version they were sampled at:
        count, mean, standard deviation."""
        totals: dict[int, list[float]] = {}
        for row in self.by_run.get(run_id, {}).values():
            for r in row.rewards:
                t = totals.setdefault(int(r["version"]), [0, 0.0, 0.0])
                t[0] += r["samples"]
                t[1] += r["reward_sum"]
                t[2] += r["reward_sq_sum"]
        return summary(totals)

    def samples(self, run_id: str) -> list[dict[str, Any]]:
        """The completions trainers reported as text, oldest round first."""
        rows = sorted(self.by_run.get(run_id, {}).values(), key=lambda r: (r.round, r.at))
        return [sample for row in rows for sample in row.samples]
