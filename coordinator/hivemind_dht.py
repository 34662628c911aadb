"""The coordinator's hivemind DHT bootstrap peer, in a child process of its own.

Trainers find each other for all-reduce through a hivemind DHT; the coordinator runs its first
peer so every trainer has a place to join (``initial_peers``). hivemind cannot share a process
with py-libp2p, so it lives in a child started fresh ("spawn"; the start method set back to
"fork" inside, as hivemind expects), leading a process group with hivemind's own daemon. The
child reports the DHT's multiaddrs over a pipe and stays until the pipe closes — when the
coordinator stops, or dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from typing import Any


class DhtBootstrap:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.addrs: list[str] = []
        self._conn: Any = None
        self._proc: Any = None
        self._lock = threading.Lock()  # start() runs in a thread; close() may come meanwhile
        self._closed = False

    def start(self, timeout_s: float = 60.0) -> list[str]:
        """Start the DHT peer; its multiaddrs (``RuntimeError`` if it cannot start, or if
        ``close`` came while it was starting: that kills the child, and this returns)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        with self._lock:
            if self._closed:
                raise RuntimeError("the hivemind DHT is closed")
            proc = self._proc = ctx.Process(
                target=_serve, args=(child, self.host, self.port, os.getpid()), daemon=False
            )
            proc.start()
        child.close()
        try:
            ready = parent.poll(timeout_s)
            status, value = parent.recv() if ready else ("error", "it did not start in time")
        except (EOFError, OSError):  # killed by close(), or it died
            status, value = "error", "it ended while starting"
        with self._lock:
            if status == "ok" and not self._closed:
                self._conn, self.addrs = parent, list(value)
                return self.addrs
            if self._proc is proc:
                self._proc = None
        parent.close()
        _stop(proc, started=False)
        raise RuntimeError(f"the hivemind DHT failed to start: {value}")

    def close(self) -> None:
        """Stop the DHT peer: a started one gets a second to shut down (it holds nothing worth
        more); one still starting (hivemind's start takes seconds and watches no pipe) is killed
        at once. Python's exit would otherwise wait for it."""
        with self._lock:
            self._closed = True
            conn, proc, started = self._conn, self._proc, bool(self.addrs)
            self._conn = self._proc = None
        if conn is not None:
            conn.close()
        if proc is not None:
            _stop(proc, started)


def _stop(proc: Any, started: bool) -> None:
    proc.join(timeout=1 if started else 0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # hivemind's daemon with it
    proc.kill()  # one still starting may not lead its group yet
    proc.join(timeout=5)


def _serve(conn: Any, host: str, port: int, coordinator: int) -> None:
    from protocol.service.parent import die_with  # stdlib only: no py-libp2p here

    die_with(coordinator)
    os.setpgrp()
    multiprocessing.set_start_method("fork", force=True)
    import hivemind

    try:
        dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{host}/tcp/{port}"])
        conn.send(("ok", [str(a) for a in dht.get_visible_maddrs()]))
    except Exception as e:  # reported to the coordinator, which logs it and runs without
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.recv()  # nothing is ever sent: this returns (EOFError) when the coordinator goes
    except (EOFError, OSError):
        pass
    finally:
        dht.shutdown()
