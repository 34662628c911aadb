"""Benchmark: how well a verifier's replay of a trainer's DiLoCo round separates honest rounds
from cheating ones, and what a replay costs against the round it checks.

The base model produces a pool of arith payloads (8 prompts x 4 samples each). A lone trainer
(the run's default ``TrainSettings``, two torch threads) trains ``--rounds`` rounds on two
payloads a round, error feedback carried from round to round, each version's adapter kept on
disk. Then, round by round, on one thread for even rounds and two for odd ones (a replay on one
thread of a round trained on two may meet last-bit float differences, as between machines; the
tiny model's products are too small to split, and its pseudo-gradients agree bit for bit):

- a verifier's ``Replayer`` (its own trainer) replays the honest round from what anyone can
  fetch and checks the committed part and the published adapter (``verification/training.py``);
- the trainer takes the version that round started from (``Trainer.recover``, as a trainer
  that fell behind does) and trains it again honestly, timed: the cost's baseline, beside its
  replay on the same threads (on a shared machine only a side-by-side ratio means anything);
- each cheat (``tests/adversarial/cheating_roles.py``, played here without the roles, which
  load py-libp2p) takes the same version, plays the round its way on the same threads, and is
  replayed. A round it left exactly as the honest one (no completion with reward spread) is no
  cheat: ``unchanged_<cheat>``.

The cheats: ``skips_inner_steps`` commits the part of an empty round; ``scales_its_part``
commits three times its part (clamped to the levels), a bigger say in the version;
``trains_on_rollouts_not_dealt`` trains each prompt on the next completion's tokens;
``poisons_adapter`` trains honestly and publishes its adapter's weights x10.

Metrics: ``honest_false_failure_rate`` (goal 0), the honest parts' ``mean_distance`` (only
reported) and ``outside_band`` (the band's limit 1e-3), ``caught_rate_<cheat>`` (failed replays ÷
replayed cheating rounds; goal ≥ 0.99) and ``caught_by_<cheat>``; ``replay_vs_train_cost``: an
honest replay's seconds ÷ its baseline round's (completions, inner steps, outer step, export),
the median over rounds (a busy neighbour on a shared machine can stall a two-thread step a
hundredfold); what replays cost a trusted trainer's compute at ``ReplayConfig``'s rates
(``replay_cost_fraction_group``, ``_lone``; goal ≤ 0.1); ``expected_rounds_to_catch_<cheat>``
for a trusted lone trainer, 1 / (lone_rate x caught rate) (``_new``: 1 / caught rate, as a new
trainer is replayed every round).

Run: ``python scripts/bench_replay.py [--rounds 8 | --quick] [--model smollm2]``; writes
``bench-results/replay.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean, median
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_verification import lease_for  # noqa: E402  (scripts/, beside this file)
from benchkit import write_result  # noqa: E402
from rich.box import SIMPLE  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from bazaar.up import tiny_model  # noqa: E402
from coordinator.config import ReplayConfig  # noqa: E402
from node.model.backends.torch_backend import TorchBackend  # noqa: E402
from node.model.loading import resolve  # noqa: E402
from node.model.rollouts import Producer  # noqa: E402
from node.store.adapters import AdapterStore  # noqa: E402
from node.training.examples import Completion  # noqa: E402
from node.training.replay import Replayer  # noqa: E402
from node.training.trainer import Trainer  # noqa: E402
from protocol.runs import TrainSettings  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from verification.training import OUT_OF_BAND_LIMIT  # noqa: E402

RUN, THREADS = "bench", 2
GOALS = {"false_failure_rate": 0.0, "caught_rate": 0.99, "replay_cost_fraction": 0.1}
Played = tuple[torch.Tensor, dict[str, bytes]]
"""What a round commits and publishes: the part, the adapter files."""


def honest(t: Trainer, examples: Sequence[Completion], steps: int) -> Played:
    part, stats = t.inner(examples, steps)
    t.finish(part, stats)
    return part, t.export()


def skips_inner_steps(t: Trainer, examples: Sequence[Completion], steps: int) -> Played:
    return honest(t, [], steps)


def scales_its_part(t: Trainer, examples: Sequence[Completion], steps: int) -> Played:
    part, stats = t.inner(examples, steps)
    q = t.quantizer.levels
    part = torch.clamp(3 * part, -q, q)
    t.finish(part, stats)
    return part, t.export()


def trains_on_rollouts_not_dealt(t: Trainer, examples: Sequence[Completion], steps: int) -> Played:
    n = len(examples)
    other = [dataclasses.replace(c, tokens=examples[(i + 1) % n].tokens,
                                 behaviour=examples[(i + 1) % n].behaviour)
             for i, c in enumerate(examples)]  # fmt: skip
    return honest(t, other, steps)


def poisons_adapter(t: Trainer, examples: Sequence[Completion], steps: int) -> Played:
    from safetensors.torch import load, save

    part, files = honest(t, examples, steps)
    name = "adapter_model.safetensors"
    return part, {**files, name: save({k: 10 * v for k, v in load(files[name]).items()})}


CHEATS: dict[str, Callable[[Trainer, Sequence[Completion], int], Played]] = {
    f.__name__: f
    for f in (skips_inner_steps, scales_its_part, trains_on_rollouts_not_dealt, poisons_adapter)
}


@dataclasses.dataclass
class Tally:
    """One trainer's replays."""

    checks: Counter[str] = dataclasses.field(default_factory=Counter)
    stats: list[dict[str, float]] = dataclasses.field(default_factory=list)
    seconds: dict[int, list[float]] = dataclasses.field(
        default_factory=lambda: {1: [], THREADS: []}
    )
    unchanged: int = 0

    @property
    def replayed(self) -> int:
        return sum(self.checks.values())

    @property
    def failed(self) -> int:
        return self.replayed - self.checks["passed"]

    @property
    def rate(self) -> float:
        return self.failed / max(1, self.replayed)


