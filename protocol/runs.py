"""Runs: the one run-spec tree every side uses, a run's plan, and its status on gossip.

A researcher describes a run in TOML (``examples/*.toml``) as a ``RunSpec``: its name, base
model and environment, the LoRA to train, how rollouts are sampled and scored (``rl``, with the
loss), how trainers train (``diloco``), audits, budget and stop rules. The same typed tree is
what ``bazaar run submit`` checks locally, what the REST API decodes, what the coordinator
plans from, and what trainers train with: ``TrainAssignment`` carries the spec's own ``lora``,
``rl.loss`` and ``diloco`` sections (``TrainSettings``), and the trainer reads them as they are.
Each field is documented once, here (the docstring under it); unknown keys are errors that name
the file and the key, so a typo never falls back to a default.

A run's plan (``RunPlan``) is the spec plus what the coordinator fixes for it: the run id, the
environment's canonical name and version, and the seed of its examples. ``RunStatus`` goes out
on gossip whenever a run changes state or policy version.

>>> spec = decode_spec(b'{"name": "demo", "diloco": {"inner_steps": 8}}')
>>> spec.diloco.inner_steps, spec.rl.group_size, spec.training().loss.clip_eps
(8, 8, 0.2)
>>> decode_spec(b'{"diloco": {"inner_step": 8}}')
Traceback (most recent call last):
...
protocol.errors.ConfigError: run spec: unknown key 'diloco.inner_step'
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from protocol.codec import KiB, Message, Name, NonNegInt, read_toml
from protocol.errors import ConfigError
from protocol.leases import MAX_TURNS, SamplingParams

RunState = Literal["queued", "running", "completed", "failed", "cancelled"]
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ModuleName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A part of the run spec (strict: unknown keys are errors)."""


class EnvSpec(Section, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] = "arith"
    """Environment: a built-in (``arith``, ``reverse``, ``sort``, ``countdown``, ``gsm``),
    ``reasoning_gym:<task>``, or an installed entry point."""
    args: dict[str, Any] = {}
    """Keyword arguments of the environment, e.g. ``{digits = 2}``."""
    seed: Seed | None = None
    """Seed of the run's examples; empty picks one at random."""


class LoraSpec(Section, frozen=True):
    rank: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    """LoRA rank r."""
    alpha: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    target_modules: Annotated[list[ModuleName], msgspec.Meta(min_length=1, max_length=64)] = (
        msgspec.field(default_factory=lambda: ["q_proj", "v_proj"])
    )
    """Names of the base model's linear layers that get adapters."""


