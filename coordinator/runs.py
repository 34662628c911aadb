"""Runs as a researcher describes them (``RunSpec``, TOML or JSON) and as the network plans them.

A spec names the run, its base model and environment, the LoRA to train, how rollouts are
sampled and scored (``rl``, with the loss), and how trainers train (``diloco``). Unknown keys
are errors (a typo must not silently fall back to a default). ``plan_run`` checks it against
the real environment registry (an unknown environment or bad arguments is a ``ValueError``
that says so) and fixes what a spec may leave open: the run id and the environment seed.
Examples: ``examples/*.toml``; ``bazaar run submit SPEC.toml``.

>>> spec = RunSpec(name="demo", env=EnvSpec(name="arith", args={"digits": 2}, seed=7))
>>> plan = plan_run(spec)
>>> plan.env, plan.env_seed, plan.group_size, plan.training.inner_steps
('arith {"digits":2}', 7, 8, 4)
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from envs import load_environment
from protocol.adapters import TrainSettings
from protocol.leases import SamplingParams
from protocol.runs import RunPlan
from protocol.service.config import ConfigModel, load_config

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class EnvSpec(ConfigModel):
    name: str = "arith"
    """Environment: a built-in (``arith``, ``reverse``, ``sort``, ``countdown``, ``gsm``),
    ``reasoning_gym:<task>``, or an installed entry point."""
    args: dict[str, Any] = {}
    """Keyword arguments of the environment, e.g. ``{digits = 2}``."""
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    """Seed of the run's examples; empty picks one at random."""


class LoraSpec(ConfigModel):
    rank: int = Field(8, ge=1, le=1024)
    """LoRA rank r."""
    alpha: int = Field(16, ge=1, le=65536)
    """LoRA alpha (the update is scaled by alpha / r)."""
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, max_length=64)
    """Names of the base model's linear layers that get adapters."""


class LossSpec(ConfigModel):
    std_normalize: bool = False
    """Divide each group's advantages by its reward standard deviation (GRPO's original form)."""
    clip_eps: float = Field(0.2, ge=0)
    """PPO clip of the importance ratio to ``[1 - eps, 1 + eps]``; 0 turns it off (the ratio
    mask stays) — the better choice with many inner steps per round (``bench_diloco``)."""
    mask_low: float = Field(0.125, ge=0)
    """Tokens whose importance ratio is below this are left out of the loss."""
    mask_high: float = Field(8.0, gt=0)
    """Tokens whose importance ratio is above this are left out of the loss."""
    normalize: Literal["token", "constant"] = "token"
    """``token``: mean over the batch's counted tokens; ``constant``: sum over ``constant``."""
    constant: float = Field(1024.0, gt=0)
    """The divisor of ``normalize = "constant"``."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of a KL penalty toward the base model; 0 (the default) turns it off."""


class RLSpec(ConfigModel):
    group_size: int = Field(8, ge=1, le=1024)
    """Completions per example (a GRPO group)."""
    prompts_per_lease: int = Field(8, ge=1, le=4096)
    """Most examples in one lease (a unit of inference work)."""
    max_examples: int | None = Field(None, ge=1)
    """Examples to roll out in all; empty means no limit (as many as training consumes)."""
    temperature: float = Field(1.0, ge=0, le=10)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""
    max_tokens: int = Field(32, ge=1, le=1 << 20)
    """Longest completion, in tokens."""
    lease_ttl_s: float = Field(120.0, gt=0, le=86400)
    """A lease not delivered within this time is given to another node."""
    loss: LossSpec = LossSpec()
    """The GRPO-family loss the trainers optimize."""


class DilocoSpec(ConfigModel):
    inner_steps: int = Field(4, ge=1, le=100_000)
    """H: inner AdamW steps per round (a round's rollouts are split into this many batches)."""
    inner_lr: float = Field(1e-3, gt=0)
    """Inner AdamW learning rate on the LoRA weights."""
    outer_lr: float = Field(1.0, gt=0)
    """Outer SGD learning rate on the averaged pseudo-gradient (1.0 without momentum is plain
    averaging, the measured best: ``scripts/bench_diloco.py``)."""
    outer_momentum: float = Field(0.0, ge=0, lt=1)
    """Outer Nesterov momentum (0: none)."""
    compression: Literal["fp16", "int8"] = "fp16"
    """How the quantized pseudo-gradients travel: ``fp16`` or ``int8`` (lossless bit-packed
    integers, half the bytes, coarser quantization levels)."""
    max_staleness: int = Field(2, ge=0, le=64)
    """Trainers of version ``v`` consume rollouts sampled at ``v - max_staleness`` or later."""


