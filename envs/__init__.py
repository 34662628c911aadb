"""Environments: task datasets, harnesses and reward rubrics, a registry, built-in offline
environments (``arith``, ``reverse``, ``sort``, ``countdown``, ``gsm``) and an adapter for
reasoning-gym's procedural tasks (``reasoning_gym:<task>``).

>>> env = load_environment("reverse", max_len=5)
>>> ex = env.example(seed=1, index=3)
>>> env.score(ex, ex.answer).reward, env.name
(1.0, 'reverse {"max_len":5}')
"""

from envs.base import Environment, Example, Message, MultiTurnEnvironment, Rubric, Score, rng_for
from envs.registry import load_environment

__all__ = [
    "Environment",
    "Example",
    "Message",
    "MultiTurnEnvironment",
    "Rubric",
    "Score",
    "load_environment",
    "rng_for",
]
