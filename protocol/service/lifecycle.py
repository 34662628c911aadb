"""Process lifecycle on trio: run until SIGINT/SIGTERM, then shut down within a bound.

``run_until_signal(main)`` runs ``main(stop)`` and sets ``stop`` on the first signal; ``main`` is
expected to wind down (say goodbye, flush state) and return. If it has not returned within
``grace_s``, or a second signal arrives, it is cancelled. The exit code is ``main``'s return.
``exit_now`` then ends the process without the interpreter's slow teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import trio

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseException)


def find_exception(exc: BaseException, cls: type[E]) -> E | None:
    """``exc`` itself or the first ``cls`` inside (nested) exception groups, else None."""
    if isinstance(exc, cls):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, cls)
            if found is not None:
                return found
    return None


def run_until_signal(main: Callable[[trio.Event], Awaitable[int]], grace_s: float = 8.0) -> int:
    async def root() -> int:
        stop = trio.Event()
        code = 0
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        if stop.is_set():
                            log.warning("second signal: stopping now")
                            nursery.cancel_scope.cancel()
                            return
                        log.info("%s received: shutting down", signal.Signals(signum).name)
                        stop.set()
                        nursery.cancel_scope.deadline = trio.current_time() + grace_s

            nursery.start_soon(watch_signals)
            code = await main(stop)
            nursery.cancel_scope.cancel()
        return code

    return trio.run(root)


def exit_now(code: int) -> NoReturn:
    """End a service process that has shut down: the exit handlers run (children joined, logs
    flushed), then the process ends without the interpreter's teardown of every module and
    object. That teardown (mostly garbage collection over what torch, transformers and
    py-libp2p made) took 1–3 s of every stopping node and coordinator, more on a busy machine:
    time a restart, a test's teardown or ``bazaar up``'s Ctrl+C waited for nothing."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