class VerificationSpec(ConfigModel):
    audit_floor: float | None = Field(None, ge=0, le=1)
    """Share of a trusted producer's rollouts of this run that are audited; empty: the
    coordinator's floor (``--audits.floor_rate``). New producers are audited every time until
    they earn trust, whatever this says."""


class BudgetSpec(ConfigModel):
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens the run may be billed (rollout tokens sampled and tokens trained on); the
    run completes (``budget``) before a round would pass it. Empty: only the submitter's key
    budget limits it."""


class StopSpec(ConfigModel):
    max_rounds: int | None = Field(None, ge=1)
    """Complete the run once this many adapter versions are made (``max_rounds``)."""
    target_reward: float | None = None
    """Complete the run once the completions of one version reach this mean reward, over at
    least ``min_samples`` of them (``target_reward``)."""
    min_samples: int = Field(64, ge=1)
    """Completions a version's mean reward must be measured on before it can stop the run."""


class RunSpec(ConfigModel):
    name: str = Field("", pattern=r"^$|" + RUN_ID_PATTERN)
    """The run's id; empty picks ``run-<8 hex>``."""
    base_model: str = "tiny"
    """Base model the run trains (nodes name it with ``--model``)."""
    env: EnvSpec = EnvSpec()
    """The task: environment, arguments, seed."""
    lora: LoraSpec = LoraSpec()
    """The adapter trained."""
    rl: RLSpec = RLSpec()
    """How rollouts are sampled and what the loss makes of them."""
    diloco: DilocoSpec = DilocoSpec()
    """How trainers train and average."""
    verification: VerificationSpec = VerificationSpec()
    """How often the run's rollouts are audited."""
    budget: BudgetSpec = BudgetSpec()
    """What the run may spend."""
    stop: StopSpec = StopSpec()
    """When the run is done (besides ``rl.max_examples`` and the budget)."""

    @classmethod
    def from_toml(cls, path: Path) -> RunSpec:
        """A spec file; ``ConfigError`` naming the file and every bad key."""
        return load_config(cls, path, [])


def train_settings(spec: RunSpec) -> TrainSettings:
    loss, d = spec.rl.loss, spec.diloco
    return TrainSettings(
        lora_rank=spec.lora.rank, lora_alpha=spec.lora.alpha,
        target_modules=list(spec.lora.target_modules), std_normalize=loss.std_normalize,
        clip_eps=loss.clip_eps, mask_low=loss.mask_low, mask_high=loss.mask_high,
        normalize=loss.normalize, constant=loss.constant, kl_coef=loss.kl_coef,
        inner_steps=d.inner_steps, inner_lr=d.inner_lr, outer_lr=d.outer_lr,
        outer_momentum=d.outer_momentum, wire=d.compression,
    )  # fmt: skip


def plan_run(spec: RunSpec) -> RunPlan:
    """The plan of a spec; ``ValueError`` if its environment cannot be loaded."""
    env = load_environment(spec.env.name, **spec.env.args)
    rl = spec.rl
    return RunPlan(
        run_id=spec.name or f"run-{secrets.token_hex(4)}",
        env=env.name,
        env_version=env.version,
        env_seed=spec.env.seed if spec.env.seed is not None else secrets.randbits(63),
        group_size=rl.group_size,
        sampling=SamplingParams(
            temperature=rl.temperature, top_p=rl.top_p, max_tokens=rl.max_tokens
        ),
        base_model=spec.base_model,
        lease_ttl_s=rl.lease_ttl_s,
        total_examples=rl.max_examples,
        prompts_per_lease=rl.prompts_per_lease,
        max_staleness=spec.diloco.max_staleness,
        training=train_settings(spec),
        audit_floor=spec.verification.audit_floor,
        max_tokens=spec.budget.max_tokens,
        max_rounds=spec.stop.max_rounds,
        target_reward=spec.stop.target_reward,
        min_samples=spec.stop.min_samples,
    )
