"""``bazaar env init`` writes a package that installs, registers its environment (``bazaar env
list`` shows it, a run spec can name it) and passes its own tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_scaffolded_environment_installs_registers_and_passes_its_tests(tmp_path: Path) -> None:
    package, site = tmp_path / "letters", tmp_path / "site"
    run(sys.executable, "-m", "bazaar", "env", "init", "letters", "--dir", str(package))
    assert (package / "pyproject.toml").exists() and (package / "tests/test_letters.py").exists()
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
        "--target", str(site), str(package))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    listed = json.loads(run(sys.executable, "-m", "bazaar", "env", "list", "--json", env=env))
    mine = next(r for r in listed if r["name"] == "letters")
    assert mine["source"] == "letters-env 0.1.0" and mine["harness"] == "multi_turn"
    assert mine["version"] == "1" and "count a letter" in mine["about"]
    tests = str(package / "tests")
    out = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests,
              env=env, cwd=tmp_path)  # fmt: skip
    assert "3 passed" in out


def test_init_refuses_bad_names_and_will_not_overwrite(tmp_path: Path) -> None:
    for bad in ("Bad-Name", "class", "arith"):
        done = subprocess.run([sys.executable, "-m", "bazaar", "env", "init", bad, "--dir",
                               str(tmp_path / "x")], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and not (tmp_path / "x").exists(), done.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "bazaar", "env", "init", "fine", "--dir",
                           str(tmp_path / "taken")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "not empty" in done.stderr + done.stdout
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
