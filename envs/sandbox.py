"""A sandbox for rewards that run code: untrusted Python in a locked-down child process.

Each run gets, before the program starts (in the child, between fork and exec):

- **its own network namespace** with no interfaces up: no network at all, not even loopback to
  this node's own ports;
- **its own mount namespace** with fresh, size-capped tmpfs over ``/tmp``, ``/var/tmp`` and
  ``/dev/shm``; the program's working directory is ``/tmp/work`` in that private tmpfs, so
  nothing it writes outlives it or reaches the host's files;
- **a fresh unprivileged uid** (never used by anything else), so it can read no 0600 file of
  ours (keys, databases), signal none of our processes, and is held by ``RLIMIT_NPROC`` (a fork
  bomb stops at ``max_processes``; the limit does not bind root);
- **resource limits**: CPU seconds, address space, file size (which also caps its output, written
  to files), open files, no core dumps; and a wall-clock timeout;
- **a scrubbed environment** (``PATH``, ``HOME``, ``LANG`` and ``PYTHONHASHSEED=0`` only) and
  ``python -P -s -S`` (``-I`` without ``-E``: isolated, but string hashing is seeded, so a
  program that prints a set prints it the same way on every run — environments whose tools run
  code must answer the same program the same way on every peer that replays it).

When the run ends (exit, timeout or limit), every process of that uid is killed, so no child of
the program survives it. Why not a container runtime or bubblewrap: neither is a Python package,
and this needs only the kernel calls below. It needs root (CAP_SYS_ADMIN) to make namespaces and
switch uid; without it ``SandboxUnavailable`` is raised — code rewards fail closed, they never
run unsandboxed.

Use: ``run_python("print(6 * 7)").stdout == "42\\n"``; ``Limits`` sets the bounds.
"""

from __future__ import annotations

import ctypes
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
UID_RANGE = (2_000_000, 3_000_000)
"""Sandbox uids: high enough to be owned by nobody on this machine."""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up here (no root, or no namespaces); code was not run."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 5.0
    """Wall-clock time before the program is killed."""
    cpu_s: int = 3
    """CPU seconds (all threads)."""
    memory_bytes: int = 512 << 20
    """Address space; Python itself needs ~40 MB."""
    max_processes: int = 16
    """Processes and threads the program may have at once."""
    max_output_bytes: int = 64 << 10
    """Per stream (stdout, stderr), and per file the program writes."""
    tmp_bytes: int = 32 << 20
    """Size of the private /tmp."""


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    """The exit status, or minus the signal that ended it (-9 for a kill)."""
    timed_out: bool
    uid: int
    """The run's own uid (no process of it is left when the result is returned)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def available() -> str | None:
    """None when the sandbox can run here, else why it cannot."""
    if sys.platform != "linux":
        return "the code sandbox needs Linux namespaces"
    if os.geteuid() != 0:
        return "the code sandbox needs root (to create namespaces and switch to a fresh uid)"
    if interpreter() is None:
        return "no Python interpreter that an unprivileged user may execute (e.g. /usr/bin/python3)"
    return None


def interpreter() -> str | None:
    """A Python the sandbox uid can run: ours if its path is open to others, else the system's.

    (A Python under a 0700 home directory, as pyenv installs it for root, is not.)
    """
    candidates = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and _open_to_others(os.path.realpath(candidate)):
            return os.path.realpath(candidate)
    return None


def _open_to_others(path: str) -> bool:
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while parent != "/":
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


def run_python(code: str, stdin: str = "", limits: Limits | None = None) -> SandboxResult:
    """Run ``code`` with ``python -P -s -S`` in the sandbox and return what it printed."""
    why = available()
    if why is not None:
        raise SandboxUnavailable(why)
    limits = limits or Limits()
    python = interpreter()
    assert python is not None  # available() checked it
    uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
    program = code.encode()
    with tempfile.TemporaryDirectory(prefix="bazaar-sandbox-") as host_dir:
        paths = [os.path.join(host_dir, name) for name in ("stdin", "stdout", "stderr")]
        with open(paths[0], "wb") as f:
            f.write(stdin.encode())
        with (
            open(paths[0], "rb") as fin,
            open(paths[1], "wb") as fout,
            open(paths[2], "wb") as ferr,
        ):
            try:
                proc = subprocess.Popen(
                    [python, "-P", "-s", "-S", "main.py"],
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    env={
                        "PATH": "/usr/local/bin:/usr/bin:/bin",
                        "HOME": "/tmp/work",
                        "LANG": "C.UTF-8",
                        "PYTHONHASHSEED": "0",
                    },
                    preexec_fn=lambda: _enter(uid, program, limits),
                    start_new_session=True,
                    close_fds=True,
                )
            except subprocess.SubprocessError as e:
                raise SandboxUnavailable(f"could not set up the sandbox: {e}") from None
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_uid(uid)
            proc.wait()
        out, err = (_read_capped(p, limits.max_output_bytes) for p in paths[1:])
    return SandboxResult(out, err, proc.returncode, timed_out, uid)


def _enter(uid: int, program: bytes, limits: Limits) -> None:
    """In the child, before exec: namespaces, private tmpfs, the program file, limits, uid."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"sandbox: {what} failed")

    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    size = f"size={limits.tmp_bytes},mode=1777".encode()
    for target in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(target):
            check(libc.mount(b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, size), "tmpfs")
    os.mkdir("/tmp/work", 0o700)
    with open("/tmp/work/main.py", "wb") as f:
        f.write(program)
    os.chown("/tmp/work", uid, uid)
    os.chown("/tmp/work/main.py", uid, uid)
    os.chdir("/tmp/work")
    cpu = limits.cpu_s
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
        (resource.RLIMIT_FSIZE, (limits.max_output_bytes, limits.max_output_bytes)),
        (resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes)),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _kill_uid(uid: int) -> None:
    """Kill every process of the sandbox uid, the program's children included."""
    pid = os.fork()
    if pid == 0:  # a helper that becomes the uid: kill(-1) then reaches exactly its processes
        try:
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(3):  # a fork bomb may fork between passes
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _read_capped(path: str, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")
