"""Calibrate the verification thresholds from honest generations, per (producer, verifier) dtype.

For each profile — ``fp32`` and ``bf16`` (both sides in that dtype; verifiers replay in the
producer's declared dtype), or on request a cross pair such as ``bf16>fp32`` (a bf16 producer
checked in fp32, to measure why verifiers do not) — the tiny model in the producer's dtype generates
honest samples exactly as an inference node does (leases of 8 prompts x 4 samples, batched
KV-cache decoding, seeds derived from the lease, several environments and sampling settings,
greedy included), and the tiny model in the verifier's dtype replays each one (one prefill per
sample). Per sample we record the worst replay
margin and the worst logprob difference. A threshold is the honest extreme times a safety factor,
never below a floor: honest work passes with room to spare, while a wrong token costs whole nats.
Finally every payload is re-checked with ``verify_payload`` under the new thresholds: the count
of honest payloads refused (false positives) is reported and must be 0.

Writes ``verification/thresholds.toml`` (thresholds and a summary of the data) and
``bench-results/calibration.json``.

Run: ``python scripts/calibrate_verification.py [--samples 1024] [--profiles fp32,bf16>fp32]``
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from envs import load_environment  # noqa: E402
from node.model.backends.torch_backend import TorchBackend  # noqa: E402
from node.model.loading import resolve  # noqa: E402
from node.model.rollouts import generate_rollouts  # noqa: E402
from protocol.leases import Lease, SamplingParams  # noqa: E402
from protocol.rollouts import RolloutPayload  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from verification.checks import (  # noqa: E402
    THRESHOLDS_DIR,
    THRESHOLDS_FILE,
    Thresholds,
    model_key,
    replay_sample,
    verify_payload,
)
from verification.rollouts import lease_examples, prompt_ids, sample_tokens  # noqa: E402

PROFILES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAFETY = 4.0
FLOORS = {"fp32": 1e-3, "bf16": 0.05}
"""Lowest threshold per profile: fp32 replays agree to ~1e-6, so 1e-3 is still tiny next to the
nats a wrong token costs; bf16 carries ~3 significant digits."""
SLACKS = {"fp32": 0.001, "bf16": 0.03}
"""Probability mass by which a producer may place the top-p boundary elsewhere than its verifier:
fp32 logits agree to ~1e-6; bf16 logits carry ~3 digits, and an honest bf16 lease put a token of
mass 0.03 on the other side of a 0.95 boundary, 0.027 from it (its logprob moved 0.03 nats, the
margin 0.08). A wider slack lets a producer claim more: 0.05 let a cheat that inflates logprobs
by 0.15 nats pass on a lease of near-certain tokens as boundary flips."""
LEASE_FLOORS = {
    "mean_logprob_diff": 0.01, "drift": 0.001, "replaced_rate": 0.002,
}  # fmt: skip
"""Lowest lease-wide limits: a hundredth of a nat a token on average, a drift of 0.001 nats,
and one token in 500 off the seeded pick — honest replays on one machine are often exact, which
must not make the limits zero."""
SETTINGS = [
    ('arith {"digits":2}', SamplingParams(temperature=1.0, top_p=1.0, max_tokens=16)),
    ("reverse", SamplingParams(temperature=0.7, top_p=0.9, max_tokens=24)),
    ("sort", SamplingParams(temperature=1.0, top_p=0.95, max_tokens=32)),
    ('arith {"digits":3}', SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16)),
]
PROMPTS, GROUP = 8, 4
DRIFT_SAFETY = 1.5
"""A lease's drift (``Thresholds.max_drift``) is taken over its ~100+ tokens, far steadier than a
single token's worst case. On the tiny model in bf16, over 448 honest leases and 64 with 1 %
weight noise, the noisiest lease's drift was 2.4x the honest maximum whenever the noise changed a
token (the median alone separated them 1.2x, the root mean square 1.3x): 1.5x leaves honest
leases room and still fails every such lease."""


def honest_leases(
    backend: TorchBackend, samples: int, seed: int = 0
) -> list[tuple[Any, Lease, RolloutPayload]]:
    out: list[tuple[Any, Lease, RolloutPayload]] = []
    i = 0
    while len(out) * PROMPTS * GROUP < samples:
        env_name, sampling = SETTINGS[i % len(SETTINGS)]
        env = load_environment(env_name)
        lease = Lease(
            lease_id=f"cal-{i}", run_id="calibration", env_id=env.name, env_version=env.version,
            env_seed=1000 + i, example_indices=list(range(PROMPTS)), group_size=GROUP,
            policy_version=0, sampling=sampling, deadline_ms=0,
            lease_seed=hashlib.sha256(f"{seed}/{i}".encode()).digest(),
        )  # fmt: skip
        out.append((env, lease, generate_rollouts(backend, backend.tokenizer, env, lease)))
        i += 1
    return out


def per_sample_stats(
    backend: TorchBackend,
    leases: list[tuple[Any, Lease, RolloutPayload]],
    slack: float,
    progress: Progress,
) -> tuple[list[float], list[float]]:
    margins, diffs = [], []
    task = progress.add_task("replaying", total=sum(len(p.samples) for _, _, p in leases))
    for env, lease, payload in leases:
        prompts = [prompt_ids(backend.tokenizer, ex.prompt) for ex in lease_examples(env, lease)]
        for k, s in enumerate(payload.samples):
            ids, claimed = (a.tolist() for a in sample_tokens(s))
            m, d = replay_sample(
                backend.prefill_logits(prompts[k // GROUP], ids), ids, s.seed, claimed,
                lease.sampling.temperature, lease.sampling.top_p, slack,
            )  # fmt: skip
            margins.append(float(m.max()))
            diffs.append(float(d.max()))
            progress.advance(task)
    return margins, diffs


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "max": ordered[-1],
        "p999": ordered[min(len(ordered) - 1, int(0.999 * len(ordered)))],
        "p99": ordered[int(0.99 * (len(ordered) - 1))],
        "median": statistics.median(ordered),
        "nonzero_fraction": sum(v > 0 for v in ordered) / len(ordered),
    }


def calibrate(
    profile: str, samples: int, progress: Progress, seed: int = 0, model: str = "tiny"
) -> dict[str, Any]:
    producer_dtype, _, verifier_dtype = profile.partition(">")
    ref = resolve(model, data_dir())
    producer = TorchBackend.from_pretrained(ref, dtype=PROFILES[producer_dtype])
    backend = TorchBackend.from_pretrained(ref, dtype=PROFILES[verifier_dtype or producer_dtype])
    started = time.perf_counter()
    leases = honest_leases(producer, samples, seed)
    slack = max(SLACKS[producer_dtype], SLACKS[verifier_dtype or producer_dtype])
    margins, diffs = per_sample_stats(backend, leases, slack, progress)
    floor = max(FLOORS[producer_dtype], FLOORS[verifier_dtype or producer_dtype])
    per_token = Thresholds(
        max_margin=max(floor, SAFETY * max(margins)),
        max_logprob_diff=max(floor, SAFETY * max(diffs)),
        top_p_slack=slack,
    )
    vocab = backend.base.config.vocab_size

    def audit(thresholds: Thresholds) -> list[Any]:
        return [verify_payload(
            lease, payload, env, backend.tokenizer, backend.eos_ids, vocab,
            backend.prefill_batch, thresholds,
        ) for env, lease, payload in leases]  # fmt: skip

    lease_stats = [o.stats for o in audit(per_token)]  # lease-wide: measured, not limited yet
    means = [st.get("mean_logprob_diff", 0.0) for st in lease_stats]
    drifts = [st.get("drift", 0.0) for st in lease_stats]
    replaced = [st.get("replaced_fraction", 0.0) for st in lease_stats]
    tokens = sum(st.get("tokens", 0.0) for st in lease_stats)
    off_pick = sum(st.get("replaced_fraction", 0.0) * st.get("tokens", 0.0) for st in lease_stats)
    rate = off_pick / max(1.0, tokens)
    thresholds = Thresholds(
        per_token.max_margin, per_token.max_logprob_diff,
        max_mean_logprob_diff=max(LEASE_FLOORS["mean_logprob_diff"], SAFETY * max(means)),
        max_drift=max(LEASE_FLOORS["drift"], DRIFT_SAFETY * max(drifts)),
        top_p_slack=slack,
        replaced_rate=max(LEASE_FLOORS["replaced_rate"], SAFETY * rate),
    )  # fmt: skip
    refusals = [f"{o.failed_check}: {o.detail}" for o in audit(thresholds) if not o.passed]
    refused = len(refusals)
    return {
        "profile": profile,
        "model_key": model_key(backend.base.config),
        "samples": len(margins),
        "payloads": len(leases),
        "thresholds": thresholds,
        "margin": summary(margins),
        "logprob_diff": summary(diffs),
        "lease_mean_logprob_diff": summary(means),
        "lease_drift": summary(drifts),
        "lease_replaced_fraction": summary(replaced),
        "replaced_rate": rate,
        "false_positive_payloads": refused,
        "refusals": refusals,
        "seconds": time.perf_counter() - started,
    }


def write_thresholds(results: list[dict[str, Any]], path: Path, model: str = "tiny") -> None:
    lines = [
        f"# Verification thresholds, calibrated from honest generations of the {model} model by",
        f"# scripts/calibrate_verification.py (threshold = max(floor, {SAFETY:g} x honest maximum;",
        f"# {DRIFT_SAFETY:g} x for the lease's drift)).",
        "# Do not edit by hand: rerun the script.",
        "",
    ]
    for r in results:
        t, m, d = r["thresholds"], r["margin"], r["logprob_diff"]
        lines += [
            f'["{r["profile"]}"]' if ">" in r["profile"] else f"[{r['profile']}]",
            f"max_margin = {t.max_margin:.6g}",
            f"max_logprob_diff = {t.max_logprob_diff:.6g}",
            f"max_mean_logprob_diff = {t.max_mean_logprob_diff:.6g}",
            f"max_drift = {t.max_drift:.6g}",
            f"top_p_slack = {t.top_p_slack:.6g}",
            f"replaced_rate = {t.replaced_rate:.6g}",
            f"# {r['samples']} honest samples in {r['payloads']} leases; false positives: "
            f"{r['false_positive_payloads']}",
            f"# replay margin: max {m['max']:.3g}, p99.9 {m['p999']:.3g}, p99 {m['p99']:.3g}, "
            f"nonzero in {m['nonzero_fraction']:.1%} of samples",
            f"# logprob diff: max {d['max']:.3g}, p99.9 {d['p999']:.3g}, p99 {d['p99']:.3g}, "
            f"median {d['median']:.3g}",
            f"# per lease: |mean logprob diff| max {r['lease_mean_logprob_diff']['max']:.3g}, "
            f"drift max {r['lease_drift']['max']:.3g}, "
            f"tokens off the seeded pick max {r['lease_replaced_fraction']['max']:.3g} of a lease, "
            f"{r['replaced_rate']:.3g} of all",
            "",
        ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="honest samples per profile")
    parser.add_argument("--profiles", default="fp32,bf16",
                        help="dtypes (producer and verifier alike), or PRODUCER>VERIFIER pairs "
                             "(measured, e.g. bf16>fp32; verifiers replay in the producer's "
                             "dtype instead)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="derives every lease's randomness")
    parser.add_argument("--model", default="tiny",
                        help="tiny (the default thresholds), or smollm2 (scripts/setup-smollm2): "
                             "written to verification/thresholds/<model key>.toml")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default: the model's file")
    args = parser.parse_args()
    console = Console()
    results = []
    with Progress(console=console) as progress:
        for profile in args.profiles.split(","):
            results.append(calibrate(profile, args.samples, progress, args.seed, args.model))
    out = args.out or (THRESHOLDS_FILE if args.model == "tiny" else
                       THRESHOLDS_DIR / f"{results[0]['model_key']}.toml")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"verification calibration (honest generations, {args.model} model)")
    for col in ("profile", "samples", "max margin", "max logprob diff", "thresholds", "refused"):
        table.add_column(col, justify="right")
    flat: dict[str, Any] = {}
    for r in results:
        t = r["thresholds"]
        table.add_row(
            r["profile"], str(r["samples"]), f"{r['margin']['max']:.3g}",
            f"{r['logprob_diff']['max']:.3g}", f"{t.max_margin:.3g} / {t.max_logprob_diff:.3g}",
            str(r["false_positive_payloads"]),
        )  # fmt: skip
        p = r["profile"].replace(">", "_checked_in_")
        flat.update({
            f"{p}_samples": r["samples"], f"{p}_max_margin": r["margin"]["max"],
            f"{p}_max_logprob_diff": r["logprob_diff"]["max"],
            f"{p}_threshold_margin": t.max_margin, f"{p}_threshold_logprob": t.max_logprob_diff,
            f"{p}_false_positive_payloads": r["false_positive_payloads"],
        })  # fmt: skip
    console.print(table)
    for r in results:
        for why in r["refusals"]:
            console.print(f"[red]{r['profile']}: an honest lease refused, {why}")
    write_thresholds(results, out, args.model)
    console.print(f"wrote {out}")
    name = "calibration" if args.model == "tiny" else f"calibration-{args.model}"
    write_result(REPO / "bench-results" / f"{name}.json", {**flat, "model": args.model})


if __name__ == "__main__":
    main()
