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
prompts and sampling seeds for every method, temperature 1); ``reward_parity`` = DiLoCo's over
the centralized one's. Bytes per trainer per round are **counted** (the codecs count what they
serialize, ``Collective.sent_bytes``), averaged over the rounds and the two trainers; the
data-parallel equivalent is what per-step all-reduce of fp32 gradients of the same LoRA would
send for the same H steps (a butterfly over k peers: each sends (k-1)/k of the vector and the
same again of results, 4 bytes a value). ``comm_reduction_ratio`` is their ratio.

Broadcast: a version cut into 1 MiB shards, fetched by N = 2, 4, 8, 16 in-process py-libp2p
nodes at once, swarm style (``node/store/shards.py``: each node takes its share from the trainer,
the rest from the others); reports time to full delivery and the trainer's upload over the
adapter's size.

Run: ``python scripts/bench_diloco.py [--quick]``
"""

from __future__ import annotations

import argparse
import dataclasses
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
from node.model.loading import resolve  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402

ENV_ARGS = {"digits": 1}


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
    _, reward = sampler.round(trainer, 7_777_777, args.eval_prompts, args.group)
    return reward


def central(
    tiny: str, sampler: Sampler, args: argparse.Namespace, lr: float
) -> tuple[float, float]:
    """Fully on-policy: every step samples its 2P prompts with the weights of that step.
    Returns (final evaluation reward, seconds)."""
    from node.training.lora import LoraTrainer

    started = time.perf_counter()
    trainer = LoraTrainer(tiny, "bench", inner_lr=lr)
    for step in range(args.steps):
        examples, _ = sampler.round(trainer, 1_000_000 + step, 2 * args.prompts, args.group)
        if examples:
            trainer.inner_step(examples)
    return evaluate(sampler, trainer, args), time.perf_counter() - started


def diloco(
    tiny: str, sampler: Sampler, args: argparse.Namespace, h: int, wire: str, lr: float,
    momentum: float,
) -> dict[str, Any]:  # fmt: skip
    """Two trainers, ``steps / h`` rounds; the final evaluation reward, counted bytes per
    trainer per round, and whether every round ended with the two trainers equal bit for bit."""
    import torch

    from node.training.collective import Collective, CollectiveSpec
    from node.training.diloco import OuterOptimizer, Quantizer, levels_for
    from node.training.lora import LoraTrainer
    from node.training.trainer import Trainer
    from protocol.runs import LossSpec

    started = time.perf_counter()
    loss = LossSpec(clip_eps=args.clip_eps)
    models = [LoraTrainer(tiny, "bench", loss=loss, inner_lr=args.inner_lr) for _ in range(2)]
    size = sum(models[0].sizes)
    levels = levels_for(2, wire)
    trainers = [
        Trainer(m, Quantizer(m.sizes, levels, args.inner_lr * h / levels),
                OuterOptimizer(lr, momentum, nesterov=momentum > 0))
        for m in models
    ]  # fmt: skip
    spec = CollectiveSpec([], f"bench-{wire}-{h}", size, round_timeout_s=60, wire=wire)
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
            examples, _ = sampler.round(models[0], 1000 + r, 2 * h * args.prompts, args.group)
            halves = [examples[: len(examples) // 2], examples[len(examples) // 2 :]]
            results: list[Any] = [None, None]

            def run(i: int, r: int = r, results: list[Any] = results, halves: Any = halves) -> None:
                results[i] = trainers[i].round(halves[i], h, f"bench@{r}", 2)

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
        "H": h, "wire": wire, "outer_lr": lr, "momentum": momentum, "rounds": rounds,
        "final_reward": evaluate(sampler, models[0], args), "bit_identical": identical,
        "bytes_per_trainer_per_round": per_round, "dp_equivalent_bytes": dp,
        "comm_reduction_ratio": dp / per_round, "lora_params": size,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument("--steps", type=int, default=512, help="inner steps per trainer")
    parser.add_argument("--H", default="16,256", help="inner steps per round, comma-separated")
    parser.add_argument(
        "--prompts", type=int, default=4, help="prompts per inner step, per trainer"
    )
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="every trainer's inner lr")
    parser.add_argument(
        "--central-lrs",
        default="1e-3",
        help="the centralized baseline's lrs, comma-separated; parity is against the best",
    )
    parser.add_argument("--clip-eps", type=float, default=0.0,
                        help="DiLoCo's PPO clip (0: off; the ratio mask stays)")  # fmt: skip
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "diloco.json")
    args = parser.parse_args()
    hs = [int(h) for h in args.H.split(",")]
    if args.quick:
        args.steps, hs, args.eval_prompts = 64, [8, 64], 128
    tiny = str(resolve("tiny", data_dir()))
    result: dict[str, Any] = {"steps": args.steps, "prompts_per_step": args.prompts,
                              "group_size": args.group, "inner_lr": args.inner_lr,
                              "clip_eps": str(args.clip_eps), "task": "arith digits=1"}  # fmt: skip
    configs = [(h, "fp16", 1.0, 0.0) for h in hs]
    configs.insert(1, (hs[0], "fp16", 0.7, 0.9))  # DiLoCo's published outer defaults
    configs.append((hs[-1], "int8", 1.0, 0.0))
    table = Table(title="DiLoCo (2 trainers, hivemind) vs centralized GRPO, same rollouts")
    for col in ("method", "H", "wire", "outer lr / mom.", "final reward", "parity",
                "bytes/trainer/round", "comm. reduction", "bit-identical"):  # fmt: skip
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        sampler = Sampler(tiny, Path(tmp))
        from node.training.lora import LoraTrainer

        result["base_reward"] = evaluate(sampler, LoraTrainer(tiny, "bench"), args)
        table.add_row("base model", "", "", "", f"{result['base_reward']:.3f}", "", "", "", "")
        centrals = {}
        for lr in (float(x) for x in args.central_lrs.split(",")):
            centrals[lr], result[f"central_s_lr{lr:g}"] = central(tiny, sampler, args, lr)
            result[f"final_reward_central_lr{lr:g}"] = centrals[lr]
        central_reward = max(centrals.values())
        result["final_reward_central"] = central_reward
        for lr, reward in centrals.items():
            parity = f"{reward / central_reward:.2f}"
            table.add_row("central", "1", "", f"inner lr {lr:g}", f"{reward:.3f}", parity,
                          "", "", "")  # fmt: skip
        runs = []
        for h, wire, lr, momentum in configs:
            run = diloco(tiny, sampler, args, h, wire, lr, momentum)
            run["reward_parity"] = run["final_reward"] / max(central_reward, 1e-9)
            runs.append(run)
            cells = [f"{run['final_reward']:.3f}", f"{run['reward_parity']:.2f}",
                     f"{run['bytes_per_trainer_per_round']:,.0f}",
                     f"{run['comm_reduction_ratio']:.0f}x", str(run["bit_identical"])]  # fmt: skip
            table.add_row("DiLoCo", str(h), wire, f"{lr} / {momentum}", *cells)
        result["runs"] = runs
        for run in runs:  # the headline numbers: the largest H, default outer step, per wire
            if run["H"] == hs[-1] and run["outer_lr"] == 1.0:
                w = run["wire"]
                for key in ("final_reward", "reward_parity", "bytes_per_trainer_per_round",
                            "dp_equivalent_bytes", "comm_reduction_ratio"):  # fmt: skip
                    name = "final_reward_network" if key == "final_reward" else key
                    result[f"{name}_{w}"] = run[key]
        result["H_headline"] = hs[-1]
        Console().print(table)
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


if __name__ == "__main__":
    main()
