"""Processes that die with the process that started them, however it dies.

``bazaar up`` starts each of its processes (coordinator, gateway, nodes) in a session of its
own, so that the terminal's Ctrl+C reaches ``bazaar up`` alone and it can stop them in order.
The cost: if ``bazaar up`` itself dies without stopping them (SIGKILL, a crash, or a broken
pipe when ``| tee`` goes first on Ctrl+C), nothing else would. So each is started with
``BAZAAR_PARENT_PID`` set, and ``die_with_parent`` (run first by every ``bazaar`` process) asks
the kernel for SIGTERM when that parent goes (Linux ``prctl(PR_SET_PDEATHSIG)``): the process
then stops as cleanly as on any SIGTERM. A parent that is already gone when it asks (the race
between ``fork`` and the request) is checked for, and treated the same.

No library offers this (``psutil`` observes processes; it cannot tie one's life to another's);
it is one system call, through ``ctypes``. Other systems than Linux keep the old behaviour.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

PARENT_ENV = "BAZAAR_PARENT_PID"
PR_SET_PDEATHSIG = 1

log = logging.getLogger(__name__)


def child_env() -> dict[str, str]:
    """What to add to a child's environment so that it dies with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> bool:
    """Arrange SIGTERM for this process when the parent named in ``BAZAAR_PARENT_PID`` dies;
    True if arranged. The kernel's ``PR_SET_PDEATHSIG`` fires when the *thread* that started
    this process ends, so only a starter that spawns from its main thread (``bazaar up`` does)
    may set the variable. It is removed, so this process's own children do not take it."""
    wanted = os.environ.pop(PARENT_ENV, "")
    if not wanted.isdigit() or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to die with the parent: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != int(wanted):  # the parent died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def die_with(parent: int, every_s: float = 0.5) -> None:
    """SIGTERM for this process within ``every_s`` of ``parent`` (the pid of the process that
    started it) no longer being its parent. Helper processes (a node's model worker, the
    hivemind processes) call it first thing: a node killed outright takes them along. Polled by
    a daemon thread rather than asked of the kernel, because helpers are started from worker
    threads, whose end would fire ``PR_SET_PDEATHSIG`` while the parent lives on."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
