"""The code sandbox against programs that try to break out (each attack must fail)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envs import sandbox
from envs.sandbox import Limits, SandboxUnavailable, run_python
from tests.conftest import REPO

_why = sandbox.available()
needs_sandbox = pytest.mark.skipif(_why is not None, reason=f"sandbox unavailable here: {_why}")
FAST = Limits(wall_s=2.0, cpu_s=1)


def _live_processes(uid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "uid=,stat=,pid="], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()
        if line.split()[0] == str(uid) and "Z" not in line.split()[1]
    ]


@needs_sandbox
def test_a_plain_program_runs_and_reads_stdin() -> None:
    r = run_python("import sys; print(sum(int(x) for x in sys.stdin.read().split()))", "1 2 3")
    assert r.ok and r.stdout == "6\n" and not r.timed_out


@needs_sandbox
def test_fork_bomb_is_contained_and_nothing_survives() -> None:
    t0 = time.monotonic()
    r = run_python("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert time.monotonic() - t0 < 10
    assert not r.ok
    assert _live_processes(r.uid) == []


@needs_sandbox
def test_background_children_do_not_outlive_the_run() -> None:
    r = run_python("import subprocess; subprocess.Popen(['sleep', '300']); print('spawned')")
    assert r.stdout == "spawned\n"
    assert _live_processes(r.uid) == []


@needs_sandbox
def test_os_system_cannot_touch_host_files(tmp_path: Path) -> None:
    victim = REPO / "sandbox-escape-marker"
    in_tmp = tmp_path / "escape"
    code = f"import os; os.system('touch {victim} {in_tmp} /etc/escape; echo done')"
    r = run_python(code)
    assert "done" in r.stdout
    assert not victim.exists() and not in_tmp.exists() and not Path("/etc/escape").exists()


@needs_sandbox
def test_writes_outside_the_work_dir_go_nowhere(tmp_path: Path) -> None:
    code = f"""
import os
results = []
for path in ["{REPO}/escape.txt", "/etc/escape.txt", "/root/escape.txt", "{tmp_path}/escape.txt",
             "/tmp/escape.txt", "/dev/shm/escape.txt", "/var/tmp/escape.txt", "work.txt"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        results.append("wrote " + path)
    except OSError as e:
        results.append("refused " + path)
print("\\n".join(results))
"""
    r = run_python(code)
    assert r.ok, r.stderr
    for path in (REPO / "escape.txt", Path("/etc/escape.txt"), tmp_path / "escape.txt"):
        assert not path.exists()
    assert f"refused {REPO}/escape.txt" in r.stdout and "refused /etc/escape.txt" in r.stdout
    # the private tmpfs and the work dir are writable, and vanish with the run
    assert "wrote work.txt" in r.stdout and "wrote /tmp/escape.txt" in r.stdout
    assert not Path("/tmp/escape.txt").exists()


@needs_sandbox
def test_secrets_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAZAAR_SECRET_TOKEN", "hunter2")
    key = REPO / ".sandbox-test-key"
    key.write_text("private key material")
    os.chmod(key, 0o600)
    try:
        code = f"""
import os
print("env:", os.environ.get("BAZAAR_SECRET_TOKEN"))
for path in ["{key}", "/proc/1/environ", "/proc/{os.getpid()}/environ", "/root/.bashrc"]:
    try:
        print("read", path, open(path, "rb").read()[:20])
    except OSError as e:
        print("refused", path)
"""
        r = run_python(code)
    finally:
        key.unlink()
    assert "hunter2" not in r.stdout + r.stderr and "private key" not in r.stdout
    assert "env: None" in r.stdout
    assert f"refused {key}" in r.stdout and "refused /proc/1/environ" in r.stdout


@needs_sandbox
def test_infinite_loops_are_stopped() -> None:
    t0 = time.monotonic()
    spin = run_python("while True: pass", limits=FAST)
    sleep = run_python("import time; time.sleep(60)", limits=FAST)
    assert not spin.ok and not sleep.ok and sleep.timed_out
    assert time.monotonic() - t0 < 10


@needs_sandbox
def test_memory_and_output_bombs_are_capped() -> None:
    mem = run_python("x = bytearray(8 << 30)", limits=FAST)
    assert not mem.ok and "MemoryError" in mem.stderr
    flood = run_python("while True: print('x' * 1000)", limits=FAST)
    assert not flood.ok and len(flood.stdout) <= Limits().max_output_bytes


@needs_sandbox
def test_no_network() -> None:
    r = run_python("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert not r.ok and ("unreachable" in r.stderr or "refused" in r.stderr)


def test_fails_closed_without_privileges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="needs root"):
        run_python("print('should not run')")


@needs_sandbox
def test_concurrent_runs_get_their_own_launchers_and_outputs() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: run_python(f"print({n} * {n})"), range(8)))
    assert [r.stdout for r in results] == [f"{n * n}\n" for n in range(8)]
    assert len({r.uid for r in results}) == 8


@needs_sandbox
def test_launchers_exit_with_their_caller() -> None:
    """A caller that exits (however) leaves no launcher behind: it reads EOF and stops."""
    script = (
        "from envs.sandbox import run_python; import sys\n"
        "print(run_python('print(1)').stdout, flush=True)\n"
        "sys.stdin.read()"
    )
    caller = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert caller.stdout is not None and caller.stdout.readline() == "1\n"

    out = subprocess.run(["ps", "-wweo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    mine = [
        int(line.split()[0])
        for line in out.splitlines()
        if "sandbox.py --launcher" in line and line.split()[1] == str(caller.pid)
    ]
    assert len(mine) == 1, out
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{mine[0]}").exists() and "Z" not in _state(mine[0]):
        assert time.monotonic() < deadline, "the launcher outlived its caller"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
