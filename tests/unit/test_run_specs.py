"""Run specs: every shipped example parses and plans against the real environments; unknown
keys and bad values are errors that name the file and the key; what trainers get follows the
spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.runs import RunSpec, plan_run
from protocol.errors import ConfigError
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def test_there_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"arith-tiny", "reverse-tiny", "reasoning-gym-tiny", "smollm2-gsm"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_shipped_spec_parses_and_plans(path: Path) -> None:
    spec = RunSpec.from_toml(path)
    plan = plan_run(spec)
    assert plan.run_id == spec.name and plan.group_size == spec.rl.group_size
    assert plan.training.inner_steps == spec.diloco.inner_steps
    assert plan.training.target_modules == spec.lora.target_modules


def test_unknown_keys_and_bad_values_name_the_file_and_key(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text('name = "x"\n[diloco]\ninner_step = 8\n')
    with pytest.raises(ConfigError, match=r"typo\.toml.*diloco\.inner_step"):
        RunSpec.from_toml(typo)
    bad = tmp_path / "bad.toml"
    bad.write_text('[diloco]\ncompression = "int4"\n')
    with pytest.raises(ConfigError, match=r"diloco\.compression"):
        RunSpec.from_toml(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        RunSpec.from_toml(tmp_path / "missing.toml")


def test_trainers_get_the_specs_settings() -> None:
    spec = RunSpec.model_validate(
        {"name": "s", "lora": {"rank": 4, "target_modules": ["q_proj"]},
         "rl": {"loss": {"clip_eps": 0, "kl_coef": 0.1}},
         "diloco": {"inner_steps": 32, "outer_momentum": 0.9, "compression": "int8"}}
    )  # fmt: skip
    t = plan_run(spec).training
    assert (t.lora_rank, t.target_modules, t.clip_eps, t.kl_coef) == (4, ["q_proj"], 0.0, 0.1)
    assert (t.inner_steps, t.outer_momentum, t.wire) == (32, 0.9, "int8")
