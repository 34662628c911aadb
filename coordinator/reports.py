"""Trainers' round reports, kept by run, and what the REST API shows of them.

After each round a trainer reports (``RoundReport``) the rewards it recomputed for the
completions it trained on, by the version they were sampled at, the tokens it trained on and a
few completions as text. The manifest cannot carry these: it must be byte-identical on every
trainer of the round. A resend of the same (round, trainer) replaces the earlier report.
"""

from __future__ import annotations

from typing import Any

from coordinator.db import ReportRow


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
        out = []
        for v, (n, total, sq) in sorted(totals.items()):
            mean = total / n if n else 0.0
            out.append({"version": v, "samples": int(n), "mean": mean,
                        "std": max(sq / n - mean * mean, 0.0) ** 0.5 if n else 0.0})  # fmt: skip
        return out

    def tokens_trained(self, run_id: str) -> int:
        return sum(r.tokens_trained for r in self.by_run.get(run_id, {}).values())

    def samples(self, run_id: str) -> list[dict[str, Any]]:
        """The completions trainers reported as text, oldest round first."""
        rows = sorted(self.by_run.get(run_id, {}).values(), key=lambda r: (r.round, r.at))
        return [sample for row in rows for sample in row.samples]
