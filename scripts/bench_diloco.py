"""Benchmark: DiLoCo across 2 trainers over hivemind vs centralized GRPO, and adapter broadcast.

Task: one-digit additions (``arith``, digits 1), which the tiny model — warm-started on two-digit
ones — mostly gets wrong, so reinforcement learning has far to go. Reward and communication are
measured on the same configurations (same H, same wire format), with the same number of
rollouts and inner steps for every method:

- **Centralized**: one trainer, fully on-policy: every AdamW step samples its own 2P prompts
  (group size G) with the current weights.
- **DiLoCo**: two trainers, each with its own hivemind child process (real DHT, real
  all-reduce; ``fp16`` or ``int8`` on the wire, ``node/training/wire.py``). Each round samples
  2·H·P prompts with the current global adapter (as the network's inference nodes do), each
  trainer takes H steps on its half, their quantized pseudo-gradients are averaged (the result
  bit-identical on both) and the outer step gives the next version.

The loss is the same everywhere except that DiLoCo's PPO clip is off by default (the
extreme-ratio mask stays): a round's H steps all train on rollouts of the round's first weights,
and with the clip at 0.2 a round stops moving once the policy leaves that trust region — at
H = 256 that cost a third of the reward. The centralized baseline samples before every step
(ratio 1, the clip never binds); it can run at several inner lrs (``--central-lrs``, parity
against the best). By default every method runs at the same inner lr, 1e-3 (the centralized
one's best of 1e-3, 5e-4 and 3e-4).

``final_reward_*`` is the mean reward of the final adapter on a fixed evaluation set (the same
prompts and sampling seeds for every method, temperature 1). Every configuration runs once per
seed (``--seeds``, at least 3 for a measurement): the seed picks the LoRA initialisation and
every sampling seed of the training rollouts, and nothing else carries from one configuration
or seed to the next (fresh trainers, torch's global generator reset), so a configuration's
result does not depend on which others ran. Rewards are reported as a mean with a 95 %
interval over the seeds (Student's t); ``reward_parity`` = DiLoCo's mean over the centralized
one's, with the interval of the per-seed ratios beside it. One seed is not a measurement: RL
on this task amplifies last-bit float differences (another machine's thread count is enough)
into different runs. Bytes per trainer per round are **counted** (the codecs count what they
serialize, ``Collective.sent_bytes``), averaged over the rounds and the two trainers; the
data-parallel equivalent is what per-step all-reduce of fp32 gradients of the same LoRA would
send for the same H steps (a butterfly over k peers: each sends (k-1)/k of the vector and the
same again of results, 4 bytes a value). ``comm_reduction_ratio`` is their ratio.

Broadcast: a version cut into 1 MiB shards, fetched by N = 2, 4, 8, 16 in-process py-libp2p
nodes at once, swarm style (``node/store/shards.py``: each node takes its share from the trainer,
the rest from the others); reports time to full delivery and the trainer's upload over the
adapter's size.

Run: ``python scripts/bench_diloco.py [--quick] [--seeds 0,1,2]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import mean_ci95, write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from envs import load_environment  # noqa: E402
from node.model.loading import resolve  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402

ENV_ARGS = {"digits": 1}
SEED_STRIDE = 100_000_000  # a seed's sampling seeds: SEED_STRIDE * seed + step; eval: EVAL_SEED
EVAL_SEED = 7_777_777


def fresh(seed: int) -> str:
    """Start a (configuration, seed) from nothing the previous one left: torch's global
    generator reset; the returned run id seeds the LoRA initialisation."""
    import torch

    torch.manual_seed(seed)
    return f"bench-seed{seed}"


class Sampler:
    """Samples rollouts with a trainer's current weights (saved as PEFT, hot-swapped in)."""

    def __init__(self, tiny: str, tmp: Path) -> None:
        from node.model.backends.torch_backend import TorchBackend
        from node.model.rollouts import Producer

        self.env = load_environment("arith", **ENV_ARGS)
        self.backend = TorchBackend.from_pretrained(tiny)
        self.producer = Producer(self.backend, self.backend.tokenizer)
        self.tmp = tmp
        self.count = 0

    def round(self, trainer: Any, seed: int, prompts: int, group: int) -> tuple[list[Any], float]:
        from node.training.examples import training_examples
        from protocol.leases import Lease, SamplingParams

        self.count += 1
        name = f"w{self.count}"
        self.backend.load_adapter(name, str(trainer.save(self.tmp / name)))
        lease = Lease(
            lease_id=f"l{seed}", run_id="bench", env_id=self.env.name,
            env_version=self.env.version, env_seed=seed, example_indices=list(range(prompts)),
            group_size=group, policy_version=0,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8),
            lease_seed=seed.to_bytes(32, "little"), deadline_ms=0,
        )  # fmt: skip
        payload = self.producer.produce(self.env, lease, adapter=name)
        self.backend.unload_adapter(name)
        examples = training_examples(self.env, self.backend.tokenizer, lease, payload)
        from verification.rollouts import score_rollouts

        scores = score_rollouts(self.env, self.backend.tokenizer, lease, payload)
        rewards = [s.reward for g in scores for s in g]
        return examples, sum(rewards) / len(rewards)


