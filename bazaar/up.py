"""``bazaar up``: a whole local network on this machine, watched live, stopped by Ctrl+C.

Starts a coordinator and N node processes on loopback, each with its own data directory (its own
identity) under ``<data dir>/local`` and one shared model cache (the tiny model is built once),
shows the network as a live table, and on Ctrl+C (or after ``--duration``) sends every process
SIGTERM — nodes say goodbye, the coordinator flushes its database — and waits for all of them,
killing only what does not stop within the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STATUS_COLORS = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def run_local_network(root: Path, nodes: int, duration_s: float | None, console: Console) -> int:
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, home: Path, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "BAZAAR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        with open(logs / f"{name}.log", "ab") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "bazaar", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl+C reaches us only; we stop them in order
            )
        procs.append((name, p))
        return p

    # Ctrl+C and SIGTERM both mean "stop the network cleanly", however we were started (a
    # background job inherits SIGINT as ignored; Python would then never raise KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    coord_home = root / "coordinator"
    info_file = coord_home / "coordinator.json"
    info_file.unlink(missing_ok=True)
    stopping = False
    try:
        coordinator = spawn(
            "coordinator",
            coord_home,
            ["coordinator", "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0"],
        )
        with console.status("starting the coordinator"):
            deadline = time.monotonic() + 60
            while not info_file.exists():
                if coordinator.poll() is not None or time.monotonic() > deadline:
                    console.print(f"[red]the coordinator did not start; see {logs}/coordinator.log")
                    return 1
                time.sleep(0.1)
        info = json.loads(info_file.read_text())
        console.print(f"coordinator {info['peer_id']}", soft_wrap=True)
        console.print(f"  libp2p {info['multiaddrs'][0]}", soft_wrap=True)
        console.print(f"  REST   {info['http']}   logs: {logs}", soft_wrap=True)
        for i in range(nodes):
            roles = ["inference", "inference,verifier", "trainer"][i % 3]
            spawn(
                f"node-{i}",
                root / f"node-{i}",
                ["node", "start", "--name", f"node-{i}", "--roles", roles,
                 "--coordinator", info["multiaddrs"][0], "--listen", "/ip4/127.0.0.1/tcp/0",
                 f"--model_cache={root}"],
            )  # fmt: skip
        started = time.monotonic()
        hint = "Ctrl+C stops the network" if duration_s is None else f"running {duration_s:.0f}s"
        if console.is_terminal:
            with Live(console=console, refresh_per_second=2) as live:
                while duration_s is None or time.monotonic() - started < duration_s:
                    live.update(_view(info["http"], nodes, hint)[0])
                    time.sleep(0.5)
        else:  # a log file or CI: one line each time the network changes
            last = ""
            while duration_s is None or time.monotonic() - started < duration_s:
                summary = _view(info["http"], nodes, hint)[1]
                if summary != last:
                    console.print(summary, soft_wrap=True)
                    last = summary
                time.sleep(0.5)
    except KeyboardInterrupt:
        stopping = True
    finally:
        _stop(procs, console, interrupted=stopping)
    return 0


def _view(url: str, expected: int, hint: str) -> tuple[Group, str]:
    """The live table, and a one-line summary of it."""
    try:
        data = httpx.get(f"{url}/v1/network/nodes", timeout=2).json()["data"]
    except httpx.HTTPError as e:
        return Group(Text(f"coordinator not answering: {e}", style="red")), "coordinator down"
    alive = sum(n["status"] == "alive" for n in data)
    summary = f"{alive}/{expected} nodes alive: " + ", ".join(
        f"{n['name']} {n['status']}" for n in data
    )
    table = Table(title=f"{alive}/{expected} nodes alive  ({hint})")
    for col in ("name", "peer id", "roles", "status", "last seen", "heartbeats"):
        table.add_column(col)
    for n in data:
        table.add_row(
            n["name"],
            f"{n['peer_id'][:12]}…",
            ",".join(n["roles"]),
            f"[{STATUS_COLORS.get(n['status'], 'white')}]{n['status']}[/]",
            f"{n['last_seen_ago_s']:.1f}s ago",
            str(n["heartbeats"]),
        )
    return Group(table), summary


def _stop(
    procs: list[tuple[str, subprocess.Popen[bytes]]], console: Console, interrupted: bool
) -> None:
    """Nodes first, so their goodbyes reach a coordinator still running; then the coordinator."""
    console.print()
    nodes = [(n, p) for n, p in procs if n != "coordinator"]
    coordinator = [(n, p) for n, p in procs if n == "coordinator"]
    with console.status("stopping the network" + (" (interrupted)" if interrupted else "")):
        for group in (nodes, coordinator):
            for _, p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for _, p in group:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
    bad = {name: p.returncode for name, p in procs if p.returncode != 0}
    if bad:
        console.print(f"[yellow]stopped; unclean exits: {bad}")
    else:
        console.print(f"stopped {len(procs)} processes cleanly")
