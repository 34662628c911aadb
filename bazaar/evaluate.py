"""``bazaar eval``: an environment's examples answered through the gateway's OpenAI API, scored
by the environment, summarized as ``avg@k`` (the mean reward of ``k`` attempts per example) and
``pass@j`` (the unbiased estimate of the chance that ``j`` attempts hold one that passes), each
with a 95 % confidence interval over examples.

Going through the gateway (the official ``openai`` client, the caller's key, billed like any
request) measures exactly what users of a model get: the same chat template, sampling and
adapter as any other request. A multi-turn environment's episode is played through it too, the
environment answering each reply. Each attempt gets its own seed (derived from the base seed,
the example and the attempt), so an evaluation repeats, and base and adapter answer the same
examples with the same seeds.

>>> summarize([1.0, 0.0, 1.0, 1.0]).mean
0.75
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

Z95 = 1.959964  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    ci95: float
    """Half-width of the 95 % confidence interval of the mean (normal approximation)."""

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


def summarize(rewards: list[float]) -> Summary:
    n = len(rewards)
    if n == 0:
        raise ValueError("no rewards to summarize")
    mean = statistics.fmean(rewards)
    sd = statistics.stdev(rewards) if n > 1 else 0.0
    return Summary(n, mean, Z95 * sd / math.sqrt(n))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` attempts of which ``c`` passed: the chance
    that ``k`` attempts drawn from them without replacement hold a pass, ``1 - C(n-c, k) /
    C(n, k)`` (Chen et al., 2021, computed as a product for numerical stability).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n attempts (n = {n})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


@dataclass(frozen=True)
class Report:
    """``avg@k`` and ``pass@j`` of an evaluation with ``k`` attempts per example, each a mean
    over examples with its 95 % interval (per-example values: the mean reward of its attempts,
    and ``pass_at_k`` of its attempts that reached ``threshold``)."""

    k: int
    avg: Summary
    passes: dict[int, Summary]
    threshold: float


def report(rewards: list[list[float]], threshold: float = 1.0) -> Report:
    """``rewards[i]``: the rewards of example ``i``'s attempts (as many for every example)."""
    if not rewards or not rewards[0]:
        raise ValueError("no rewards to report")
    k = len(rewards[0])
    if any(len(r) != k for r in rewards):
        raise ValueError("every example needs the same number of attempts")
    avg = summarize([statistics.fmean(r) for r in rewards])
    ks = sorted({1, k} | {j for j in (2, 4, 8, 16, 32) if j < k})
    passes = {
        j: summarize([pass_at_k(k, sum(x >= threshold for x in r), j) for r in rewards]) for j in ks
    }
    return Report(k, avg, passes, threshold)


def evaluate(
    client: Any,
    env_name: str,
    env_args: dict[str, Any],
    model: str,
    n: int,
    *,
    k: int = 1,
    seed: int = 1_000_003,
    temperature: float = 1.0,
    max_tokens: int = 32,
    concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Rewards of ``k`` attempts at each of ``n`` examples of the environment by ``model``
    through ``client`` (an ``openai.OpenAI`` pointed at the gateway): one reply, or for a
    multi-turn environment a whole episode — the environment answering each reply (tool
    results, feedback) until it is done. API errors propagate (``openai`` types)."""
    from envs import load_environment
    from envs.base import MultiTurnEnvironment

    env = load_environment(env_name, **env_args)
    examples = env.examples(seed, 0, n)

    def one(job: int) -> float:
        i, attempt = divmod(job, k)
        ex = examples[i]
        base = seed + (i * k + attempt) * 1000  # every turn of every attempt its own seed
        turns = iter(range(1000))

        def reply(messages: list[dict[str, str]]) -> str:
            done = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                seed=base + next(turns),
            )  # fmt: skip
            return str(done.choices[0].message.content or "")

        if isinstance(env, MultiTurnEnvironment):
            completion, state = env.rollout(ex, reply)
            return float(env.score(ex, completion, state).reward)
        return float(env.score(ex, reply(ex.prompt)).reward)

    rewards: list[float] = []
    with ThreadPoolExecutor(concurrency) as pool:
        for reward in pool.map(one, range(n * k)):
            rewards.append(reward)
            if progress:
                progress(len(rewards))
    return [rewards[i * k : (i + 1) * k] for i in range(n)]


def evaluate_models(
    client: Any,
    console: Any,
    env_name: str,
    env_args: dict[str, Any],
    models: list[str],
    n: int,
    *,
    k: int = 1,
    threshold: float = 1.0,
    **kwargs: Any,
) -> dict[str, Report]:
    """``evaluate`` each model in turn (``kwargs``: its seed, temperature, max_tokens), with a
    progress bar on the ``rich`` console; each model's ``report``."""
    from rich.progress import Progress

    results = {}
    with Progress(console=console, transient=True) as progress:
        for m in models:
            task = progress.add_task(f"{m}: {n} examples × {k}", total=n * k)

            def advance(done: int, task: Any = task) -> None:
                progress.update(task, completed=done)

            rewards = evaluate(client, env_name, env_args, m, n, k=k, progress=advance, **kwargs)
            results[m] = report(rewards, threshold)
    return results


def table(results: dict[str, Report], title: str) -> Any:
    """A ``rich`` table of reports by model: ``avg@k`` and each ``pass@j`` with their 95 %
    intervals, and for two models their difference (the second minus the first)."""
    from rich.table import Table

    threshold = next(iter(results.values())).threshold
    out = Table(title=title, caption=f"pass: reward ≥ {threshold:g}; 95 % intervals")
    k = next(iter(results.values())).k
    ks = list(next(iter(results.values())).passes)
    for col in ("model", f"avg@{k}", *[f"pass@{j}" for j in ks]):
        out.add_column(col)

    def cell(s: Summary) -> str:
        return f"{s.mean:.3f} [{s.low:.3f}, {s.high:.3f}]"

    for m, r in results.items():
        out.add_row(m, cell(r.avg), *[cell(p) for p in r.passes.values()])
    if len(results) == 2:
        (_, a), (_, b) = results.items()
        diffs = [(a.avg, b.avg), *[(a.passes[j], b.passes[j]) for j in ks]]
        out.add_row("difference", *[f"{y.mean - x.mean:+.3f} ± "
                                    f"{(x.ci95**2 + y.ci95**2) ** 0.5:.3f}"
                                    for x, y in diffs])  # fmt: skip
    return out
