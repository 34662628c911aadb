"""Benchmark: the node's generation path against raw ``transformers`` ``generate``, same run.

Ours: ``TorchBackend.generate`` — batched KV-cache decoding with seeded Gumbel-max sampling
(noise over the whole vocabulary per token, every sample replayable). Baseline: the same model's
``model.generate(do_sample=True)`` (multinomial sampling, not replayable), same batch, prompt
lengths and number of new tokens (both ignore end-of-sequence so the token counts are equal).
Rounds alternate and the median is reported.

Metrics (bench-results/rollouts.json), per model (``_tiny``, ``_smollm2`` when installed):
  backend_tokens_per_s, hf_generate_tokens_per_s, backend_vs_hf_ratio (goal >= 0.95)
The lease-to-receipt metrics (node_tokens_per_s, receipts_per_s) come with the lease protocol.

Run: ``python scripts/bench_rollouts.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from envs import load_environment  # noqa: E402
from node.backends import Sampling  # noqa: E402
from node.backends.torch_backend import TorchBackend, left_pad, prompt_ids  # noqa: E402
from node.models.loading import SMOLLM2, resolve, smollm2_path  # noqa: E402
from node.sampling import derive_seed  # noqa: E402
from protocol.config import data_dir  # noqa: E402


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
    return {"backend_tokens_per_s": o, "hf_generate_tokens_per_s": h, "backend_vs_hf_ratio": o / h}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 cores)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "rollouts.json")
    args = parser.parse_args()
    batch, new_tokens, rounds = (8, 32, 3) if args.quick else (16, 64, 5)
    models: list[tuple[str, str]] = [("tiny", resolve("tiny", data_dir()))]
    if smollm2_path() is not None and not args.quick:
        models.append(("smollm2", resolve(SMOLLM2, data_dir())))
    result: dict[str, Any] = {}
    table = Table(title=f"generation: batch {batch}, {new_tokens} new tokens, CPU")
    for col in ("model", "bazaar backend tok/s", "transformers generate tok/s", "ratio"):
        table.add_column(col, justify="right")
    for name, ref in models:
        r = measure(TorchBackend.from_pretrained(ref), batch, new_tokens, rounds)
        result.update({f"{k}_{name}": v for k, v in r.items()})
        table.add_row(
            name,
            f"{r['backend_tokens_per_s']:,.0f}",
            f"{r['hf_generate_tokens_per_s']:,.0f}",
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