def bench(
    rounds: int, ref: str, max_tokens: int, held: Path, progress: Progress
) -> tuple[dict[str, Tally], dict[int, list[float]], list[int]]:
    """Each trainer's replays, the baseline rounds' seconds by threads and each round's
    completions (``held``: where the honest versions are kept)."""
    settings, steps = TrainSettings(), TrainSettings().diloco.inner_steps
    torch.set_num_threads(THREADS)
    trainer, replayer = Trainer.build(ref, RUN, settings), Replayer(ref)
    replayer.trainer(RUN, settings)  # built before any clock starts, as a verifier keeps it
    task = progress.add_task("payloads", total=2 * rounds)
    producer = Producer(backend := TorchBackend.from_pretrained(ref), backend.tokenizer)
    pool = []
    for n in range(2 * rounds):
        env, lease = lease_for(4 * n, max_tokens)  # every fourth of its settings is arith
        pool.append((env, lease, producer.produce(env, lease)))
        progress.advance(task)
    del producer, backend
    store = AdapterStore(held)

    def dirs(version: int) -> Path:
        return store.path(RUN, version)

    def examples(r: int) -> list[Completion]:
        std = settings.loss.std_normalize
        return [c for env, lease, payload in pool[2 * r : 2 * r + 2]
                for c in trainer.examples(env, lease, payload, std)[1]]  # fmt: skip

    task = progress.add_task("honest rounds", total=rounds)
    played: list[Played] = []
    for r in range(rounds):
        played.append(honest(trainer, examples(r), steps))
        store.add(RUN, r + 1, played[r][1])
        progress.advance(task)

    def replay(r: int, got: Played, tally: Tally) -> None:
        start, parent = (dirs(r), dirs(r - 1) if r > 1 else None) if r else (None, None)
        dealt = [(lease, payload) for _, lease, payload in pool[2 * r : 2 * r + 2]]
        part = np.asarray(got[0], dtype=np.int8).tobytes()
        started = time.perf_counter()
        check = replayer.replay(RUN, settings, start, parent, dealt, [part],
                                trainer.quantizer.levels, got[1])  # fmt: skip
        tally.seconds[torch.get_num_threads()].append(time.perf_counter() - started)
        tally.checks[check.check or "passed"] += 1
        tally.stats.append(check.stats)

    tallies = {name: Tally() for name in ("honest", *CHEATS)}
    baseline: dict[int, list[float]] = {1: [], THREADS: []}
    completions = []
    task = progress.add_task("replays", total=rounds * (1 + len(CHEATS)))
    for r in range(rounds):
        torch.set_num_threads(1 if r % 2 == 0 else THREADS)
        replay(r, played[r], tallies["honest"])
        trainer.recover(r, dirs)
        started = time.perf_counter()
        ex = examples(r)
        reference = honest(trainer, ex, steps)
        baseline[torch.get_num_threads()].append(time.perf_counter() - started)
        completions.append(len(ex))
        progress.advance(task)
        for name, cheat in CHEATS.items():
            trainer.recover(r, dirs)
            got = cheat(trainer, ex, steps)
            if bool((got[0] == reference[0]).all()) and got[1] == reference[1]:
                tallies[name].unchanged += 1
            else:
                replay(r, got, tallies[name])
            progress.advance(task)
    torch.set_num_threads(THREADS)
    return tallies, baseline, completions


