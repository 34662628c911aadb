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

PARENT_ENV = "BAZAAR_PARENT_PID"
PR_SET_PDEATHSIG = 1

log = logging.getLogger(__name__)


def child_env() -> dict[str, str]:
    """What to add to a child's environment so that it dies with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> bool:
    """Arrange SIGTERM for this process when the parent named in ``BAZAAR_PARENT_PID`` dies;
    True if arranged. The variable is removed, so this process's own children do not take it
    for theirs."""
    wanted = os.environ.pop(PARENT_ENV, "")
    return wanted.isdigit() and die_with(int(wanted))


def die_with(parent: int) -> bool:
    """SIGTERM for this process when ``parent`` (the pid of the process that started it) dies;
    True if arranged. Helper processes (a node's model worker, the hivemind processes) call it
    first thing with the pid their starter gave them: a node killed outright takes them along."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to die with the parent: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent:  # the parent died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)
    return True
