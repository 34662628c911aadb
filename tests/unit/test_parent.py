"""Processes tied to their starter's life (``protocol/service/parent.py``): killed outright,
the starter takes them along; a starter already gone when the child asks is noticed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil

from tests.conftest import REPO

STARTER = textwrap.dedent("""
    import os, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from protocol.service.parent import die_with_parent; "
        "print(die_with_parent(), flush=True); time.sleep(60)"
    )], env={**os.environ, "BAZAAR_PARENT_PID": str(os.getpid())}, stdout=sys.stdout)
    print(child.pid, flush=True)
    child.wait()
""")


def test_a_child_dies_with_a_starter_killed_outright() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=REPO, text=True,
                               stdout=subprocess.PIPE)  # fmt: skip
    assert starter.stdout is not None
    lines = {starter.stdout.readline().strip() for _ in range(2)}
    assert "True" in lines, lines  # the child asked, and the kernel agreed
    (pid,) = (int(x) for x in lines if x.isdigit())
    child = psutil.Process(pid)
    starter.kill()
    starter.wait(10)
    _, alive = psutil.wait_procs([child], timeout=10)
    assert not alive


def test_a_child_whose_starter_is_already_gone_stops() -> None:
    """The pid it was given is not its parent's: the starter died before it could ask."""
    code = "from protocol.service.parent import die_with; import time; die_with(1); time.sleep(60)"
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=30)
    assert child.returncode == -15


HELPER_STARTER = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    def start():  # from a thread that ends at once, as trio's worker threads do
        child = subprocess.Popen([sys.executable, "-c", (
            "import time; from protocol.service.parent import die_with; "
            f"die_with({os.getpid()}, every_s=0.05); print('ready', flush=True); time.sleep(60)"
        )], stdout=sys.stdout)
        print(child.pid, flush=True)
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    time.sleep(60)
""")


def test_a_helper_started_from_a_thread_lives_while_its_starter_does() -> None:
    """A helper outlives the thread that started it (trio runs blocking starts in worker
    threads that end when idle), and dies with the process."""
    starter = subprocess.Popen([sys.executable, "-c", HELPER_STARTER], cwd=REPO, text=True,
                               stdout=subprocess.PIPE)  # fmt: skip
    assert starter.stdout is not None
    lines = {starter.stdout.readline().strip() for _ in range(2)}
    (pid,) = (int(x) for x in lines if x.isdigit())
    helper = psutil.Process(pid)
    _, alive = psutil.wait_procs([helper], timeout=1.0)  # 20 polls after its thread ended
    assert alive == [helper]
    starter.kill()
    starter.wait(10)
    _, alive = psutil.wait_procs([helper], timeout=10)
    assert not alive
