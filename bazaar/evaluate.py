"""``bazaar eval``: an environment's examples answered through the gateway's OpenAI API, scored
by the environment, summarized as a mean reward with a 95 % confidence interval.

Going through the gateway (the official ``openai`` client, the caller's key, billed like any
request) measures exactly what users of a model get: the same chat template, sampling and
adapter as any other request. Each example gets its own seed (the base seed plus its index), so
an evaluation repeats, and base and adapter answer the same examples with the same seeds.

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


def evaluate(
    client: Any,
    env_name: str,
    env_args: dict[str, Any],
    model: str,
    n: int,
    *,
    seed: int = 1_000_003,
    temperature: float = 1.0,
    max_tokens: int = 32,
    concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Rewards of ``n`` examples of the environment answered by ``model`` through ``client``
    (an ``openai.OpenAI`` pointed at the gateway); API errors propagate (``openai`` types)."""
    from envs import load_environment

    env = load_environment(env_name, **env_args)
    examples = env.examples(seed, 0, n)

    def one(i: int) -> float:
        ex = examples[i]
        done = client.chat.completions.create(
            model=model, messages=ex.prompt, max_tokens=max_tokens, temperature=temperature,
            seed=seed + i,
        )  # fmt: skip
        return float(env.score(ex, done.choices[0].message.content or "").reward)

    rewards: list[float] = []
    with ThreadPoolExecutor(concurrency) as pool:
        for reward in pool.map(one, range(n)):
            rewards.append(reward)
            if progress:
                progress(len(rewards))
    return rewards
