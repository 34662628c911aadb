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
from typing import Any


class DhtBootstrap:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.addrs: list[str] = []
        self._conn: Any = None
        self._proc: Any = None

    def start(self, timeout_s: float = 60.0) -> list[str]:
        """Start the DHT peer; its multiaddrs (``RuntimeError`` if it cannot start)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child, self.host, self.port, os.getpid()), daemon=False
        )
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout_s):
            self.close()
            raise RuntimeError("the hivemind DHT did not start in time")
        status, value = parent.recv()
        if status != "ok":
            self.close()
            raise RuntimeError(f"the hivemind DHT failed to start: {value}")
        self.addrs = list(value)
        return self.addrs

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # hivemind's daemon with it
            self._proc = None


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