class LossSpec(Section, frozen=True):
    std_normalize: bool = False
    """Divide each group's advantages by its reward standard deviation (GRPO's original form)."""
    clip_eps: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    """PPO clip of the importance ratio to ``[1 - eps, 1 + eps]``; 0 turns it off (the ratio
    mask stays) — the better choice with many inner steps per round (``bench_diloco``)."""
    mask_low: Annotated[float, msgspec.Meta(ge=0)] = 0.125
    """Tokens whose importance ratio is below this are left out of the loss."""
    mask_high: Annotated[float, msgspec.Meta(gt=0)] = 8.0
    """Tokens whose importance ratio is above this are left out of the loss."""
    normalize: Literal["token", "constant"] = "token"
    """``token``: mean over the batch's counted tokens; ``constant``: sum over ``constant``."""
    constant: Annotated[float, msgspec.Meta(gt=0)] = 1024.0
    """The divisor of ``normalize = "constant"``."""
    kl_coef: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Weight of a KL penalty toward the base model; 0 (the default) turns it off."""


class RLSpec(Section, frozen=True):
    group_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    """Completions per example (a GRPO group)."""
    prompts_per_lease: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 8
    """Most examples in one lease (a unit of inference work)."""
    max_examples: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Examples to roll out in all; empty means no limit (as many as training consumes)."""
    temperature: Annotated[float, msgspec.Meta(ge=0, le=10)] = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 32
    """Longest completion, in tokens."""
    lease_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 120.0
    """A lease not delivered within this time is given to another node."""
    loss: LossSpec = msgspec.field(default_factory=LossSpec)
    """The GRPO-family loss the trainers optimize."""

    def sampling(self) -> SamplingParams:
        """How every lease of the run is sampled (the lease carries it)."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens
        )


class DilocoSpec(Section, frozen=True):
    inner_steps: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 4
    """H: inner AdamW steps per round (a round's rollouts are split into this many batches)."""
    inner_lr: Annotated[float, msgspec.Meta(gt=0)] = 1e-3
    """Inner AdamW learning rate on the LoRA weights."""
    outer_lr: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """Outer SGD learning rate on the averaged pseudo-gradient (1.0 without momentum is plain
    averaging, the measured best: ``scripts/bench_diloco.py``)."""
    outer_momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    """Outer Nesterov momentum (0: none)."""
    compression: Literal["fp16", "int8"] = "fp16"
    """How the quantized pseudo-gradients travel: ``fp16`` or ``int8`` (lossless bit-packed
    integers, half the bytes, coarser quantization levels)."""
    max_staleness: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    """Trainers of version ``v`` consume rollouts sampled at ``v - max_staleness`` or later."""


class VerificationSpec(Section, frozen=True):
    audit_floor: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    """Share of a trusted producer's rollouts of this run that are audited; empty: the
    coordinator's floor (``--audits.floor_rate``). New producers are audited every time until
    they earn trust, whatever this says."""
    trusted_only: bool = True
    """Train only on rollouts that passed their audit or come from producers past the trust
    threshold (whose rollouts no audit was drawn for). Off: a rollout trains as soon as the
    coordinator has confirmed its token count, and a cheat caught later is refunded."""


class BudgetSpec(Section, frozen=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Most tokens the run may be billed (rollout tokens sampled and tokens trained on); the
    run completes (``budget``) before a round would pass it. Empty: only the submitter's key
    budget limits it."""


class StopSpec(Section, frozen=True):
    max_rounds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Complete the run once this many adapter versions are made (``max_rounds``)."""
    target_reward: float | None = None
    """Complete the run once the completions of one version reach this mean reward, over at
    least ``min_samples`` of them (``target_reward``), as the coordinator recomputed them from
    the payloads (it needs the base model's tokenizer: ``--tokenizers.<model>``)."""
    min_samples: Annotated[int, msgspec.Meta(ge=1)] = 64
    """Completions a version's mean reward must be measured on before it can stop the run."""


class TrainSettings(Section, frozen=True):
    """What a run's trainers train with: the spec's own sections, as they are (every trainer
    of the run gets the same, which bit-identical rounds need)."""

    lora: LoraSpec = msgspec.field(default_factory=LoraSpec)
    """The adapter trained."""
    loss: LossSpec = msgspec.field(default_factory=LossSpec)
    """The loss it is trained with."""
    diloco: DilocoSpec = msgspec.field(default_factory=DilocoSpec)
    """Inner steps, outer step and how pseudo-gradients travel."""


class RunSpec(Section, frozen=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^$|" + RUN_ID_PATTERN)] = ""
    """The run's id; empty picks ``run-<8 hex>``."""
    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] = "tiny"
    """Base model the run trains (nodes name it with ``--model``)."""
    env: EnvSpec = msgspec.field(default_factory=EnvSpec)
    """The task: environment, arguments, seed."""
    lora: LoraSpec = msgspec.field(default_factory=LoraSpec)
    """The adapter trained."""
    rl: RLSpec = msgspec.field(default_factory=RLSpec)
    """How rollouts are sampled and what the loss makes of them."""
    diloco: DilocoSpec = msgspec.field(default_factory=DilocoSpec)
    """How trainers train and average."""
    verification: VerificationSpec = msgspec.field(default_factory=VerificationSpec)
    """How often the run's rollouts are audited."""
    budget: BudgetSpec = msgspec.field(default_factory=BudgetSpec)
    """What the run may spend."""
    stop: StopSpec = msgspec.field(default_factory=StopSpec)
    """When the run is done (besides ``rl.max_examples`` and the budget)."""

    def training(self) -> TrainSettings:
        return TrainSettings(lora=self.lora, loss=self.rl.loss, diloco=self.diloco)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON and TOML), every field included."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


class RunPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A run as the coordinator leases and trains it: the spec, and what it fixed for it."""

    spec: RunSpec
    run_id: Name
    env: Annotated[str, msgspec.Meta(max_length=1024)]
    """Canonical environment name (with arguments), as ``load_environment`` takes it."""
    env_version: Annotated[str, msgspec.Meta(max_length=64)]
    env_seed: Seed
    max_turns: Annotated[int, msgspec.Meta(ge=1, le=MAX_TURNS)] = 1
    """Model turns per sample: the environment's (``MultiTurnEnvironment.max_turns``)."""

    def sampling(self) -> SamplingParams:
        """How every lease of the run is sampled (the lease carries it)."""
        return msgspec.structs.replace(self.spec.rl.sampling(), max_turns=self.max_turns)


class RunStatus(Message):
    """Coordinator → gossip: a run's state and current policy version."""

    TYPE: ClassVar[str] = "runs.status"
    MAX_BYTES: ClassVar[int] = 4 * KiB
    run_id: Name
    state: RunState
    policy_version: NonNegInt
    max_staleness: NonNegInt
    base_model: Annotated[str, msgspec.Meta(max_length=512)]


# -- reading specs ------------------------------------------------------------------------------


def load_spec(path: Path) -> RunSpec:
    """A spec file (TOML); ``ConfigError`` naming the file and the bad key."""
    return spec_from(read_toml(path), str(path))


def decode_spec(body: bytes, source: str = "run spec") -> RunSpec:
    """A spec sent as JSON (the REST API's body); ``ConfigError`` naming the bad key."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None
    return spec_from(data, source)


def spec_from(data: Any, source: str = "run spec") -> RunSpec:
    try:
        return msgspec.convert(data, RunSpec)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_explain(str(e))}") from None


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")


def _explain(message: str) -> str:
    """msgspec's ``Expected `int` >= 1 - at `$.rl.group_size``` as ``rl.group_size: ...``."""
    m = _AT.match(message)
    what, path = (m["what"], (m["path"] or "").lstrip(".")) if m else (message, "")
    if unknown := _UNKNOWN.match(what):
        key = f"{path}.{unknown['key']}" if path else unknown["key"]
        return f"unknown key '{key}'"
    return f"{path}: {what}" if path else what


def field_docs(section: type[msgspec.Struct] = RunSpec, prefix: str = "") -> dict[str, str]:
    """Every field of the spec tree (dotted) and its docstring, read from this module's source:
    what ``bazaar run fields`` prints, and what a test checks is never missing."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(section))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    for stmt, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        doc = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            doc = " ".join(str(after.value.value).split())
        docs[prefix + name] = doc
        sub = _SECTIONS.get(section.__annotations__.get(name, ""))
        if sub is not None:
            docs.update(field_docs(sub, f"{prefix}{name}."))
    return docs


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    c.__name__: c
    for c in (
        EnvSpec,
        LoraSpec,
        LossSpec,
        RLSpec,
        DilocoSpec,
        VerificationSpec,
        BudgetSpec,
        StopSpec,
    )
}
