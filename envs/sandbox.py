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
the program survives it.

**The launcher.** Setting the child up needs code between fork and exec, so the process that does
it must ``fork()`` (``posix_spawn`` cannot run it), and forking a node — a few hundred MB
resident — costs ~40 ms of page-table copying a run. So each run is started by a *launcher*: this
file run as a small stdlib-only process (``python -I -S envs/sandbox.py``, ~10 MB), which reads one
request per line on its stdin, forks the sandboxed child, waits for it (a pidfd, with the wall
timeout), kills its uid and answers with the exit status. The caller keeps a pool of idle
launchers (one per concurrent run; a launcher exits when its caller does, at EOF on its stdin).
Why not ``multiprocessing``'s fork server: it imports the caller's ``__main__`` again in the
server, which a CLI or a test runner does not survive.

Why not a container runtime or bubblewrap: neither is a Python package, and this needs only the
kernel calls below. It needs root (CAP_SYS_ADMIN) to make namespaces and
switch uid; without it ``SandboxUnavailable`` is raised — code rewards fail closed, they never
run unsandboxed.

Use: ``run_python("print(6 * 7)").stdout == "42\\n"``; ``Limits`` sets the bounds.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

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


ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp/work",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
}
STREAMS = ("stdin", "stdout", "stderr")


def run_python(code: str, stdin: str = "", limits: Limits | None = None) -> SandboxResult:
    """Run ``code`` with ``python -P -s -S`` in the sandbox and return what it printed."""
    why = available()
    if why is not None:
        raise SandboxUnavailable(why)
    limits = limits or Limits()
    uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
    with tempfile.TemporaryDirectory(prefix="bazaar-sandbox-") as host_dir:
        with open(os.path.join(host_dir, "stdin"), "wb") as f:
            f.write(stdin.encode())
        request = {
            "uid": uid, "program": code, "limits": asdict(limits),
            "python": interpreter(), "dir": host_dir,
        }  # fmt: skip
        reply = _launch(request)
        if "error" in reply:
            raise SandboxUnavailable(f"could not set up the sandbox: {reply['error']}")
        out, err = (
            _read_capped(os.path.join(host_dir, name), limits.max_output_bytes)
            for name in STREAMS[1:]
        )
    code_ = reply["exit_code"]
    return SandboxResult(
        out, err, code_ if isinstance(code_, int) else None, bool(reply["timed_out"]), uid
    )


class _Launcher:
    """The caller's handle on one launcher process (see the module docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--launcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )

    def call(self, request: dict[str, object]) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SandboxUnavailable(f"the sandbox launcher exited ({self.proc.wait()})")
        reply: dict[str, object] = json.loads(line)
        return reply

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


_idle: list[_Launcher] = []
_idle_lock = threading.Lock()
os.register_at_fork(after_in_child=_idle.clear)  # a forked caller must not share our pipes


def _launch(request: dict[str, object]) -> dict[str, object]:
    """Run one request on an idle launcher (a new one when all are busy)."""
    with _idle_lock:
        launcher = _idle.pop() if _idle else None
    if launcher is None:
        launcher = _Launcher()
    try:
        reply = launcher.call(request)
    except BaseException:
        launcher.close()
        raise
    with _idle_lock:
        _idle.append(launcher)
    return reply


def _serve() -> None:
    """The launcher's loop: one JSON request a line on stdin, one JSON reply a line on stdout."""
    ctypes.CDLL(None, use_errno=True)  # loaded once here, not in every child
    while line := sys.stdin.readline():
        request = json.loads(line)
        try:
            reply = _run(**request)
        except Exception as e:  # a setup failure is the caller's SandboxUnavailable
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _run(
    uid: int, program: str, limits: dict[str, int], python: str, dir: str
) -> dict[str, object]:
    """In the launcher: fork the sandboxed child, wait for it (the wall timeout), kill its uid."""
    bounds = Limits(**limits)
    failure_r, failure_w = os.pipe()  # close-on-exec: stays empty when the exec succeeds
    pid = os.fork()
    if pid == 0:
        try:
            os.close(failure_r)
            os.setsid()
            for fd, name in enumerate(STREAMS):
                flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                opened = os.open(os.path.join(dir, name), flags, 0o600)
                os.dup2(opened, fd)
                os.close(opened)
            _enter(uid, program.encode(), bounds)
            os.execve(python, [python, "-P", "-s", "-S", "main.py"], ENV)
        except BaseException as e:
            os.write(failure_w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(127)
    os.close(failure_w)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], bounds.wall_s)
    finally:
        os.close(pidfd)
    _kill_uid(uid)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(failure_r, "rb") as f:
        failure = f.read()
    if failure:
        return {"error": failure.decode(errors="replace")}
    return {"exit_code": os.waitstatus_to_exitcode(status), "timed_out": not ready}


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


def _kill_uid(uid: int, patience_s: float = 5.0) -> None:
    """Kill every process of the sandbox uid, the program's children included, and wait until
    none is left: SIGKILL is not instant (a process exits when it is next scheduled), so on a
    busy machine a child can still be running for a moment after the signal."""
    deadline = time.monotonic() + patience_s
    while True:
        _signal_uid(uid)
        if not _processes_of(uid) or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _processes_of(uid: int) -> list[int]:
    """Pids of the uid's processes that are not zombies (a zombie holds nothing but its pid)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # gone meanwhile
            continue
        owner = fields.get("Uid", "").split()[:1]  # real uid (the sandbox sets all alike)
        zombie = fields.get("State", "").strip().startswith("Z")
        if owner == [str(uid)] and not zombie:
            out.append(int(entry))
    return out


def _signal_uid(uid: int) -> None:
    """SIGKILL every process of the uid, from a helper that becomes the uid."""
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


if __name__ == "__main__" and sys.argv[1:] == ["--launcher"]:
    _serve()
