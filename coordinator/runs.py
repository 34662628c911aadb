"""Planning a run: ``plan_run`` checks a spec (``protocol/runs.py``) against the real
environment registry — an unknown environment or bad arguments is a ``ValueError`` that says so —
and fixes what a spec may leave open: the run id, the environment's canonical name and version,
and the seed of its examples.

>>> from protocol.runs import EnvSpec, RunSpec
>>> plan = plan_run(RunSpec(name="demo", env=EnvSpec(name="arith", args={"digits": 2}, seed=7)))
>>> plan.run_id, plan.env, plan.env_seed, plan.spec.rl.group_size
('demo', 'arith {"digits":2}', 7, 8)
"""

from __future__ import annotations

import secrets

from envs import MultiTurnEnvironment, load_environment
from protocol.leases import MAX_TURNS
from protocol.runs import RunPlan, RunSpec


def plan_run(spec: RunSpec) -> RunPlan:
    """The plan of a spec; ``ValueError`` if its environment cannot be loaded."""
    env = load_environment(spec.env.name, **spec.env.args)
    turns = env.max_turns if isinstance(env, MultiTurnEnvironment) else 1
    if not 1 <= turns <= MAX_TURNS:
        raise ValueError(f"environment {env.name!r}: max_turns {turns} is not 1..{MAX_TURNS}")
    return RunPlan(
        spec=spec,
        run_id=spec.name or f"run-{secrets.token_hex(4)}",
        env=env.name,
        env_version=env.version,
        env_seed=spec.env.seed if spec.env.seed is not None else secrets.randbits(63),
        max_turns=turns,
    )