def evaluate(sampler: Sampler, trainer: Any, args: argparse.Namespace) -> float:
    """Mean reward of ``trainer``'s weights on the fixed evaluation prompts and seeds."""
    _, reward = sampler.round(trainer, EVAL_SEED, args.eval_prompts, args.group)
    return reward


def central(
    tiny: str, sampler: Sampler, args: argparse.Namespace, lr: float, seed: int
) -> tuple[float, float]:
    """Fully on-policy: every step samples its 2P prompts with the weights of that step.
    Returns (final evaluation reward, seconds)."""
    from node.training.lora import LoraTrainer

    started = time.perf_counter()
    trainer = LoraTrainer(tiny, fresh(seed), inner_lr=lr)
    for step in range(args.steps):
        at = SEED_STRIDE * seed + 1_000_000 + step
        examples, _ = sampler.round(trainer, at, 2 * args.prompts, args.group)
        if examples:
            trainer.inner_step(examples)
    return evaluate(sampler, trainer, args), time.perf_counter() - started


def diloco(
    tiny: str, sampler: Sampler, args: argparse.Namespace, h: int, wire: str, lr: float,
    momentum: float, seed: int, sampling: str = "global",
) -> dict[str, Any]:  # fmt: skip
    """Two trainers, ``steps / h`` rounds; the final evaluation reward, counted bytes per
    trainer per round, and whether every round ended with the two trainers equal bit for bit.
    ``sampling``: ``global``, every rollout of a round sampled with the round's first weights
    (the global adapter, as the network's inference nodes sample today); ``local``, each
    trainer samples each inner step's prompts with its own current weights (on-policy within
    its round; the same rollout count)."""
    import torch

    from node.training.collective import Collective, CollectiveSpec
    from node.training.diloco import OuterOptimizer, Quantizer, levels_for
    from node.training.lora import LoraTrainer
    from node.training.trainer import Trainer
    from protocol.runs import LossSpec

    started = time.perf_counter()
    loss = LossSpec(clip_eps=args.clip_eps)
    run_id = fresh(seed)
    models = [LoraTrainer(tiny, run_id, loss=loss, inner_lr=args.inner_lr) for _ in range(2)]
    size = sum(models[0].sizes)
    levels = levels_for(2, wire)
    trainers = [
        Trainer(m, Quantizer(m.sizes, levels, args.inner_lr * h / levels),
                OuterOptimizer(lr, momentum, nesterov=momentum > 0))
        for m in models
    ]  # fmt: skip
    spec = CollectiveSpec([], f"{run_id}-{wire}-{h}", size, round_timeout_s=60, wire=wire)
    first = Collective(spec)
    first.start()
    second = Collective(dataclasses.replace(spec, initial_peers=first.visible_addrs))
    second.start()
    collectives = [first, second]
    for trainer, collective in zip(trainers, collectives, strict=True):
        trainer.collective = collective
    rounds = max(1, args.steps // h)
    identical = True
    try:
        for r in range(rounds):
            if sampling == "global":
                at = SEED_STRIDE * seed + 1000 + r
                examples, _ = sampler.round(models[0], at, 2 * h * args.prompts, args.group)
                halves = [examples[: len(examples) // 2], examples[len(examples) // 2 :]]
                parts = [trainers[i].inner(halves[i], h) for i in range(2)]
            else:  # one sampler: the trainers' inner loops take turns, the all-reduce does not
                parts = [trainers[i].inner_on(_local(sampler, models[i], args, seed, r, i, h))
                         for i in range(2)]  # fmt: skip
            results: list[Any] = [None, None]

            def run(i: int, r: int = r, results: list[Any] = results, parts: Any = parts) -> None:
                results[i] = trainers[i].finish(*parts[i], f"bench@{r}", 2)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            identical &= bool(torch.equal(results[0].weights, results[1].weights))
            identical &= results[0].group_size == results[1].group_size == 2
        sent = _settled(collectives)
    finally:
        for c in collectives:
            c.close()
    k = 2
    per_round = sent / len(collectives) / rounds
    dp = 2 * (k - 1) / k * size * 4 * h
    return {
        "seed": seed, "H": h, "wire": wire, "outer_lr": lr, "momentum": momentum,
        "sampling": sampling, "rounds": rounds,
        "final_reward": evaluate(sampler, models[0], args), "bit_identical": identical,
        "bytes_per_trainer_per_round": per_round, "dp_equivalent_bytes": dp,
        "comm_reduction_ratio": dp / per_round, "lora_params": size,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def _local(
    sampler: Sampler, model: Any, args: argparse.Namespace, seed: int, r: int, i: int, h: int
) -> Iterator[list[Any]]:
    """Trainer ``i``'s inner batches of round ``r``, each sampled when it is needed, with the
    weights the trainer's steps before it made; a batch without learning signal is skipped."""
    for step in range(h):
        at = SEED_STRIDE * seed + 50_000_000 + 2 * (r * h + step) + i
        if examples := sampler.round(model, at, args.prompts, args.group)[0]:
            yield examples  # none when every group scored alike, as in the centralized loop


def _settled(collectives: list[Any], timeout_s: float = 30.0) -> int:
    """Total bytes sent, once the last replies are out (two reads 0.5 s apart agree)."""
    deadline = time.monotonic() + timeout_s
    total = -1
    while time.monotonic() < deadline:
        now = sum(c.sent_bytes() for c in collectives)
        if now == total:
            return now
        total = now
        time.sleep(0.5)
    return total


def broadcast(sizes: list[int], adapter_bytes: int) -> dict[str, float]:
    """Time to deliver one version to N nodes, and the trainer's upload over the adapter size."""
    import trio

    from node.store.adapters import cut
    from node.store.shards import fetch_version, serve_shards
    from protocol.adapters import AdapterManifest
    from protocol.identity import Identity
    from protocol.p2p import P2PHost
    from protocol.payload_store import PayloadStore

    rng = np.random.default_rng(0)
    files = {"adapter_config.json": b"{}",
             "adapter_model.safetensors": rng.bytes(adapter_bytes)}  # fmt: skip
    infos, shards = cut(files)
    manifest = AdapterManifest(run_id="bench", version=1, parent_version=0,
                               base_model_hash=bytes(32), shards=infos,
                               total_bytes=sum(i.size for i in infos))  # fmt: skip
    result: dict[str, float] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            uploaded = [0]

            def count(b: int, uploaded: list[int] = uploaded) -> None:
                uploaded[0] += b

            async def main(n: int = n, root: Path = root) -> float:
                from contextlib import AsyncExitStack

                trainer_store = PayloadStore(root / "trainer")
                for s in shards:
                    trainer_store.put(s)
                async with AsyncExitStack() as stack:
                    trainer = await stack.enter_async_context(P2PHost.create(Identity.generate()))
                    serve_shards(trainer, trainer_store, on_served=count)
                    nodes, stores, ids = [], [], []
                    for k in range(n):
                        ident = Identity.generate()
                        host = await stack.enter_async_context(P2PHost.create(ident))
                        store = PayloadStore(root / f"n{k}")
                        serve_shards(host, store)
                        nodes.append(host)
                        stores.append(store)
                        ids.append(ident)
                    everyone = [trainer, *nodes]
                    for a in everyone:
                        for b in everyone:
                            if a is not b and a.peer_id < b.peer_id:
                                await a.connect(b.addrs()[0])
                    started = time.perf_counter()
                    swarm = [p.peer_id for p in nodes]
                    async with trio.open_nursery() as nursery:
                        for k, host in enumerate(nodes):
                            nursery.start_soon(fetch_version, host, ids[k], manifest, stores[k],
                                               [trainer.peer_id], swarm)  # fmt: skip
                    return time.perf_counter() - started

            seconds = trio.run(main)
        result[f"delivery_s_n{n}"] = seconds
        result[f"trainer_upload_over_adapter_size_n{n}"] = uploaded[0] / adapter_bytes
    return result


def summary(rewards: list[float], central: list[float]) -> dict[str, Any]:
    """A configuration's rewards over the seeds against the centralized ones of the same seeds:
    mean and 95 % interval, parity of the means, and the interval of the per-seed ratios."""
    mean, half = mean_ci95(rewards)
    _, ratio_half = mean_ci95([r / max(c, 1e-9) for r, c in zip(rewards, central, strict=True)])
    return {"final_reward": mean, "final_reward_ci95": half, "per_seed": rewards,
            "reward_parity": mean / max(statistics.fmean(central), 1e-9),
            "reward_parity_ci95": ratio_half}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument("--steps", type=int, default=512, help="inner steps per trainer")
    parser.add_argument("--H", default="16,256", help="inner steps per round, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (≥ 3 to measure)")
    parser.add_argument(
        "--prompts", type=int, default=4, help="prompts per inner step, per trainer"
    )
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="every trainer's inner lr")
    parser.add_argument(
        "--central-lrs",
        default="1e-3",
        help="the centralized baseline's lrs, comma-separated; parity is against the best mean",
    )
    parser.add_argument("--clip-eps", type=float, default=0.0,
                        help="DiLoCo's PPO clip (0: off; the ratio mask stays)")  # fmt: skip
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--sampling", choices=("global", "local", "both"), default="both",
                        help="who samples a round's rollouts: the round's first weights "
                             "(global), each trainer's current ones (local), or both")  # fmt: skip
    parser.add_argument("--local-outer-lrs", default="1.0",
                        help="outer lrs of the local-sampling runs, comma-separated")  # fmt: skip
    parser.add_argument("--no-broadcast", action="store_true", help="skip the broadcast part")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "diloco.json")
    args = parser.parse_args()
    hs = [int(h) for h in args.H.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.quick:
        args.steps, hs, args.eval_prompts = 64, [8, 64], 128
    tiny = str(resolve("tiny", data_dir()))
    result: dict[str, Any] = {"steps": args.steps, "prompts_per_step": args.prompts,
                              "group_size": args.group, "inner_lr": args.inner_lr,
                              "clip_eps": str(args.clip_eps), "task": "arith digits=1",
                              "seeds": seeds}  # fmt: skip
    configs = [(h, "fp16", 1.0, 0.0, "global") for h in hs]
    configs.insert(1, (hs[0], "fp16", 0.7, 0.9, "global"))  # DiLoCo's published outer defaults
    configs.append((hs[-1], "int8", 1.0, 0.0, "global"))
    if args.sampling in ("local", "both"):
        for lr in (float(x) for x in args.local_outer_lrs.split(",")):
            configs.append((hs[-1], "int8", lr, 0.0, "local"))
    if args.sampling == "local":
        configs = [c for c in configs if c[-1] == "local"]
    table = Table(title=f"DiLoCo (2 trainers, hivemind) vs centralized GRPO, same rollouts, "
                        f"mean ± 95 % interval over {len(seeds)} seeds")  # fmt: skip
    for col in ("method", "H", "wire", "outer lr / mom.", "sampling", "final reward", "per seed",
                "parity",
                "bytes/trainer/round", "comm. reduction", "bit-identical"):  # fmt: skip
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp, Progress(console=Console(stderr=True)) as bar:
        sampler = Sampler(tiny, Path(tmp))
        from node.training.lora import LoraTrainer

        lrs = [float(x) for x in args.central_lrs.split(",")]
        task = bar.add_task("runs", total=len(seeds) * (len(lrs) + len(configs)))
        result["base_reward"] = evaluate(sampler, LoraTrainer(tiny, "bench"), args)
        table.add_row("base model", *[""] * 4, f"{result['base_reward']:.3f}", *[""] * 5)
        centrals: dict[float, list[float]] = {}
        for lr in lrs:
            centrals[lr] = []
            for seed in seeds:
                reward, seconds = central(tiny, sampler, args, lr, seed)
                centrals[lr].append(reward)
                result[f"central_s_lr{lr:g}_seed{seed}"] = seconds
                bar.advance(task)
        best = max(lrs, key=lambda lr: statistics.fmean(centrals[lr]))
        central_rewards = centrals[best]
        for lr in lrs:
            row = summary(centrals[lr], central_rewards)
            result[f"final_reward_central_lr{lr:g}"] = row["final_reward"]
            result[f"final_reward_central_lr{lr:g}_ci95"] = row["final_reward_ci95"]
            table.add_row("central", "1", "", f"inner lr {lr:g}", "step", _pm(row), _seeds(row),
                          f"{row['reward_parity']:.2f}", "", "", "")  # fmt: skip
        result["final_reward_central"] = statistics.fmean(central_rewards)
        result["final_reward_central_ci95"] = mean_ci95(central_rewards)[1]
        result["final_reward_central_per_seed"] = central_rewards
        runs = []
        for h, wire, lr, momentum, sampling in configs:
            per_seed = []
            for seed in seeds:
                per_seed.append(diloco(tiny, sampler, args, h, wire, lr, momentum, seed, sampling))
                bar.advance(task)
            first = per_seed[0]
            run = {key: first[key] for key in ("H", "wire", "outer_lr", "momentum", "sampling",
                                               "rounds", "dp_equivalent_bytes",
                                               "lora_params")}  # fmt: skip
            run["bytes_per_trainer_per_round"] = statistics.fmean(
                r["bytes_per_trainer_per_round"] for r in per_seed
            )
            run["comm_reduction_ratio"] = (
                run["dp_equivalent_bytes"] / run["bytes_per_trainer_per_round"]
            )
            run["bit_identical"] = all(r["bit_identical"] for r in per_seed)
            run["seconds"] = statistics.fmean(r["seconds"] for r in per_seed)
            run.update(summary([r["final_reward"] for r in per_seed], central_rewards))
            runs.append(run)
            cells = [_pm(run), _seeds(run),
                     f"{run['reward_parity']:.2f} (± {run['reward_parity_ci95']:.2f})",
                     f"{run['bytes_per_trainer_per_round']:,.0f}",
                     f"{run['comm_reduction_ratio']:.0f}x", str(run["bit_identical"])]  # fmt: skip
            table.add_row("DiLoCo", str(h), wire, f"{lr} / {momentum}", sampling, *cells)
        result["runs"] = runs
        for run in runs:  # the headline numbers: the largest H, default outer step, per wire
            if run["H"] == hs[-1] and run["outer_lr"] == 1.0:
                w = run["wire"] + ("_local" if run["sampling"] == "local" else "")
                for key in ("final_reward", "final_reward_ci95", "reward_parity",
                            "reward_parity_ci95", "bytes_per_trainer_per_round",
                            "dp_equivalent_bytes", "comm_reduction_ratio"):  # fmt: skip
                    name = key.replace("final_reward", "final_reward_network")
                    result[f"{name}_{w}"] = run[key]
        result["H_headline"] = hs[-1]
    Console(width=160).print(table)
    if not args.no_broadcast:
        sizes = [2, 4] if args.quick else [2, 4, 8, 16]
        result.update(broadcast(sizes, adapter_bytes=4 << 20))
        comm = Table(title="adapter broadcast")
        comm.add_column("nodes")
        comm.add_column("time to full delivery / trainer upload over adapter size", justify="right")
        for n in sizes:
            comm.add_row(str(n),
                         f"{result[f'delivery_s_n{n}']:.2f} s / "
                         f"{result[f'trainer_upload_over_adapter_size_n{n}']:.2f}x")  # fmt: skip
        Console().print(comm)
    write_result(args.out, result)


def _pm(row: dict[str, Any]) -> str:
    return f"{row['final_reward']:.3f} ± {row['final_reward_ci95']:.3f}"


def _seeds(row: dict[str, Any]) -> str:
    return " ".join(f"{r:.2f}" for r in row["per_seed"])


if __name__ == "__main__":
    main()
