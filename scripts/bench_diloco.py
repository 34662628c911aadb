"""Benchmark: DiLoCo across 2 trainers over hivemind vs centralized GRPO, and adapter broadcast.

Reward and communication are measured on the same configuration (same H, same compression):

- **Centralized**: one trainer, fully on-policy: every AdamW step samples its own 2P prompts
  (group size G) with the current weights; H steps make a "round" of the same token count.
- **DiLoCo**: two trainers, each with its own hivemind child process (real DHT, real all-reduce,
  fp16 on the wire). Each round the same number of prompts is sampled with the current global
  adapter; each trainer takes H steps on its half (P prompts per step), then their quantized
  pseudo-gradients are averaged (bit-identical result) and the outer step gives the next version.
  Rollouts are sampled in this process (the network's inference nodes in a real run).

``final_reward_*`` is the mean sampled reward of the last ``--tail`` rounds (``first_reward_*``
of the first ones: the learning is their difference). Bytes per trainer
per round are the all-reduce's: a butterfly over k peers sends and receives (k-1)/k of the vector
each way, 2 bytes a value (fp16); the data-parallel equivalent all-reduces fp32 gradients of the
same LoRA at every one of the H steps. ``comm_reduction_ratio`` = their ratio (= 2H at k = 2).

Broadcast: a version cut into 1 MiB shards, fetched by N = 2, 4, 8, 16 in-process py-libp2p
nodes at once, swarm style (``node/shards.py``: each node takes its share from the trainer, the
rest from the others); reports time to full delivery and the trainer's upload over the adapter's
size.

Run: ``python scripts/bench_diloco.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from envs import load_environment  # noqa: E402
from node.models.loading import resolve  # noqa: E402
from protocol.config import data_dir  # noqa: E402

ENV_ARGS = {"digits": 2}


class Sampler:
    """Samples rollouts with a trainer's current weights (saved as PEFT, hot-swapped in)."""

    def __init__(self, tiny: str, tmp: Path) -> None:
        from node.backends.torch_backend import TorchBackend
        from node.rollouts import Producer

        self.env = load_environment("arith", **ENV_ARGS)
        self.backend = TorchBackend.from_pretrained(tiny)
        self.producer = Producer(self.backend, self.backend.tokenizer)
        self.tmp = tmp
        self.count = 0

    def round(self, trainer: Any, seed: int, prompts: int, group: int) -> tuple[list[Any], float]:
        from node.training.trainer import training_examples
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


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    size = max(1, len(items) // parts)
    chunks = [items[i * size : (i + 1) * size] for i in range(parts)]
    return [c for c in chunks if c]


def central(tiny: str, sampler: Sampler, args: argparse.Namespace) -> list[float]:
    """Fully on-policy: every step samples its 2P prompts with the weights of that step."""
    from node.training.trainer import LoraTrainer

    trainer = LoraTrainer(tiny, "bench", inner_lr=args.inner_lr)
    curve = []
    for r in range(args.rounds):
        rewards = []
        for h in range(args.H):
            seed = 1_000_000 + r * args.H + h
            examples, reward = sampler.round(trainer, seed, 2 * args.prompts, args.group)
            if examples:
                trainer.inner_step(examples)
            rewards.append(reward)
        curve.append(statistics.mean(rewards))
    return curve


def diloco(
    tiny: str, sampler: Sampler, args: argparse.Namespace, lr: float, momentum: float
) -> tuple[list[float], int, bool]:
    """The reward curve, the averaged vector's length, and whether every round ended with the
    two trainers' weights equal bit for bit."""
    import torch

    from node.training.collective import Collective, CollectiveSpec
    from node.training.diloco import OuterOptimizer, Quantizer, levels_for
    from node.training.trainer import LoraTrainer, diloco_round

    trainers = [LoraTrainer(tiny, "bench", inner_lr=args.inner_lr) for _ in range(2)]
    size = sum(trainers[0].sizes)
    levels = levels_for(2)
    quantizers = [Quantizer(t.sizes, levels, args.inner_lr * args.H / levels) for t in trainers]
    outers = [OuterOptimizer(lr, momentum, nesterov=momentum > 0) for _ in trainers]
    first = Collective(CollectiveSpec([], "bench", size, round_timeout_s=60))
    first.start()
    second = Collective(CollectiveSpec(first.visible_addrs, "bench", size, round_timeout_s=60))
    second.start()
    collectives = [first, second]
    curve, identical = [], True
    try:
        for r in range(args.rounds):
            examples, reward = sampler.round(trainers[0], 1000 + r, 2 * args.H * args.prompts,
                                             args.group)  # fmt: skip
            halves = [examples[: len(examples) // 2], examples[len(examples) // 2 :]]
            results: list[Any] = [None, None]

            def run(i: int, results: list[Any] = results, halves: list[Any] = halves) -> None:
                def average(q: np.ndarray) -> tuple[np.ndarray, int]:
                    out = collectives[i].average(q)
                    return out.integer_sum, out.group_size

                batches = _split(halves[i], args.H)
                results[i] = diloco_round(trainers[i], batches, quantizers[i], outers[i], average)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            identical &= bool(torch.equal(results[0][0], results[1][0]))
            curve.append(reward)
    finally:
        for c in collectives:
            c.close()
    return curve, size, identical


def broadcast(sizes: list[int], adapter_bytes: int) -> dict[str, float]:
    """Time to deliver one version to N nodes, and the trainer's upload over the adapter size."""
    import trio

    from node.adapters import cut
    from node.payload_store import PayloadStore
    from node.shards import fetch_version, serve_shards
    from protocol.adapters import AdapterManifest
    from protocol.identity import Identity
    from protocol.p2p import P2PHost

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--H", type=int, default=8, help="inner steps per round")
    parser.add_argument(
        "--prompts", type=int, default=4, help="prompts per inner step, per trainer"
    )
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--inner-lr", type=float, default=3e-3)
    parser.add_argument("--tail", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "diloco.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tail = 12, 4
    tiny = str(resolve("tiny", data_dir()))
    result: dict[str, Any] = {"H": args.H, "rounds": args.rounds, "prompts_per_step": args.prompts,
                              "group_size": args.group, "inner_lr": args.inner_lr}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sampler = Sampler(tiny, Path(tmp))
        started = time.perf_counter()
        central_curve = central(tiny, sampler, args)
        result["central_s"] = time.perf_counter() - started
        result["final_reward_central"] = statistics.mean(central_curve[-args.tail :])
        result["first_reward_central"] = statistics.mean(central_curve[: args.tail])
        table = Table(title=f"DiLoCo (2 trainers, hivemind, fp16) vs centralized, H = {args.H}")
        for col in ("outer lr", "momentum", "final reward", "parity", "bit-identical"):
            table.add_column(col, justify="right")
        table.add_row("central", "", f"{result['final_reward_central']:.3f}", "1.00", "")
        best = 0.0
        for lr, momentum in ((1.0, 0.0), (0.7, 0.9)):
            started = time.perf_counter()
            curve, size, identical = diloco(tiny, sampler, args, lr, momentum)
            final = statistics.mean(curve[-args.tail :])
            parity = final / max(result["final_reward_central"], 1e-9)
            key = f"lr{lr}_m{momentum}"
            result[f"final_reward_network_{key}"] = final
            result[f"first_reward_network_{key}"] = statistics.mean(curve[: args.tail])
            result[f"reward_parity_{key}"] = parity
            result[f"bit_identical_{key}"] = identical
            result[f"network_s_{key}"] = time.perf_counter() - started
            table.add_row(f"{lr}", f"{momentum}", f"{final:.3f}", f"{parity:.2f}", str(identical))
            if lr == 1.0:  # the default (plain averaging), reported as the headline numbers
                result["final_reward_network"], result["reward_parity"] = final, parity
            best = max(best, parity)
        k = 2
        result["bytes_per_trainer_per_round"] = 2 * (k - 1) / k * size * 2
        result["dp_equivalent_bytes"] = 2 * (k - 1) / k * size * 4 * args.H
        result["comm_reduction_ratio"] = (
            result["dp_equivalent_bytes"] / result["bytes_per_trainer_per_round"]
        )
        result["lora_params"] = size
        Console().print(table)
    sizes = [2, 4] if args.quick else [2, 4, 8, 16]
    result.update(broadcast(sizes, adapter_bytes=4 << 20))
    comm = Table(title="communication and broadcast")
    comm.add_column("metric")
    comm.add_column("value", justify="right")
    for name in ("lora_params", "bytes_per_trainer_per_round", "dp_equivalent_bytes",
                 "comm_reduction_ratio"):  # fmt: skip
        comm.add_row(
            name,
            f"{result[name]:,.0f}" if name != "comm_reduction_ratio" else f"{result[name]:.1f}x",
        )
    for n in sizes:
        comm.add_row(f"broadcast to {n}: time / trainer upload",
                     f"{result[f'delivery_s_n{n}']:.2f} s / "
                     f"{result[f'trainer_upload_over_adapter_size_n{n}']:.2f}x")  # fmt: skip
    Console().print(comm)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
