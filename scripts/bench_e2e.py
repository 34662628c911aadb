"""Benchmark: the demo run to its target reward through a local network vs centralized GRPO.

Both train the demo spec (``examples/arith-tiny.toml``: one-digit additions on the tiny model,
LoRA rank 8, groups of 8, 32 prompts a lease, H = 4 inner AdamW steps, outer lr 1, fp16 wire)
until the completions sampled at one version reach ``--target`` mean reward over at least
``--min-samples`` of them — the spec's ``stop.target_reward`` rule, which the coordinator
applies to the rewards trainers report. Same machine, same tokens: a round is one lease of
the spec's prompts × 8 completions (the coordinator runs with ``round_leases = 1``) in both;
``--split K`` cuts the network's rounds into K leases of 1/K of the prompts each, which the
samplers sample side by side (the same tokens a round).

- **Network**: ``bazaar up``'s processes without the gateway — a coordinator and N nodes (two
  samplers, one of them verifying, and a trainer for N = 3), every one a real process on
  loopback; the run is submitted with a researcher's key and timed from submission to the
  coordinator marking it ``completed`` for ``target_reward``. The nodes have joined before;
  they load their models when the run's first lease or round reaches them, inside the timed
  window. Rollouts cross py-libp2p, versions are published as signed manifests and fetched as
  shards, and every round is billed.
- **Centralized**: one process with every core (``torch.set_num_threads(cpu_count)``), the
  same sampler (``TorchBackend``, the new weights hot-swapped in each round), the same scoring,
  the same trainer (``Trainer.build``: the spec's LoRA, loss, inner lr, quantizer and outer
  step), fully on-policy: each round samples with the current weights, takes H steps and the
  outer step. Timed from loading its models, as the network's nodes are.

Besides the time to target, each side's time to its first version (model loading and the first
round) and its seconds per version after that are reported: the first is start-up, the second
the loop's speed.

``--model smollm2`` runs the same comparison on SmolLM2-135M-Instruct with its shipped run
(``examples/smollm2-arith.toml``: one-digit sums asked as questions; ``scripts/setup-smollm2``
installs the model), where compute, not coordination, dominates a version; its default target
is 0.6.

Each method runs ``--trials`` times (seeds ``--seed``, ``--seed + 1``, ...; a fresh network
each time); times are medians. ``time_ratio`` = network / centralized median time to target
(above 1: what the network's coordination costs on one machine, where its parallelism buys
nothing). How many versions a trial needs is a draw — a version's reward is measured on 64
completions — so ``s_per_version`` (and its ratio) tells speed apart from luck.
``billed_tokens_vs_processed`` is the run's charged tokens over the tokens its rounds
processed, recounted from the lease records and reports; it must be exactly 1.0, as must
``key_usage_vs_billed`` (the usage records on the researcher's key over the charges).

Run: ``python scripts/bench_e2e.py [--quick] [--model smollm2]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bazaar.up import DEMO_SPEC, LocalNetwork, tiny_model  # noqa: E402
from node.model.loading import resolve, smollm2_path  # noqa: E402
from protocol.runs import RunSpec, load_spec  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402

console = Console()
SPECS = {"tiny": DEMO_SPEC, "smollm2": REPO / "examples" / "smollm2-arith.toml"}
TARGETS = {"tiny": 0.4, "smollm2": 0.6}


def reached(rewards: list[dict[str, Any]], target: float, min_samples: int) -> int | None:
    """The first version whose sampled completions reach ``target`` (the coordinator's rule)."""
    return next((r["version"] for r in rewards
                 if r["samples"] >= min_samples and r["mean"] >= target), None)  # fmt: skip


def network(
    spec: RunSpec,
    nodes: int,
    cache: Path,
    timeout_s: float,
    retry_after_s: float,
    preload: bool = False,
    split: int = 1,
) -> dict[str, Any]:
    """The run through a network; ``split`` > 1 cuts each round's prompts into that many leases
    (``round_leases``), so that the samplers share a round's sampling."""
    model = spec.base_model
    rl = spec.rl
    if split > 1:
        if rl.prompts_per_lease % split:
            raise SystemExit(f"--split {split} does not divide {rl.prompts_per_lease} prompts")
        rl = msgspec.structs.replace(rl, prompts_per_lease=rl.prompts_per_lease // split)
        spec = msgspec.structs.replace(spec, rl=rl)
    from protocol.accounts import KeyStore, open_database

    root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    net = LocalNetwork(root, console, None)
    net.logs.mkdir(parents=True)
    try:
        home = root / "coordinator"
        url, maddr = net.start_coordinator(
            home, [f"--leases.round_leases={split}", f"--leases.retry_after_s={retry_after_s}",
                   f"--tokenizers.{model}={resolve(model, cache)}"],
        )  # fmt: skip
        # loading models counts, as for the centralized loop: not before the run is submitted
        # (unless --preload: samplers load theirs as they join, as `bazaar up` starts them)
        net.start_nodes(nodes, maddr, cache, serve=False, preload=preload, model=model)

        def alive() -> bool:
            data = httpx.get(f"{url}/v1/network/nodes", timeout=5).json()["data"]
            return sum(n["status"] == "alive" for n in data) >= nodes

        net.wait(f"{nodes} nodes joining", alive, 120)
        key, _ = KeyStore(open_database(f"sqlite:///{home / 'gateway.db'}")).create(
            "bench", budget_tokens=50_000_000
        )
        auth = {"Authorization": f"Bearer {key}"}
        started = time.perf_counter()
        resp = httpx.post(f"{url}/v1/runs", json=spec.to_dict(), headers=auth, timeout=30)
        resp.raise_for_status()
        run_id = resp.json()["id"]
        end = time.monotonic() + timeout_s
        with console.status("network: submitted") as status:
            while True:
                net.check()
                run = httpx.get(f"{url}/v1/runs/{run_id}", timeout=5).json()
                if run["state"] not in ("queued", "running"):
                    seconds = time.perf_counter() - started
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"the run did not end in {timeout_s:.0f} s; see {net.logs}")
                reward = run["reward"][0]["mean"] if run["reward"] else float("nan")
                status.update(f"network: v{run['policy_version']}, last reward {reward:.3f}")
                time.sleep(0.1)
        rewards = httpx.get(f"{url}/v1/runs/{run_id}/rewards", timeout=5).json()["data"]
        made = httpx.get(f"{url}/v1/runs/{run_id}/versions", timeout=5).json()["data"]
        at = {v["version"]: v["created_at"] for v in made}  # the coordinator's clock

        def settled() -> dict[str, Any] | None:
            """The run's reconciliation once its last round's budget hold is settled."""
            nonlocal run
            run = httpx.get(f"{url}/v1/runs/{run_id}", timeout=5).json()
            check = httpx.get(f"{url}/v1/ledger", params={"run": run_id}, timeout=5).json()
            c: dict[str, Any] = check["runs"][0]
            return c if run["held_tokens"] == 0 and c["key_usage"] is not None else None

        ledger = net.wait("the run's bill settling", settled, 60)
    finally:
        net.stop(interrupted=False)
    shutil.rmtree(root, ignore_errors=True)  # kept if the run failed: its logs say why
    last = max(at)
    return {
        "stop_reason": run["stop_reason"], "seconds": seconds, "versions": last,
        "first_version_s": at[1] - run["created_at"],
        "s_per_version_after": (at[last] - at[1]) / (last - 1) if last > 1 else None,
        "rewards": rewards,
        "sampled_tokens": run["completion_tokens"],
        "billed": ledger["charged"], "processed": ledger["recounted"],
        "key_usage": ledger["key_usage"],
    }  # fmt: skip


def central(spec: RunSpec, path: str, max_rounds: int, seed: int) -> dict[str, Any]:
    import torch

    from coordinator.runs import plan_run
    from envs import load_environment
    from node.model.backends.torch_backend import TorchBackend
    from node.model.rollouts import Producer, completion_tokens
    from node.training.trainer import Trainer
    from protocol.leases import Lease

    torch.set_num_threads(os.cpu_count() or 1)
    settings = spec.training()
    env = load_environment(spec.env.name, **spec.env.args)
    started = time.perf_counter()  # loading its models is part of its time, as on the network
    backend = TorchBackend.from_pretrained(path)
    producer = Producer(backend, backend.tokenizer)
    trainer = Trainer.build(path, "central", settings)
    rl, stop = spec.rl, spec.stop
    sampling = plan_run(spec).sampling()  # the network's: turns per sample included
    rewards: list[dict[str, Any]] = []
    sampled, first = 0, 0.0
    with tempfile.TemporaryDirectory() as tmp, console.status("centralized") as status:
        for v in range(max_rounds):
            name = f"v{v}"
            backend.load_adapter(name, str(trainer.model.save(Path(tmp) / name)))
            p = rl.prompts_per_lease
            lease = Lease(
                lease_id=f"c{v}", run_id="central", env_id=env.name, env_version=env.version,
                env_seed=seed, example_indices=list(range(v * p, (v + 1) * p)),
                group_size=rl.group_size, policy_version=v, sampling=sampling,
                lease_seed=(seed + v).to_bytes(32, "little"), deadline_ms=0,
            )  # fmt: skip
            payload = producer.produce(env, lease, adapter=name)
            backend.unload_adapter(name)
            scores, examples = trainer.examples(env, lease, payload, settings.loss.std_normalize)
            sampled += completion_tokens(payload)
            values = [s.reward for g in scores for s in g]
            rewards.append({"version": v, "samples": len(values),
                            "mean": sum(values) / len(values)})  # fmt: skip
            trainer.round(examples, settings.diloco.inner_steps)  # alone: no collective
            first = first or time.perf_counter()
            status.update(f"centralized: v{v + 1}, last reward {rewards[-1]['mean']:.3f}")
            if reached(rewards, stop.target_reward or 1.0, stop.min_samples) is not None:
                break
    end = time.perf_counter()
    return {"seconds": end - started, "versions": len(rewards), "first_version_s": first - started,
            "s_per_version_after": (end - first) / (len(rewards) - 1) if len(rewards) > 1 else None,
            "rewards": rewards,
            "sampled_tokens": sampled}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one trial to 0.3 (under a minute)")
    parser.add_argument("--model", choices=sorted(SPECS), default="tiny",
                        help="the base model, with its shipped run")  # fmt: skip
    parser.add_argument("--target", type=float, default=None,
                        help="target mean reward (tiny 0.4, smollm2 0.6)")  # fmt: skip
    parser.add_argument("--min-samples", type=int, default=64)
    parser.add_argument("--max-rounds", type=int, default=60, help="give up after this many")
    parser.add_argument("--trials", type=int, default=3, help="runs of each; medians reported")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-after", type=float, default=1.0,
                        help="the coordinator's leases.retry_after_s")  # fmt: skip
    parser.add_argument("--split", type=int, default=1,
                        help="the network's leases per round: a round's prompts cut into that "
                             "many leases, sampled side by side (the centralized loop samples "
                             "the round as one)")  # fmt: skip
    parser.add_argument("--preload", action="store_true",
                        help="samplers load their models as they join, before the run (as "
                             "`bazaar up` starts them): the network's clock then starts with "
                             "their models loaded, the centralized loop's does not")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "e2e.json")
    args = parser.parse_args()
    if args.target is None:
        args.target = TARGETS[args.model]
    if args.quick:
        args.target, args.max_rounds, args.trials = min(args.target, 0.3), 30, 1
    if args.model == "smollm2" and smollm2_path() is None:
        parser.error("SmolLM2 is not installed: run scripts/setup-smollm2")
    # SIGTERM, like Ctrl+C, stops the network's processes (each in a session of its own) first
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cache = data_dir()
    path = str(tiny_model(cache)) if args.model == "tiny" else resolve(args.model, cache)
    nets, cens = [], []
    for trial in range(args.trials):
        seed = args.seed + trial
        stop = {"target_reward": args.target, "min_samples": args.min_samples,
                "max_rounds": args.max_rounds}  # fmt: skip
        spec = load_spec(SPECS[args.model])
        spec = msgspec.structs.replace(
            spec, name="e2e", stop=msgspec.structs.replace(spec.stop, **stop),
            env=msgspec.structs.replace(spec.env, seed=seed),
        )  # fmt: skip
        console.print(f"trial {trial + 1} of {args.trials}")
        per_version_s = 10.0 if args.model == "tiny" else 120.0  # a generous bound
        nets.append(network(spec, args.nodes, cache, 60 + per_version_s * args.max_rounds,
                            args.retry_after, args.preload, args.split))  # fmt: skip
        cens.append(central(spec, path, args.max_rounds, seed))
        for name, r in (("network", nets[-1]), ("centralized", cens[-1])):
            v = reached(r["rewards"], args.target, args.min_samples)
            at = "not reached" if v is None else f"reached at version {v}"
            console.print(f"  {name}: {r['seconds']:.1f} s, {r['versions']} versions, target {at}")
    net_s = median(r["seconds"] for r in nets)
    cen_s = median(r["seconds"] for r in cens)
    net_first, cen_first = (median(r["first_version_s"] for r in x) for x in (nets, cens))
    net_per, cen_per = (
        _median_of_some([r["s_per_version_after"] for r in x]) for x in (nets, cens)
    )
    billed, processed = sum(r["billed"] for r in nets), sum(r["processed"] for r in nets)
    result: dict[str, Any] = {
        "model": args.model, "target_reward": args.target, "min_samples": args.min_samples,
        "nodes": args.nodes,
        "max_rounds": args.max_rounds, "trials": args.trials, "retry_after_s": args.retry_after,
        "preload": args.preload, "split": args.split,
        "network_time_to_target_s": net_s, "central_time_to_target_s": cen_s,
        "time_ratio": net_s / cen_s,
        "network_reached": sum(r["stop_reason"] == "target_reward" for r in nets),
        "central_reached": sum(reached(r["rewards"], args.target, args.min_samples) is not None
                               for r in cens),
        "network_versions": median(r["versions"] for r in nets),
        "central_versions": median(r["versions"] for r in cens),
        "network_first_version_s": net_first, "central_first_version_s": cen_first,
        "network_s_per_version_after_first": net_per, "central_s_per_version_after_first": cen_per,
        "s_per_version_ratio": net_per / cen_per if net_per and cen_per else None,
        "network_sampled_tokens": sum(r["sampled_tokens"] for r in nets),
        "central_sampled_tokens": sum(r["sampled_tokens"] for r in cens),
        "billed_tokens": billed, "processed_tokens": processed,
        "billed_tokens_vs_processed": billed / max(processed, 1),
        "billing_exact_every_trial": int(all(r["billed"] == r["processed"] for r in nets)),
        "key_usage_vs_billed": sum(r["key_usage"] for r in nets) / max(billed, 1),
        "network_times_s": [r["seconds"] for r in nets],
        "central_times_s": [r["seconds"] for r in cens],
    }  # fmt: skip
    title = (f"time to mean reward {args.target} ({SPECS[args.model].stem}; same rounds, tokens "
             f"and machine; median of {args.trials})")  # fmt: skip
    table = Table(title=title)
    for col in ("", "network", "centralized", "network / centralized"):
        table.add_column(col, justify="right")
    table.add_row("time to target", f"{net_s:.1f} s", f"{cen_s:.1f} s",
                  f"{result['time_ratio']:.2f}x")  # fmt: skip
    net_v, cen_v = result["network_versions"], result["central_versions"]
    table.add_row("versions made", f"{net_v:g}", f"{cen_v:g}", f"{net_v / cen_v:.2f}x")
    table.add_row("time to the first version (loading models, first round)",
                  f"{net_first:.1f} s", f"{cen_first:.1f} s",
                  f"{net_first / cen_first:.2f}x")  # fmt: skip
    per_ratio = _cell(result["s_per_version_ratio"], ".2f", "x")
    table.add_row("seconds per version after the first", _cell(net_per, ".2f"),
                  _cell(cen_per, ".2f"), per_ratio)  # fmt: skip
    table.add_row("reached target", f"{result['network_reached']} of {args.trials}",
                  f"{result['central_reached']} of {args.trials}", "")  # fmt: skip
    table.add_row("tokens sampled (all trials)", f"{result['network_sampled_tokens']:,}",
                  f"{result['central_sampled_tokens']:,}", "")  # fmt: skip
    console.print(table)
    console.print(f"billed {billed:,} tokens = processed {processed:,} "
                  f"(ratio {result['billed_tokens_vs_processed']}), key usage ratio "
                  f"{result['key_usage_vs_billed']}")  # fmt: skip
    write_result(args.out, result)


def _median_of_some(values: list[float | None]) -> float | None:
    """The median of the trials that measured it (a run to its target in one version has no
    seconds per version after the first)."""
    some = [v for v in values if v is not None]
    return median(some) if some else None


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


if __name__ == "__main__":
    main()
