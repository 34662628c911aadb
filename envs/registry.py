"""Finding an environment by name: built-ins, then ``reasoning_gym:<task>``, then entry points.

An environment's canonical name is its id plus its arguments as canonical JSON
(``arith {"digits":3}``); examples carry that name, and ``load_environment(name)`` accepts it back,
so any peer rebuilds exactly the environment a run used. Third-party packages add environments
with an entry point in the ``bazaar.environments`` group that returns an ``Environment``.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

from envs.base import Environment
from envs.builtin.arith import Arith
from envs.builtin.calc import Calc
from envs.builtin.code import Code
from envs.builtin.countdown import Countdown
from envs.builtin.gsm import WordProblems
from envs.builtin.guess import Guess
from envs.builtin.reverse import Reverse
from envs.builtin.sort import Sort

BUILTINS: dict[str, type[Environment]] = {
    "arith": Arith,
    "reverse": Reverse,
    "sort": Sort,
    "countdown": Countdown,
    "gsm": WordProblems,
    "guess": Guess,
    "calc": Calc,
    "code": Code,
}
ENTRY_POINT_GROUP = "bazaar.environments"
REASONING_GYM = "reasoning_gym:"


def canonical_name(name: str, args: dict[str, Any]) -> str:
    if not args:
        return name
    return f"{name} {json.dumps(args, sort_keys=True, separators=(',', ':'))}"


def parse_name(full: str) -> tuple[str, dict[str, Any]]:
    name, _, raw = full.partition(" ")
    if not raw:
        return name, {}
    try:
        args = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"environment {full!r}: arguments are not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"environment {full!r}: arguments must be a JSON object")
    return name, args


def load_environment(name: str, **args: Any) -> Environment:
    """The environment called ``name`` with ``args`` (or a canonical name with its arguments)."""
    if not args:
        name, args = parse_name(name)
    try:
        if name.startswith(REASONING_GYM):
            from envs.reasoning_gym_env import ReasoningGymEnv

            env: Environment = ReasoningGymEnv(name.removeprefix(REASONING_GYM), **args)
        elif name in BUILTINS:
            env = BUILTINS[name](**args)
        else:
            env = _from_entry_point(name, args)
    except TypeError as e:  # a keyword the environment does not take
        raise ValueError(f"environment {name!r}: bad arguments {args}: {e}") from None
    env.name = canonical_name(name, args)
    return env


def _from_entry_point(name: str, args: dict[str, Any]) -> Environment:
    points = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name not in points:
        raise ValueError(
            f"unknown environment {name!r}: built-ins are {', '.join(sorted(BUILTINS))}; "
            f"reasoning-gym tasks are 'reasoning_gym:<task>'; installed: "
            f"{', '.join(sorted(points)) or 'none'}"
        )
    env = points[name].load()(**args)
    if not isinstance(env, Environment):
        raise ValueError(f"entry point {name!r} returned {type(env).__name__}, not an Environment")
    return env
