"""Config loading: TOML + dotted overrides; unknown keys named with their file; all documented."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from protocol.service.config import ConfigModel, describe, load_config, parse_overrides


class Gossip(ConfigModel):
    degree: int = 6
    """Mesh degree."""


class Demo(ConfigModel):
    name: str = "node"
    """Display name."""
    interval_s: float = 2.0
    """Heartbeat interval."""
    roles: list[str] = ["inference"]
    """Roles to take."""
    gossip: Gossip = Gossip()
    """Gossip settings."""


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('name = "a"\ninterval_s = 5\n[gossip]\ndegree = 3\n')
    cfg = load_config(Demo, path, ["--gossip.degree=8", "--roles", '["trainer"]', "--name", "b"])
    assert (cfg.name, cfg.interval_s, cfg.gossip.degree, cfg.roles) == ("b", 5.0, 8, ["trainer"])


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[gossip]\ndegre = 3\n")
    with pytest.raises(ConfigError, match=r"node\.toml: unknown key 'gossip\.degre'.*degree"):
        load_config(Demo, path)


def test_unknown_override_names_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"command line: unknown key 'intervl_s'"):
        load_config(Demo, None, ["--intervl_s=1"])


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('interval_s = "soon"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: interval_s: .*number"):
        load_config(Demo, path)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Demo, path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Demo, tmp_path / "missing.toml")


@pytest.mark.parametrize("args", [["name"], ["--name"], ["--"]])
def test_malformed_overrides(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_overrides(args)


def test_override_into_a_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(Demo, None, ["--name.x=1"])
    path = tmp_path / "c.toml"
    path.write_text('name = "a"\n')
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(Demo, path, ["--name.x=1"])


def _config_models() -> list[type[ConfigModel]]:
    """Every ConfigModel subclass defined in the project's packages."""
    for pkg in ["protocol", "node", "coordinator", "verification", "envs", "gateway"]:
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, f"{pkg}."):
            # the transport, and hivemind's side (which cannot share a process with libp2p)
            if not info.name.endswith(".p2p") and info.name != "node.training.wire":
                importlib.import_module(info.name)
    seen, todo = [], list(ConfigModel.__subclasses__())
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in seen if not c.__module__.startswith("tests.")]


def test_every_shipped_config_field_is_documented() -> None:
    for model in _config_models():
        for key, _, doc in describe(model):
            assert doc, f"{model.__module__}.{model.__name__}.{key} has no docstring"


def test_node_roles_are_checked() -> None:
    from node.config import NodeConfig

    assert load_config(NodeConfig, None, ['--roles=["verifier","inference"]']).roles == [
        "inference",
        "verifier",
    ]
    with pytest.raises(ConfigError, match=r"roles.*unknown role\(s\) \['miner'\]"):
        load_config(NodeConfig, None, ['--roles=["miner"]'])


def test_coordinator_config_bounds() -> None:
    from coordinator.config import CoordinatorConfig

    cfg = load_config(CoordinatorConfig, None, ["--membership.heartbeat_interval_s=0.5"])
    assert cfg.membership.heartbeat_interval_s == 0.5
    with pytest.raises(ConfigError, match=r"membership\.heartbeat_interval_s"):
        load_config(CoordinatorConfig, None, ["--membership.heartbeat_interval_s=-1"])


def test_a_section_given_in_part_keeps_its_other_defaults(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig

    config = load_config(CoordinatorConfig, None, ["--admission.joins_per_address.burst=8"])
    assert config.admission.joins_per_address.burst == 8
    assert config.admission.joins_per_address.per_s == 2.0  # the section's default
    path = tmp_path / "c.toml"
    path.write_text("[membership]\nheartbeat_interval_s = 1\n")
    config = load_config(CoordinatorConfig, path)
    assert config.membership.heartbeat_interval_s == 1
    assert config.membership.dead_after_missed == 3.0