def measures(
    tallies: dict[str, Tally], baseline: dict[int, list[float]]
) -> tuple[dict[str, Any], float]:
    """The benchmark's metrics from ``bench``'s tallies (the per-cheat ones are added as the
    table is made), and a replay's cost as a share of its round."""
    rates, h = ReplayConfig(), tallies["honest"]
    ratios = {t: [a / b for a, b in zip(h.seconds[t], baseline[t], strict=True)] for t in baseline}
    cost = median(ratios[1] + ratios[THREADS])

    def stat(key: str) -> list[float]:
        return [s[key] for s in h.stats if key in s]

    out: dict[str, Any] = {
        "honest_false_failures": h.failed, "honest_false_failure_rate": h.rate,
        "honest_mean_distance_min": min(stat("mean_distance"), default=None),
        "honest_mean_distance_mean": mean(stat("mean_distance")) if stat("mean_distance") else None,
        "honest_mean_distance_max": max(stat("mean_distance"), default=None),
        "honest_outside_band_max": max(stat("outside_band"), default=None),
        "honest_max_distance_max": max(stat("max_distance"), default=None),
        "honest_sum_distance_max": max(stat("sum_distance"), default=None),
        "train_round_s": mean(baseline[1] + baseline[THREADS]),
        "replay_s": mean(h.seconds[1] + h.seconds[THREADS]), "replay_vs_train_cost": cost,
        **{f"replay_vs_train_cost_{t}_thread{'s' * (t > 1)}": median(r)
           for t, r in ratios.items() if r},
        "replay_cost_fraction_group": cost * rates.rate,
        "replay_cost_fraction_lone": cost * rates.lone_rate,
    }  # fmt: skip
    return out, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds (two payloads each)")
    parser.add_argument("--quick", action="store_true", help="two rounds (under a minute)")
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, a directory, a hub id")
    parser.add_argument("--max-tokens", type=int, default=24, help="each lease's max_tokens")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "replay.json")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    ref = str(tiny_model(data_dir())) if args.model == "tiny" else resolve(args.model, data_dir())
    console = Console(width=None if sys.stdout.isatty() else 100)  # piped, rich assumes 80
    began = time.perf_counter()
    with Progress(console=console) as progress, tempfile.TemporaryDirectory() as held:
        tallies, baseline, completions = bench(rounds, ref, args.max_tokens, Path(held), progress)
    rates = ReplayConfig()
    out, cost = measures(tallies, baseline)
    caption = "1, 2 thr: a replay's seconds on 1, 2 threads; to catch: rounds, trusted / new"
    title = f"replays of a lone trainer's rounds ({rounds} per trainer)"
    table = Table(title=title, caption=caption, box=SIMPLE)
    table.add_column("trainer", no_wrap=True)
    for col in ("failed", "caught by", "1 thr", "2 thr", "to catch"):
        table.add_column(col, justify="right")
    for name, t in tallies.items():
        s1, s2 = (f"{mean(t.seconds[k]):.2f}" if t.seconds[k] else "-" for k in (1, THREADS))
        by = ", ".join(f"{k} {v}" for k, v in t.checks.items() if k != "passed") or "-"
        to_catch = "-"
        if name != "honest":
            out[f"caught_rate_{name}"], out[f"caught_by_{name}"] = t.rate, by
            out[f"unchanged_{name}"] = t.unchanged
            trusted, new = (1 / (rates.lone_rate * t.rate), 1 / t.rate) if t.rate else (None, None)
            out[f"expected_rounds_to_catch_{name}"] = trusted
            out[f"expected_rounds_to_catch_new_{name}"] = new
            to_catch = f"{trusted:.0f} / {new:.2f}" if trusted and new else "never"
        unchanged = f" ({t.unchanged} unchanged)" if t.unchanged else ""
        table.add_row(name, f"{t.failed}/{t.replayed}{unchanged}", by, s1, s2, to_catch)
    console.print(table)
    console.print(
        f"honest parts: mean distance {out['honest_mean_distance_min']:.3f}–"
        f"{out['honest_mean_distance_max']:.3f} levels (no limit: bounded by the band), outside "
        f"the band at most {out['honest_outside_band_max']:.2e} (limit {OUT_OF_BAND_LIMIT}). A "
        f"replay costs "
        f"{cost:.2f} of its round: {out['replay_cost_fraction_group']:.3f} of a trusted "
        f"trainer's compute in groups (rate {rates.rate}), "
        f"{out['replay_cost_fraction_lone']:.3f} alone (rate {rates.lone_rate})."
    )
    console.print("goals: " + ", ".join(f"{k} {'≥' if k == 'caught_rate' else '≤'} {v}"
                                        for k, v in GOALS.items()))  # fmt: skip
    write_result(args.out, {**out, "rounds": rounds, "model": args.model,
                            "max_tokens": args.max_tokens, "trainer_threads": THREADS,
                            "inner_steps": TrainSettings().diloco.inner_steps,
                            "completions_per_round": mean(completions),
                            "replay_rate": rates.rate, "replay_lone_rate": rates.lone_rate,
                            "seconds": time.perf_counter() - began,
                            **{f"goal_{k}": v for k, v in GOALS.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
