"""Benchmark: agent episodes — how fast a node plays them, and how fast the code sandbox answers.

- ``episodes_vs_plain_ratio``: episodes per second generated as a node's model process does
  (``node.model.rollouts.Producer``: every episode's turn ``t`` in one batch, the seeded sampler,
  the environment answering between turns) ÷ episodes per second of a plain loop over
  ``transformers``' ``generate`` in the same process — one episode at a time, the conversation
  rendered by the chat template again before every turn — on the same model, environment,
  examples and token budget (goal ≥ 0.9). The baseline runs in the same process, right after.
- ``sandbox_p50_ms`` / ``sandbox_p99_ms``: start-to-result latency of the code environment's tool
  (``envs.sandbox``: namespaces, a fresh uid, limits, the program killed after) on a program that
  prints one line (goal p50 ≤ 50 ms).

- ``reward_parity``: the guessing game (``examples/guess-tiny.toml``) trained for ``--rounds``
  versions through a local network of real processes (``bench_e2e.network``: a coordinator, two
  samplers — one verifying — and a trainer; every round audited, billed and published) and by
  the centralized loop on the same spec, seeds and rounds (``bench_e2e.central``: one process,
  the same sampler, scoring and trainer, fully on-policy). The reward is the mean over the
  sampled episodes of a version (64 a round); "after" is the mean of the last six versions (a
  version's 64 episodes differ by ±0.06 from one to the next: three were too few).
  ``reward_parity`` = network after ÷ centralized after, the mean over ``--seeds`` seeds with its
  95 % interval (goal ≥ 0.95). The network is up to ``max_staleness`` versions off-policy, the
  centralized loop never is — the price of that is what parity measures.

Run: ``python scripts/bench_agents.py [--quick] [--no-parity]``; writes
``bench-results/agents.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import mean_ci95, write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

GOALS = {"episodes_vs_plain_ratio": 0.9, "sandbox_p50_ms": 50.0, "reward_parity": 0.95}
PARITY_SPEC = REPO / "examples" / "guess-tiny.toml"


def node_episodes(backend: Any, env: Any, leases: list[Any]) -> tuple[float, int]:
    """Seconds to play every lease's episodes as a node does, and the model tokens sampled."""
    from node.model.rollouts import Producer
    from verification.rollouts import count_tokens

    producer, tokens = Producer(backend, backend.tokenizer), 0
    started = time.perf_counter()
    for lease in leases:
        tokens += count_tokens(producer.produce(env, lease))
    return time.perf_counter() - started, tokens


def plain_episodes(backend: Any, env: Any, leases: list[Any]) -> tuple[float, int]:
    """The same episodes by a plain loop: ``model.generate`` per turn, one episode at a time."""
    from verification.rollouts import lease_examples

    counted = [0]
    started = time.perf_counter()
    for lease in leases:
        reply = _plain_reply(backend, lease.sampling, counted)
        for ex in lease_examples(env, lease):
            for _ in range(lease.group_size):
                env.rollout(ex, reply)
    return time.perf_counter() - started, counted[0]


def _plain_reply(backend: Any, s: Any, counted: list[int]) -> Any:
    """A reply by ``transformers``' ``generate`` on the conversation rendered afresh."""
    import torch

    model, tok = backend.base, backend.tokenizer

    def reply(messages: list[dict[str, str]]) -> str:
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **ids, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                max_new_tokens=s.max_tokens, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        new = out[0, ids["input_ids"].shape[1] :]
        counted[0] += int(new.numel())
        return str(tok.decode(new, skip_special_tokens=True))

    return reply


def sandbox_latency(runs: int) -> list[float]:
    from envs.sandbox import run_python

    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = run_python("print('ok')")
        times.append((time.perf_counter() - started) * 1000)
        assert result.stdout == "ok\n", result
    return times


