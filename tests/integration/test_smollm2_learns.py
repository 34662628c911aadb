"""A real model gets better through the network: SmolLM2-135M-Instruct trains the shipped run
``examples/smollm2-arith.toml`` (one-digit sums asked as questions) through real processes — a
coordinator, two inference nodes (one of them serving), a verifier and two trainers, every one
loading the GGUF model — and the adapter it makes then beats the base model through the gateway.

Two pieces of evidence, neither of them the coordinator's own records:

- the reward of the completions the samplers committed, read from their signed payloads, rises
  from the first version to the last ones;
- base model and deployed adapter answer the same held-out examples, with the same seeds,
  through a gateway (``bazaar eval --compare``), and the adapter is better by more than the
  difference's 95 % interval.

The reward curve (``bazaar run plot``) and the evaluation are written to ``BAZAAR_RESULT_DIR``
when it is set (the README's figure and numbers come from there), else to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import msgspec
import openai
import pytest
from rich.console import Console

from bazaar.evaluate import evaluate_models, table
from node.model.loading import smollm2_path
from protocol.runs import load_spec
from tests.conftest import REPO
from tests.integration.cluster import Cluster
from tests.integration.test_learning import rewards_by_version
from tests.wait import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        smollm2_path() is None, reason="SmolLM2 GGUF not installed: run scripts/setup-smollm2"
    ),
]
SPEC = REPO / "examples" / "smollm2-arith.toml"
VERSIONS = 12
EVAL_N = 150


def test_smollm2_improves_through_the_network(cluster: Cluster, tmp_path: Path) -> None:
    out = Path(os.environ.get("BAZAAR_RESULT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_path()
    model = ["--model=smollm2", "--torch_threads=1"]
    cluster.start_coordinator(extra=["--leases.round_leases=1", f"--tokenizers.smollm2={gguf}"])
    spec = load_spec(SPEC)
    spec = msgspec.structs.replace(
        spec, stop=msgspec.structs.replace(spec.stop, max_rounds=VERSIONS)
    )
    cluster.api("POST", "/v1/runs", json=spec.to_dict())
    samplers = [
        cluster.start_node("sampler-1", extra=[*model, "--serve", "--preload=true"]),
        cluster.start_node("sampler-2", extra=[*model, "--preload=true"]),
    ]
    cluster.start_node("verifier", roles="verifier", extra=model)
    for i in (1, 2):
        cluster.start_node(f"trainer-{i}", roles="trainer", extra=model)
    run = cluster.wait_run(spec.name, "completed", timeout_s=2400, every_s=2)
    assert run["policy_version"] == VERSIONS

    rewards = rewards_by_version(samplers)
    curve = {v: round(statistics.mean(r), 3) for v, r in sorted(rewards.items())}
    first = statistics.mean(rewards[0])
    recent = [r for v in sorted(rewards)[-3:] for r in rewards[v]]
    assert sorted(rewards)[-3] > VERSIONS // 2, curve  # late leases, not early ones
    last = statistics.mean(recent)
    print(f"reward by version (samplers' payloads): {curve}")
    assert last >= first + 0.2, f"reward {first:.3f} -> {last:.3f}: {curve}"

    plot = subprocess.run(
        [sys.executable, "-m", "bazaar", "run", "plot", spec.name, "-o",
         str(out / "smollm2-reward.png"), "--coordinator-url", cluster.url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plot.returncode == 0, plot.stderr

    cluster.api("POST", f"/v1/runs/{spec.name}/deploy", json={})
    _, url, key = cluster.start_gateway()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)
    wait_until(lambda: {spec.base_model, spec.name} <= {m.id for m in client.models.list().data},
               300, every_s=1, what="the gateway routing base model and adapter")  # fmt: skip
    console = Console(width=120)
    results = evaluate_models(client, console, spec.env.name, spec.env.args,
                              [spec.base_model, spec.name], EVAL_N,
                              temperature=spec.rl.temperature,
                              max_tokens=spec.rl.max_tokens)  # fmt: skip
    title = f"{spec.env.name} {json.dumps(spec.env.args)}: {EVAL_N} held out"
    console.print(table(results, title))
    base, tuned = results[spec.base_model].avg, results[spec.name].avg
    interval = (base.ci95**2 + tuned.ci95**2) ** 0.5
    (out / "smollm2-learning.json").write_text(json.dumps({
        "spec": SPEC.name, "versions": VERSIONS, "reward_by_version": curve,
        "eval": {m: {"n": r.avg.n, "mean": r.avg.mean, "ci95": r.avg.ci95}
                 for m, r in results.items()},
        "difference": tuned.mean - base.mean, "difference_ci95": interval,
    }, indent=2) + "\n")  # fmt: skip
    assert tuned.mean - base.mean > interval, (base, tuned)
