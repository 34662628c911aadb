"""The distribution: packages, console script, extras, and the CPU torch rule."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO

PACKAGES = {"node", "coordinator", "protocol", "verification", "envs", "gateway"}


def test_pyproject_declares_packages_script_and_extras() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "bazaar"
    assert project["requires-python"] == ">=3.11"
    assert project["scripts"]["bazaar"] == "bazaar.cli:main"
    assert {"dev", "envs", "vllm"} <= set(project["optional-dependencies"])
    include = set(meta["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {f"{p}*" for p in PACKAGES} <= include


def test_installed_distribution_points_at_this_repo() -> None:
    """Each top-level package resolves to this checkout, even from a neutral directory."""
    code = (
        "import importlib, json\n"
        f"print(json.dumps({{p: importlib.import_module(p).__file__ for p in {sorted(PACKAGES)}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    import json

    for pkg, file in json.loads(out.stdout).items():
        assert Path(file).resolve().is_relative_to(REPO), (pkg, file)
    assert importlib.metadata.distribution("bazaar").metadata["Name"] == "bazaar"


def test_cpu_torch_is_the_pinned_build() -> None:
    import torch

    if not torch.cuda.is_available():
        assert torch.__version__.split("+")[0] == "2.13.0"


def test_help_lists_only_working_groups() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bazaar", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "identity" in out
