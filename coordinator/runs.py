"""Runs as a researcher describes them (``RunSpec``) and as the lease book plans them.

A spec names an environment (with arguments), a base model, the group size, sampling settings
and how many examples to roll out. ``plan_run`` checks it against the real environment registry
(an unknown environment or bad arguments is a ``ValueError`` that says so) and fixes what a spec
may leave open: the run id and the environment seed.

>>> plan = plan_run(RunSpec(env="arith", env_args={"digits": 2}, env_seed=7, run_id="demo"))
>>> plan.env, plan.env_seed, plan.group_size
('arith {"digits":2}', 7, 4)
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import Field

from coordinator.leases import RunPlan
from envs import load_environment
from protocol.config import ConfigModel
from protocol.leases import SamplingParams

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class SamplingSpec(ConfigModel):
    temperature: float = Field(1.0, ge=0, le=10)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""
    max_tokens: int = Field(32, ge=1, le=1 << 20)
    """Longest completion, in tokens."""


class RunSpec(ConfigModel):
    run_id: str = Field("", pattern=r"^$|" + RUN_ID_PATTERN)
    """The run's id; empty picks ``run-<8 hex>``."""
    env: str = "arith"
    """Environment name: a built-in, ``reasoning_gym:<task>``, or an installed entry point."""
    env_args: dict[str, Any] = {}
    """Keyword arguments of the environment, e.g. ``{digits = 2}``."""
    env_seed: int | None = Field(None, ge=0, lt=1 << 63)
    """Seed of the run's examples; empty picks one at random."""
    base_model: str = "tiny"
    """Base model the rollouts are generated with (nodes name it with ``--model``)."""
    group_size: int = Field(4, ge=1, le=1024)
    """Completions per example (a GRPO group)."""
    sampling: SamplingSpec = SamplingSpec()
    """How inference nodes sample."""
    total_examples: int | None = Field(64, ge=1)
    """Examples to roll out; empty means no limit (as many as training consumes)."""
    prompts_per_lease: int = Field(8, ge=1, le=4096)
    """Most examples in one lease."""
    lease_ttl_s: float = Field(120.0, gt=0, le=86400)
    """A lease not delivered within this time is given to another node."""
    max_staleness: int = Field(2, ge=0, le=64)
    """Trainers of version ``v`` consume rollouts sampled at ``v - max_staleness`` or later."""


def plan_run(spec: RunSpec) -> RunPlan:
    """The lease plan of a spec; ``ValueError`` if its environment cannot be loaded."""
    env = load_environment(spec.env, **spec.env_args)
    return RunPlan(
        run_id=spec.run_id or f"run-{secrets.token_hex(4)}",
        env=env.name,
        env_version=env.version,
        env_seed=spec.env_seed if spec.env_seed is not None else secrets.randbits(63),
        group_size=spec.group_size,
        sampling=SamplingParams(**spec.sampling.model_dump()),
        base_model=spec.base_model,
        lease_ttl_s=spec.lease_ttl_s,
        total_examples=spec.total_examples,
        prompts_per_lease=spec.prompts_per_lease,
        max_staleness=spec.max_staleness,
    )
