"""Waiting on conditions with a deadline: the one place tests poll.

Some states can only be observed by asking (a process's HTTP API, another process's files), so
these helpers re-check a condition at a short interval until it holds or the deadline passes, and
then fail with the last value seen. Nothing else in the tests sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T], timeout_s: float = 30.0, every_s: float = 0.05, what: str = ""
) -> T:
    """Call ``probe`` until it returns something truthy; return that. AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as e:  # a server still starting refuses connections
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: last {last!r}")
        time.sleep(every_s)


async def await_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not cond():
            await trio.sleep(0.02)
