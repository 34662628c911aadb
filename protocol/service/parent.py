"""Processes that die with the process that started them, however it dies.

``bazaar up`` starts each of its processes (coordinator, gateway, nodes) in a session of its
own, so that the terminal's Ctrl+C reaches ``bazaar up`` alone and it can stop them in order.
The cost: if ``bazaar up`` itself dies without stopping them (SIGKILL, a crash, or a broken
pipe when ``| tee`` goes first on Ctrl+C), nothing else would. So each is started with
``BAZAAR_PARENT_PID`` set, and ``die_with_parent`` (run first by every ``bazaar`` process)
watches that parent; helper processes (a node's model worker, the hivemind processes) call
``die_with`` with their starter's pid. Once the parent is gone the process gets SIGTERM and
stops as cleanly as on any SIGTERM.

A daemon thread polls ``os.getppid()`` (twice a second) rather than asking the kernel
(``prctl(PR_SET_PDEATHSIG)``), because the kernel's signal fires when the *thread* that started
the process ends, and nodes start their helpers from trio's worker threads, which end when idle.
No library offers this (``psutil`` observes processes; it cannot tie one's life to another's).
"""

from __future__ import annotations

import os
import signal
import threading
import time

PARENT_ENV = "BAZAAR_PARENT_PID"


def child_env() -> dict[str, str]:
    """What to add to a child's environment so that it dies with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> bool:
    """Watch the parent named in ``BAZAAR_PARENT_PID`` (``die_with``); True if one was named.
    The variable is removed, so this process's own children do not take it for theirs."""
    wanted = os.environ.pop(PARENT_ENV, "")
    if not wanted.isdigit():
        return False
    die_with(int(wanted))
    return True


def die_with(parent: int, every_s: float = 0.5) -> None:
    """SIGTERM for this process within ``every_s`` of ``parent`` (the pid of the process that
    started it) no longer being its parent (it died, and this process was handed to another);
    at once if it already is not."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
