"""Run specs: every shipped example parses and plans against the real environments; unknown
keys and bad values are errors that name the file and the key; what trainers get is the spec's
own sections; every field of the tree is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.runs import plan_run
from protocol.errors import ConfigError
from protocol.runs import RunSpec, field_docs, load_spec, spec_from
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def test_there_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    shipped = {"arith-tiny", "reverse-tiny", "reasoning-gym-tiny", "smollm2-gsm", "smollm2-arith"}
    assert shipped <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_shipped_spec_parses_and_plans(path: Path) -> None:
    spec = load_spec(path)
    plan = plan_run(spec)
    assert plan.run_id == spec.name and plan.spec == spec
    assert plan.env_version and plan.env.startswith(spec.env.name)


def test_unknown_keys_and_bad_values_name_the_file_and_key(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text('name = "x"\n[diloco]\ninner_step = 8\n')
    with pytest.raises(ConfigError, match=r"typo\.toml.*diloco\.inner_step"):
        load_spec(typo)
    bad = tmp_path / "bad.toml"
    bad.write_text('[diloco]\ncompression = "int4"\n')
    with pytest.raises(ConfigError, match=r"diloco\.compression"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_spec(tmp_path / "missing.toml")


def test_trainers_get_the_specs_settings() -> None:
    spec = spec_from(
        {"name": "s", "lora": {"rank": 4, "target_modules": ["q_proj"]},
         "rl": {"loss": {"clip_eps": 0, "kl_coef": 0.1}},
         "diloco": {"inner_steps": 32, "outer_momentum": 0.9, "compression": "int8"}}
    )  # fmt: skip
    t = plan_run(spec).spec.training()
    assert t.lora is spec.lora and t.loss is spec.rl.loss and t.diloco is spec.diloco
    assert (t.lora.rank, t.lora.target_modules, t.loss.clip_eps, t.loss.kl_coef) == (
        4, ["q_proj"], 0.0, 0.1,
    )  # fmt: skip
    assert (t.diloco.inner_steps, t.diloco.outer_momentum, t.diloco.compression) == (
        32, 0.9, "int8",
    )  # fmt: skip


def test_every_field_of_the_spec_tree_is_documented() -> None:
    docs = field_docs()
    assert {
        "name",
        "env.seed",
        "rl.loss.clip_eps",
        "diloco.compression",
        "stop.min_samples",
    } <= set(docs)
    assert [k for k, doc in docs.items() if not doc] == []
    assert len(docs) == len(_leaves(RunSpec())) + 8  # every leaf, and the eight sections


def _leaves(section: object, prefix: str = "") -> list[str]:
    import msgspec

    out = []
    for name in section.__struct_fields__:  # type: ignore[attr-defined]
        value = getattr(section, name)
        if isinstance(value, msgspec.Struct):
            out += _leaves(value, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out
