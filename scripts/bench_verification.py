"""Benchmark: how well audits separate honest work from subtle cheats, per precision profile.

For each profile (``fp32``, ``bf16``: producer and verifier alike; a verifier replays in the dtype
a payload declares) the tiny model produces leases of 8 prompts x 4 samples over four
environments and sampling settings (greedy included), honestly and by three subtle cheats, and
the real checks (``verification.checks.verify_payload``, the profile's calibrated thresholds,
per token and per lease) audit each lease:

- ``noise_1pct``: the producer's weights carry 1 % Gaussian noise (a cheaper or damaged model);
- ``inflated_0.15``: every claimed logprob is 0.15 nats higher than the sampled one (capped at 0);
- ``runner_up_0.3``: wherever the seeded sampler's runner-up scores within 0.3 of its pick, the
  producer takes the runner-up (about one token in ten), reporting its true logprob.

Metrics per profile (JSON keys ``<profile>_<metric>``): ``false_positive_rate`` (honest leases
failed ÷ honest leases; goal 0, over ``--leases`` x 32 samples), ``caught_rate_<cheat>`` (cheating
leases failed ÷ cheating leases; goal ≥ 0.99), with the check that caught them (a lease the
cheat left as an honest producer makes it, logprobs within 1e-6, does not count:
``unchanged_<cheat>``), ``caught_rate_<cheat>_tokens_changed`` (the same over the leases whose
tokens it changed: a lease with the honest tokens and logprobs moved by less than honest bf16
rounding moves them is no cheat an audit can see, nor one that changes what is trained on), and
``verify_vs_generate_cost`` (seconds to audit a lease ÷ seconds to generate it, one thread; goal
≤ 0.1 — on the tiny model's short completions generation is no slower per token than a replay),
``audit_overhead_fraction`` (that cost times the audits made per rollout at the default rates,
``AuditConfig.steady_state_cost``: first looks, double-checks, known answers; goal ≤ 0.02).
The verifier shares the producer's profile, so a lease that looks off is replayed exactly
(``verification.checks.ESCALATE_AT``): ``exact_replay_rate`` is the share of honest leases that
were (their cost is in the two above), ``caught_rate_<cheat>_without_exact`` what the calibrated
thresholds alone catch — the baseline, and what a verifier of another device class gets
(``--no-exact``: no exact replays at all).

Trainers (``--trainer-rounds``, default 2; ``scripts/bench_replay.py`` runs more): a lone
trainer's rounds replayed, honest and by each trainer cheat — ``trainer_false_failures``,
``replay_cost_fraction`` (a replay's compute ÷ its round's at the default rate of a trusted
trainer in a group; ``_lone``: alone; goal ≤ 0.1) and ``trainer_caught_rate_<cheat>``.

Not measured here: producer and verifier on different devices (a GPU producer's bf16 against a
CPU verifier's), which needs a GPU.

Run: ``python scripts/bench_verification.py [--leases 32 | --quick]`` (``--model smollm2
--max-tokens 128
--only none``: the cost on a real model's longer completions); writes
``bench-results/verification.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from bazaar.up import tiny_model  # noqa: E402
from coordinator.config import AuditConfig  # noqa: E402
from envs import load_environment  # noqa: E402
from node.model.backends.torch_backend import TORCH_DTYPES, TorchBackend  # noqa: E402
from node.model.loading import resolve  # noqa: E402
from node.model.rollouts import Producer, regenerator  # noqa: E402
from protocol.leases import Lease, SamplingParams  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from tests.adversarial.cheaters import (  # noqa: E402
    NoisyWeights,
    SlightlyInflatedLogprobs,
    TakesCloseRunnerUps,
)
from verification.checks import (  # noqa: E402
    load_thresholds,
    model_key,
    thresholds_path,
    verify_payload,
)
from verification.rollouts import sample_tokens  # noqa: E402

SETTINGS = [("arith", {"digits": 2}, 1.0, 1.0), ("reverse", {}, 0.7, 0.9),
            ("sort", {}, 1.0, 0.95), ("countdown", {}, 0.0, 1.0)]  # fmt: skip
GOALS = {"false_positive_rate": 0.0, "caught_rate": 0.99, "verify_vs_generate_cost": 0.1,
         "audit_overhead_fraction": 0.02, "replay_cost_fraction": 0.1}  # fmt: skip


def lease_for(n: int, max_tokens: int = 24) -> tuple[Any, Lease]:
    name, args, t, top_p = SETTINGS[n % len(SETTINGS)]
    env = load_environment(name, **args)
    lease = Lease(
        lease_id=f"bench-{n}", run_id="bench", env_id=env.name, env_version=env.version,
        env_seed=50_000 + n, example_indices=list(range(8)), group_size=4, policy_version=0,
        sampling=SamplingParams(temperature=t, top_p=top_p, max_tokens=max_tokens),
        lease_seed=n.to_bytes(4, "big") * 8, deadline_ms=0,
    )  # fmt: skip
    return env, lease


def play(
    profile: str,
    leases: int,
    progress: Progress,
    model: str = "tiny",
    max_tokens: int = 24,
    only: tuple[str, ...] = (),
    exact: bool = True,
) -> dict[str, Any]:
    """One profile's audits; ``only``: the cheats to play (empty: all); ``exact``: suspicious
    leases are replayed exactly (the verifier shares the producer's profile)."""
    ref = str(tiny_model(data_dir())) if model == "tiny" else resolve(model, data_dir())
    verifier = TorchBackend.from_pretrained(ref, dtype=TORCH_DTYPES[profile])  # type: ignore[index]
    thresholds = load_thresholds(profile, thresholds_path(model_key(verifier.base.config)))
    producers: dict[str, Callable[[], Producer]] = {
        "honest": lambda: Producer(verifier, verifier.tokenizer),
        "noise_1pct": lambda: NoisyWeights(verifier, 0.01),
        "inflated_0.15": lambda: SlightlyInflatedLogprobs(verifier, verifier.tokenizer),
        "runner_up_0.3": lambda: TakesCloseRunnerUps(verifier, verifier.tokenizer),
    }
    producers = {k: v for k, v in producers.items() if k == "honest" or not only or k in only}
    out: dict[str, Any] = {}
    honest: list[Any] = []
    task = progress.add_task(f"{profile}", total=leases * len(producers))
    for name, make in producers.items():
        producer, failed, checks, gen_s, ver_s = make(), 0, Counter[str](), 0.0, 0.0
        unchanged, same_tokens, same_tokens_failed, escalated, by_exact = 0, 0, 0, 0, 0
        for n in range(leases):
            env, lease = lease_for(n, max_tokens)
            started = time.perf_counter()
            payload = producer.produce(env, lease)
            gen_s += time.perf_counter() - started
            if name == "honest":
                honest.append(payload.samples)
            elif _same(payload.samples, honest[n], logprobs=True):  # changed nothing: no cheat
                unchanged += 1
                progress.advance(task)
                continue
            started = time.perf_counter()
            outcome = verify_payload(
                lease, payload, env, verifier.tokenizer, verifier.eos_ids,
                verifier.base.config.vocab_size, verifier.prefill_batch, thresholds,
                regenerate=regenerator(verifier, env, lease, payload.profile) if exact else None,
            )  # fmt: skip
            escalated += "exact_replay" in outcome.stats
            by_exact += not outcome.passed and "exact_replay" in outcome.stats
            ver_s += time.perf_counter() - started
            failed += not outcome.passed
            if name != "honest" and _same(payload.samples, honest[n], logprobs=False):
                same_tokens += 1
                same_tokens_failed += not outcome.passed
            checks[outcome.failed_check or "passed"] += 1
            progress.advance(task)
        if name == "honest":
            out["false_positive_rate"] = failed / leases
            out["honest_samples"] = leases * 32
            out["verify_vs_generate_cost"] = ver_s / gen_s
            out["audit_overhead_fraction"] = AuditConfig().steady_state_cost() * ver_s / gen_s
            out["exact_replay_rate"] = escalated / leases
        else:
            out[f"caught_rate_{name}"] = failed / max(1, leases - unchanged)
            out[f"caught_rate_{name}_without_exact"] = (failed - by_exact) / max(
                1, leases - unchanged
            )
            changed_tokens = leases - unchanged - same_tokens
            if changed_tokens:  # a cheat on logprobs alone changes no token
                out[f"caught_rate_{name}_tokens_changed"] = (
                    failed - same_tokens_failed
                ) / changed_tokens
            out[f"same_tokens_{name}"] = same_tokens
            out[f"caught_by_{name}"] = dict(checks)
            out[f"unchanged_{name}"] = unchanged
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=32, help="leases per producer (32 samples)")
    parser.add_argument("--profiles", default="fp32,bf16")
    parser.add_argument("--model", default="tiny",
                        help="tiny, or smollm2 (scripts/setup-smollm2), with the thresholds "
                             "calibrated for it (else the tiny model's)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=24, help="each lease's max_tokens")
    parser.add_argument("--only", default="", help="cheats besides honest ('none': no cheat)")
    parser.add_argument(
        "--trainer-rounds",
        type=int,
        default=2,
        help="rounds per trainer replayed (scripts/bench_replay.py; 0: none)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "verification.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 leases per producer and 1 trainer round: every metric, roughly",
    )
    parser.add_argument(
        "--no-exact", action="store_true", help="the calibrated thresholds alone: no exact replay"
    )
    args = parser.parse_args()
    if args.quick:
        args.leases, args.trainer_rounds = 4, min(args.trainer_rounds, 1)
    torch.set_num_threads(1)
    console = Console()
    results: dict[str, dict[str, Any]] = {}
    with Progress(console=console) as progress:
        for profile in args.profiles.split(","):
            only = tuple(c for c in args.only.split(",") if c)
            results[profile] = play(
                profile,
                args.leases,
                progress,
                args.model,
                args.max_tokens,
                only,
                exact=not args.no_exact,
            )
        trainers = (
            replayed_trainers(args.trainer_rounds, progress) if args.trainer_rounds > 0 else {}
        )
    table = Table(title=f"audits of honest and subtly cheating leases ({args.leases} each)",
                  caption="caught / caught where the cheat changed a token (caught without "
                          "exact replays); which checks: caught_by_* in the JSON")  # fmt: skip
    cheats = ("noise_1pct", "inflated_0.15", "runner_up_0.3")
    for col in (
        "profile",
        "false positives",
        *cheats,
        "exact replays",
        "verify ÷ generate",
        "audit overhead",
    ):
        table.add_column(col, justify="right")
    flat: dict[str, Any] = {}
    for profile, r in results.items():
        table.add_row(profile, f"{r['false_positive_rate']:.3f} of {r['honest_samples']}",
                      *[f"{r[f'caught_rate_{c}']:.2f}{_tokens_changed(r, c)} "
                        f"({r[f'caught_rate_{c}_without_exact']:.2f})"
                        if f"caught_rate_{c}" in r else "—" for c in cheats],
                      f"{r['exact_replay_rate']:.2f}",
                      f"{r['verify_vs_generate_cost']:.2f}",
                      f"{r['audit_overhead_fraction']:.3f}")  # fmt: skip
        flat.update({f"{profile}_{k}": v for k, v in r.items() if not isinstance(v, dict)})
    console.print(table)
    if trainers:
        console.print(
            f"trainers ({args.trainer_rounds} rounds each, scripts/bench_replay.py): honest "
            f"{trainers['trainer_false_failures']} false failures; replay_cost_fraction "
            f"{trainers['replay_cost_fraction']:.3f} in groups, "
            f"{trainers['replay_cost_fraction_lone']:.3f} alone; caught: "
            + ", ".join(f"{k.removeprefix('trainer_caught_rate_')} {v:.2f}"
                        for k, v in trainers.items() if k.startswith("trainer_caught_rate_"))
        )  # fmt: skip
    console.print("goals: " + ", ".join(f"{k} {'≥' if k == 'caught_rate' else '≤'} {v}"
                                        for k, v in GOALS.items()))  # fmt: skip
    write_result(args.out, {**flat, **trainers, "leases": args.leases, "model": args.model,
                            "max_tokens": args.max_tokens,
                            **{f"goal_{k}": v for k, v in GOALS.items()}})  # fmt: skip


def replayed_trainers(rounds: int, progress: Progress) -> dict[str, Any]:
    """The trainers' side (``scripts/bench_replay.py``, tiny model): a lone trainer's rounds
    replayed, honest and by each trainer cheat; ``replay_cost_fraction`` at the default rate of
    a trusted trainer in a group (``_lone``: alone) and each cheat's ``caught_rate``."""
    import tempfile

    import bench_replay

    ref = str(tiny_model(data_dir()))
    with tempfile.TemporaryDirectory() as held:
        tallies, baseline, _ = bench_replay.bench(rounds, ref, 24, Path(held), progress)
    out, _ = bench_replay.measures(tallies, baseline)
    return {
        "trainer_false_failures": tallies["honest"].failed,
        "replay_cost_fraction": out["replay_cost_fraction_group"],
        "replay_cost_fraction_lone": out["replay_cost_fraction_lone"],
        **{f"trainer_caught_rate_{name}": t.rate for name, t in tallies.items()
           if name != "honest"},
    }  # fmt: skip


def _same(a: list[Any], b: list[Any], logprobs: bool) -> bool:
    """Whether two leases' samples hold the same tokens (and, with ``logprobs``, logprobs within
    1e-6 nats: a cheat that moves none further has changed nothing)."""
    for x, y in zip(a, b, strict=True):
        (ids_x, lp_x), (ids_y, lp_y) = sample_tokens(x), sample_tokens(y)
        if ids_x.tolist() != ids_y.tolist():
            return False
        if logprobs and (len(lp_x) != len(lp_y) or abs(lp_x - lp_y).max(initial=0.0) > 1e-6):
            return False
    return True


def _tokens_changed(r: dict[str, Any], cheat: str) -> str:
    rate = r.get(f"caught_rate_{cheat}_tokens_changed")
    return "" if rate is None else f" / {rate:.2f}"


if __name__ == "__main__":
    main()
