"""Benchmark: an inference node's rollouts against raw ``transformers`` ``generate``, same run.

**Node, lease to receipt.** A real coordinator process and a real node process on loopback; a run
is created over the REST API and the node takes its leases, generates every group, signs and
stores the payload and gets its receipt acknowledged. Throughput = completion tokens of the
counted receipts / (last receipt − first lease), after a warm-up run (model loading excluded).
Baseline: the same model's ``generate(do_sample=True)`` in this process on exactly the same
batches (each lease's prompts × group size), same temperature and ``max_new_tokens``, stopping at
end-of-sequence like the node; tokens are counted up to each row's end, as the node counts them.
The two phases alternate and never overlap; the ratio is the median of the rounds' ratios.

Metrics: node_tokens_per_s, hf_generate_tokens_per_s, node_vs_hf_ratio (goal >= 0.95),
receipts_per_s.

**Backend alone.** ``TorchBackend.generate`` — batched KV-cache decoding with seeded Gumbel-max
sampling (noise over the whole vocabulary per token, every sample replayable). Baseline: the same
model's ``model.generate(do_sample=True)`` (multinomial sampling, not replayable), same batch,
prompt lengths and number of new tokens (both ignore end-of-sequence so token counts are equal).
Rounds alternate and the median is reported.

Metrics, per model (``_tiny``, ``_smollm2`` when installed): backend_tokens_per_s,
backend_hf_generate_tokens_per_s, backend_vs_hf_ratio.

Results go to bench-results/rollouts.json.

Run: ``python scripts/bench_rollouts.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from envs import load_environment  # noqa: E402
from node.model.backends import Sampling  # noqa: E402
from node.model.backends.torch_backend import TorchBackend  # noqa: E402
from node.model.batching import left_pad  # noqa: E402
from node.model.loading import SMOLLM2, resolve, smollm2_path  # noqa: E402
from protocol.leases import Lease  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from tests.integration.cluster import Cluster  # noqa: E402
from verification.rollouts import lease_examples, prompt_ids  # noqa: E402
from verification.sampling import derive_seed  # noqa: E402


def measure(backend: TorchBackend, batch: int, new_tokens: int, rounds: int) -> dict[str, float]:
    tok = backend.tokenizer
    env = load_environment("gsm")
    prompts = [prompt_ids(tok, e.prompt) for e in env.examples(0, 0, batch)]
    seeds = [derive_seed(bytes(32), i, 0) for i in range(batch)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=new_tokens, ignore_eos=True)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]

    def ours() -> int:
        return sum(len(g.token_ids) for g in backend.generate(prompts, seeds, sampling))

    def hf() -> int:
        with torch.no_grad():
            out = backend.base.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        return int((out.shape[1] - width) * batch)

    ours(), hf()  # warm up
    ours_tps, hf_tps = [], []
    for _ in range(rounds):
        for fn, into in ((ours, ours_tps), (hf, hf_tps)):
            t0 = time.perf_counter()
            n = fn()
            into.append(n / (time.perf_counter() - t0))
    o, h = statistics.median(ours_tps), statistics.median(hf_tps)
    return {
        "backend_tokens_per_s": o,
        "backend_hf_generate_tokens_per_s": h,
        "backend_vs_hf_ratio": o / h,
    }


def hf_tokens(backend: TorchBackend, prompts: list[list[int]], temperature: float, n: int) -> int:
    """Generate like the node does (stop at end-of-sequence) and count each row's tokens."""
    tok = backend.tokenizer
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        out = backend.base.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
            top_p=1.0, top_k=0, max_new_tokens=n, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    total = 0
    for row in out[:, ids.shape[1] :].tolist():
        ends = [i for i, t in enumerate(row) if t in backend.eos_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


def measure_node(
    model: str, model_cache: Path, backend: TorchBackend, leases: int, prompts: int, group: int,
    max_tokens: int, rounds: int,
) -> dict[str, float]:  # fmt: skip
    """Lease-to-receipt throughput of a real node, alternating with the baseline."""

    def spec_of(name: str, examples: int) -> dict[str, Any]:
        return {"name": name, "env": {"name": "reverse"}, "base_model": model,
                "rl": {"group_size": group, "prompts_per_lease": prompts, "temperature": 1.0,
                       "max_tokens": max_tokens, "max_examples": examples}}  # fmt: skip

    env = load_environment("reverse")
    node_tps, receipt_rate, hf_tps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), interval_s=2.0)
        try:
            cluster.start_coordinator()
            cluster.start_node("bench", extra=[f"--model_cache={model_cache}", f"--model={model}",
                                               f"--max_prompts_per_lease={prompts}"])  # fmt: skip
            cluster.api("POST", "/v1/runs", json=spec_of("warmup", prompts))
            cluster.wait_run("warmup", timeout_s=300)  # the node has loaded its model
            for r in range(rounds):
                run_id = f"bench-{r}"
                cluster.api("POST", "/v1/runs", json=spec_of(run_id, leases * prompts))
                run = cluster.wait_run(run_id, timeout_s=600, every_s=1.0)  # light polling
                rollouts = cluster.api("GET", f"/v1/runs/{run_id}/rollouts")["data"]
                wall = max(x["completed_at"] for x in rollouts) - min(
                    x["issued_at"] for x in rollouts
                )
                node_tps.append(run["completion_tokens"] / wall)
                receipt_rate.append(len(rollouts) / wall)
                # the baseline: the very same batches, in this process, while the node idles
                tokens, t0 = 0, time.perf_counter()
                for x in rollouts:
                    lease = msgspec.convert(
                        {**x["lease"], "lease_seed": bytes.fromhex(x["lease"]["lease_seed"])},
                        Lease,
                    )
                    examples = lease_examples(env, lease)
                    batch = [prompt_ids(backend.tokenizer, ex.prompt) for ex in examples]
                    batch = [p for p in batch for _ in range(group)]
                    tokens += hf_tokens(backend, batch, 1.0, max_tokens)
                hf_tps.append(tokens / (time.perf_counter() - t0))
        finally:
            cluster.stop_all()
    ratios = [n / h for n, h in zip(node_tps, hf_tps, strict=True)]  # side by side, per round
    return {
        "node_tokens_per_s": statistics.median(node_tps),
        "hf_generate_tokens_per_s": statistics.median(hf_tps),
        "node_vs_hf_ratio": statistics.median(ratios),
        "receipts_per_s": statistics.median(receipt_rate),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 cores)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "rollouts.json")
    parser.add_argument(
        "--node-model",
        default="tiny",
        help="the node's model: tiny (16x8 leases) or smollm2 (4x4 leases of <= 32 tokens)",
    )
    args = parser.parse_args()
    batch, new_tokens, rounds = (8, 32, 3) if args.quick else (16, 64, 5)
    leases, prompts, group, max_tokens = (24, 16, 8, 48) if args.quick else (60, 16, 8, 64)
    if args.node_model == "smollm2":
        leases, prompts, group, max_tokens = 6, 4, 4, 32
    models: list[tuple[str, str]] = [("tiny", resolve("tiny", data_dir()))]
    node_backend = TorchBackend.from_pretrained(resolve(args.node_model, data_dir()))
    node = measure_node(
        args.node_model, data_dir(), node_backend, leases, prompts, group, max_tokens,
        2 if args.node_model == "smollm2" else 4 if args.quick else 6,
    )  # fmt: skip
    title = f"inference node, lease to receipt: {leases} leases of {prompts} prompts x {group}"
    ntable = Table(title=f"{title} samples, <= {max_tokens} tokens, {args.node_model}")
    for col in ("node tok/s", "transformers generate tok/s", "ratio", "receipts/s"):
        ntable.add_column(col, justify="right")
    ntable.add_row(
        f"{node['node_tokens_per_s']:,.0f}",
        f"{node['hf_generate_tokens_per_s']:,.0f}",
        f"{node['node_vs_hf_ratio']:.2f}",
        f"{node['receipts_per_s']:.1f}",
    )
    Console().print(ntable)
    if smollm2_path() is not None and not args.quick:
        models.append(("smollm2", resolve(SMOLLM2, data_dir())))
    result: dict[str, Any] = dict(node)
    table = Table(title=f"generation: batch {batch}, {new_tokens} new tokens, CPU")
    for col in ("model", "bazaar backend tok/s", "transformers generate tok/s", "ratio"):
        table.add_column(col, justify="right")
    for name, ref in models:
        r = measure(TorchBackend.from_pretrained(ref), batch, new_tokens, rounds)
        result.update({f"{k}_{name}": v for k, v in r.items()})
        table.add_row(
            name,
            f"{r['backend_tokens_per_s']:,.0f}",
            f"{r['backend_hf_generate_tokens_per_s']:,.0f}",
            f"{r['backend_vs_hf_ratio']:.2f}",
        )
    result.update(
        {k.removesuffix("_tiny"): v for k, v in result.items() if k.endswith("_tiny")},
        batch=batch, new_tokens=new_tokens, quick=int(args.quick),
    )  # fmt: skip
    Console().print(table)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
