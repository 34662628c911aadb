"""The Dockerfile and the compose file (Docker has no engine here, so neither is built or run):
the compose file parses, every service runs the one image, every Bazaar service's command is a
real command that accepts its options (run with ``--help`` appended), the databases are shared
as the design says, and the Dockerfile copies every package and enters through ``bazaar``."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import yaml

from tests.conftest import REPO

PACKAGES = ["bazaar", "coordinator", "envs", "gateway", "node", "protocol", "verification"]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_every_service_command_is_a_real_bazaar_command() -> None:
    services = compose()["services"]
    bazaar = {name: s for name, s in services.items() if s.get("image") == "bazaar:latest"}
    assert set(bazaar) == {"coordinator", "gateway", "node-1", "node-2"}
    assert all(s.get("build") == "." for s in bazaar.values())  # one image, from the Dockerfile
    for name, service in bazaar.items():
        command = service["command"]
        out = subprocess.run([sys.executable, "-m", "bazaar", *command, "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, (name, out.stdout[-500:], out.stderr[-2000:])
        assert "Usage:" in out.stdout, name
        assert f"bazaar {command[0]} {command[1]}" in out.stdout.replace("python -m ", ""), name


def test_the_options_of_each_service_are_valid_config() -> None:
    """``--help`` is eager and checks nothing else: load each service's options into its config
    model, as the command would."""
    from coordinator.config import CoordinatorConfig
    from gateway.config import GatewayConfig
    from node.config import NodeConfig
    from protocol.service.config import load_config

    models = {"coordinator": CoordinatorConfig, "gateway": GatewayConfig, "node": NodeConfig}
    for name, service in compose()["services"].items():
        if service.get("image") != "bazaar:latest":
            continue
        what, _, *options = service["command"]
        overrides = []
        for opt in options:  # as the command maps its flags: --serve is true, roles a list
            key, eq, value = opt.partition("=")
            if key == "--roles":
                value = json.dumps(value.split(","))
            overrides.append(f"{key}={value if eq else 'true'}")
        config = load_config(models[what], None, overrides)
        assert config is not None, name
        if what == "node":
            assert isinstance(config, NodeConfig) and config.coordinator.startswith("http://")
    services = compose()["services"]
    url = "postgresql://bazaar:bazaar@postgres/bazaar"
    coordinator = " ".join(services["coordinator"]["command"])
    assert f"--db={url}" in coordinator and f"--accounts_db={url}" in coordinator
    assert f"--db={url}" in " ".join(services["gateway"]["command"])  # one accounts database
    # the gateway is admitted at the coordinator: its secret comes in its environment
    assert "BAZAAR_GATEWAY_SECRET" in services["gateway"]["environment"]
    assert services["gateway"]["environment"]["BAZAAR_HOME"] == "/data"


def test_the_dockerfile_copies_every_package_and_enters_through_bazaar() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    assert set(PACKAGES) | {"examples"} <= copied
    for src in copied:
        assert (REPO / src).exists(), src
    (entry,) = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert json.loads(entry.split(None, 1)[1]) == ["bazaar"]
    assert any('"torch==2.13.0"' in line for line in lines)  # the CPU build, not CUDA wheels
