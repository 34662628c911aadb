"""CLI errors a user can fix: one clear line on stderr, exit code 2, nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port


def bazaar(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bazaar", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "BAZAAR_HOME": str(home)},
        timeout=60,
    )


def test_identity_show_refuses_a_corrupt_key_and_keeps_it(home: Path) -> None:
    home.mkdir(mode=0o700)
    key = home / "identity.key"
    key.write_text("garbage")
    key.chmod(0o600)
    result = bazaar(home, "identity", "show")
    assert result.returncode == 2
    assert "will not replace it" in result.stderr and "Traceback" not in result.stderr
    assert key.read_text() == "garbage"


def test_network_status_without_a_coordinator(home: Path) -> None:
    port = free_port()  # nobody listens there
    result = bazaar(home, "network", "status", "--coordinator-url", f"http://127.0.0.1:{port}")
    assert result.returncode == 2
    assert "cannot read nodes from the coordinator" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_names_the_key(home: Path) -> None:
    result = bazaar(home, "coordinator", "start", "--membership.bogus=1")
    assert result.returncode == 2
    assert "unknown key 'membership.bogus'" in result.stderr
    assert not (home / "coordinator.key").exists()  # nothing was created


def test_run_submit_refuses_a_bad_spec_locally_and_run_fields_lists_every_field(
    home: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "typo.toml"
    spec.write_text('name = "x"\n[rl]\ngroup_sise = 8\n')
    port = free_port()  # nothing is sent: the spec is checked first
    result = bazaar(
        home, "run", "submit", str(spec), "--coordinator-url", f"http://127.0.0.1:{port}"
    )
    assert result.returncode == 2
    assert "typo.toml: unknown key 'rl.group_sise'" in result.stderr
    fields = bazaar(home, "run", "fields")
    assert fields.returncode == 0, fields.stderr
    assert "rl.loss.clip_eps" in fields.stdout and "diloco.compression" in fields.stdout