def reward_parity(
    rounds: int, seeds: int, cache: Path, tiny: str, staleness: int | None = None
) -> dict[str, Any]:
    """The guessing game trained through a network and centrally, seed by seed."""
    import msgspec
    from bench_e2e import central, network  # scripts/, beside this file

    from protocol.runs import load_spec

    def before_after(rewards: list[dict[str, Any]]) -> tuple[float, float]:
        last = rewards[-min(6, len(rewards) // 2) or -1 :]  # never "before" in "after"
        after = sum(r["mean"] * r["samples"] for r in last) / sum(r["samples"] for r in last)
        return rewards[0]["mean"], after

    rows = []
    for seed in range(seeds):
        spec = load_spec(PARITY_SPEC)
        spec = msgspec.structs.replace(
            spec, name=f"parity-{seed}",
            stop=msgspec.structs.replace(spec.stop, target_reward=None, max_rounds=rounds),
            env=msgspec.structs.replace(spec.env, seed=seed),
        )  # fmt: skip
        if staleness is not None:
            diloco = msgspec.structs.replace(spec.diloco, max_staleness=staleness)
            spec = msgspec.structs.replace(spec, diloco=diloco)
        net = network(spec, 3, cache, 120 + 20.0 * rounds, 1.0)
        cen = central(spec, tiny, rounds, seed)
        (nb, na), (cb, ca) = before_after(net["rewards"]), before_after(cen["rewards"])
        rows.append({"seed": seed, "network_before": nb, "network_after": na,
                     "central_before": cb, "central_after": ca,
                     "network_versions": len(net["rewards"]),
                     "central_versions": len(cen["rewards"]),
                     "network_s": net["seconds"], "central_s": cen["seconds"],
                     "parity": na / ca if ca > 0 else float("nan")})  # fmt: skip
    mean, half = mean_ci95([r["parity"] for r in rows])
    return {"rounds": rounds, "seeds": seeds, "per_seed": rows,
            "max_staleness": spec.diloco.max_staleness,
            "reward_parity": mean, "reward_parity_ci95": half}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leases", type=int, default=8, help="leases of 8 x 4 episodes")
    parser.add_argument("--env", default="guess", help="the agent environment played")
    parser.add_argument("--sandbox-runs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "agents.json")
    parser.add_argument("--rounds", type=int, default=24, help="versions a parity run trains")
    parser.add_argument("--seeds", type=int, default=3, help="parity runs of each side")
    parser.add_argument("--staleness", type=int, default=None,
                        help="the network's max_staleness (default: the spec's)")  # fmt: skip
    parser.add_argument("--no-parity", action="store_true", help="skip the training runs")
    parser.add_argument("--quick", action="store_true",
                        help="2 leases, 20 sandbox runs, a parity seed of 12 versions")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.leases, args.sandbox_runs, args.seeds, args.rounds = 2, 20, 1, 12
    if args.staleness is not None and args.staleness < 0:
        parser.error("--staleness must be 0 or more")
    import torch

    from bazaar.up import tiny_model
    from envs import load_environment
    from node.model.backends.torch_backend import TorchBackend
    from protocol.leases import Lease, SamplingParams
    from protocol.service.config import data_dir

    torch.set_num_threads(1)
    console = Console()
    tiny = str(tiny_model(data_dir()))
    backend = TorchBackend.from_pretrained(tiny)
    env = load_environment(args.env)
    leases = [
        Lease(
            lease_id=f"agents-{n}",
            run_id="bench",
            env_id=env.name,
            env_version=env.version,
            env_seed=n,
            example_indices=list(range(8)),
            group_size=4,
            policy_version=0,
            sampling=SamplingParams(
                temperature=1.0, top_p=1.0, max_tokens=8, max_turns=getattr(env, "max_turns", 1)
            ),
            lease_seed=bytes([n + 1]) * 32,
            deadline_ms=0,
        )
        for n in range(args.leases)
    ]
    episodes = args.leases * 32
    node_s, node_tokens = node_episodes(backend, env, leases)
    plain_s, plain_tokens = plain_episodes(backend, env, leases)
    latency = sorted(sandbox_latency(args.sandbox_runs))
    p50 = statistics.median(latency)
    p99 = latency[min(len(latency) - 1, int(0.99 * len(latency)))]
    result = {
        "env": env.name, "episodes": episodes,
        "node_episodes_per_s": episodes / node_s, "plain_episodes_per_s": episodes / plain_s,
        "episodes_vs_plain_ratio": plain_s / node_s,
        "node_model_tokens": node_tokens, "plain_model_tokens": plain_tokens,
        "sandbox_runs": len(latency), "sandbox_p50_ms": p50, "sandbox_p99_ms": p99,
        **{f"goal_{k}": v for k, v in GOALS.items()},
    }  # fmt: skip
    if not args.no_parity:
        result["parity"] = reward_parity(args.rounds, args.seeds, data_dir(), tiny,
                                         args.staleness)  # fmt: skip
        result["reward_parity"] = result["parity"]["reward_parity"]
    table = Table(title=f"agent episodes ({env.name}, {episodes} episodes, tiny model, 1 thread)")
    for col in ("measure", "value", "goal"):
        table.add_column(col)
    table.add_row("node episodes / s", f"{result['node_episodes_per_s']:.1f}", "")
    table.add_row("plain generate loop episodes / s", f"{result['plain_episodes_per_s']:.1f}", "")
    table.add_row("episodes_vs_plain_ratio", f"{result['episodes_vs_plain_ratio']:.2f}", "≥ 0.9")
    table.add_row("sandbox p50 / p99 (ms)", f"{p50:.1f} / {p99:.1f}", "p50 ≤ 50")
    if "parity" in result:
        p = result["parity"]
        table.add_row(
            f"reward_parity (guess, {p['rounds']} versions, {p['seeds']} seeds, "
            f"staleness {p['max_staleness']})",
            f"{p['reward_parity']:.2f} ± {p['reward_parity_ci95']:.2f}",
            "≥ 0.95",
        )
    console.print(table)
    if "parity" in result:
        runs = Table(title="the guessing game: reward before → after, network and centralized")
        for col in ("seed", "network", "centralized", "parity", "network s", "centralized s"):
            runs.add_column(col, justify="right")
        for r in result["parity"]["per_seed"]:
            runs.add_row(
                str(r["seed"]),
                f"{r['network_before']:.3f} → {r['network_after']:.3f}",
                f"{r['central_before']:.3f} → {r['central_after']:.3f}",
                f"{r['parity']:.2f}",
                f"{r['network_s']:.0f}",
                f"{r['central_s']:.0f}",
            )
        console.print(runs)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
