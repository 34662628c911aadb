"""A local network of real processes for integration tests: one coordinator, N nodes.

Every process is ``python -m bazaar ...`` with its own ``BAZAAR_HOME`` (its own identity), logging
to a file in the test's temp directory, on loopback ports the OS picks. A gateway is admitted
at the coordinator (``admit_gateway``, as ``bazaar gateway admit`` does) and started with its
secret in ``gateway_env``; ``routes`` reads the serving nodes as an admitted gateway does, each
with the serving token that opens it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coordinator.db import default_url
from coordinator.db import open_database as open_coordinator_db
from coordinator.gateways import GatewayStore
from protocol.accounts import ApiKey, KeyStore, open_database
from tests.conftest import REPO
from tests.wait import wait_until


@dataclass
class Proc:
    name: str
    home: Path
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout_s: float = 15.0) -> int:
        return self.popen.wait(timeout=timeout_s)


class Cluster:
    def __init__(
        self, root: Path, interval_s: float = 1.0, dead_after: float = 3.0, sessions: bool = False
    ) -> None:
        self.root = root
        self.sessions = sessions
        """Each process in a session of its own: a terminal's Ctrl+C then reaches the caller
        alone (a benchmark), which stops them (``stop_all``)."""
        self.interval_s = interval_s
        self.dead_after = dead_after
        self.procs: list[Proc] = []
        self.coordinator: Proc | None = None
        self.coordinator_home = root / "coordinator"
        self.libp2p_port = 0
        self.http_port = 0
        self.api_key = ""
        """A researcher's key in the coordinator's accounts database (``api`` sends it)."""
        self.db_url = ""
        """The coordinator's ``--db``, if one was given."""
        self.gateway_secrets: dict[str, str] = {}

    # -- processes ----------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        home: Path,
        args: list[str],
        ns: str | None = None,
        module: str = "bazaar",
        env: dict[str, str] | None = None,
    ) -> Proc:
        """``python -m <module> <args>``; ``module`` is the CLI or a test's variant of it."""
        home.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        cmd = [sys.executable, "-m", module, *args]
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        env = {**os.environ, **(env or {}), "BAZAAR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=self.sessions)  # fmt: skip
        proc = Proc(name, home, args, log, popen)
        self.procs.append(proc)
        return proc

    def start_coordinator(
        self, listen_host: str = "127.0.0.1", ns: str | None = None, extra: list[str] | None = None
    ) -> Proc:
        info = self.coordinator_home / "coordinator.json"
        info.unlink(missing_ok=True)
        extra = extra or []
        self.db_url = _flag(extra, "--db")
        if not self.api_key:
            self.api_key, _ = self.create_key("researcher")
        args = [
            "coordinator",
            "start",
            "--listen",
            f"/ip4/{listen_host}/tcp/{self.libp2p_port}",
            "--http",
            f"{listen_host}:{self.http_port}",
            f"--membership.heartbeat_interval_s={self.interval_s}",
            f"--membership.dead_after_missed={self.dead_after}",
            *extra,
        ]
        self.coordinator = self.spawn("coordinator", self.coordinator_home, args, ns)
        wait_until(info.exists, 60, what="coordinator.json")
        data = json.loads(info.read_text())
        # keep the ports, so a restart comes back where the nodes look for it
        self.libp2p_port = int(data["multiaddrs"][0].split("/tcp/")[1].split("/")[0])
        self.http_port = int(data["http"].rsplit(":", 1)[1])
        self.multiaddr = data["multiaddrs"][0]
        self.url = data["http"]
        self.peer_id = data["peer_id"]
        return self.coordinator

    def start_node(
        self,
        name: str,
        home: Path | None = None,
        roles: str = "inference",
        extra: list[str] | None = None,
        coordinator: str | None = None,
        ns: str | None = None,
        module: str = "bazaar",
        env: dict[str, str] | None = None,
    ) -> Proc:
        args = [
            "node",
            "start",
            "--name",
            name,
            "--roles",
            roles,
            "--coordinator",
            coordinator or self.multiaddr,
            "--listen",
            "/ip4/0.0.0.0/tcp/0" if ns else "/ip4/127.0.0.1/tcp/0",
            *(extra or []),
        ]
        return self.spawn(name, home or self.root / f"home-{name}", args, ns, module, env)

    def stop_all(self) -> None:
        # the coordinator last: the others' goodbyes are answered (stopping at once, it
        # answered none, and each node waited out its goodbye's timeout)
        rest = [p for p in self.procs if p is not self.coordinator]
        for wave in (rest, [p for p in self.procs if p is self.coordinator]):
            for p in wave:
                if p.alive():
                    p.signal(signal.SIGTERM)
            for p in wave:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.wait(5)

    # -- observing ----------------------------------------------------------------------------

    def accounts(self) -> KeyStore:
        """The accounts database the coordinator bills runs to (its home's ``gateway.db``)."""
        self.coordinator_home.mkdir(parents=True, exist_ok=True)
        return KeyStore(open_database(f"sqlite:///{self.coordinator_home / 'gateway.db'}"))

    def create_key(self, name: str, budget_tokens: int | None = None) -> tuple[str, ApiKey]:
        return self.accounts().create(name, budget_tokens)

    def gateways(self) -> GatewayStore:
        """The coordinator's admitted gateways, in its database (``bazaar gateway ...``)."""
        self.coordinator_home.mkdir(parents=True, exist_ok=True)
        url = self.db_url or default_url(self.coordinator_home)
        return GatewayStore(open_coordinator_db(url))

    def admit_gateway(self, name: str = "gateway") -> str:
        """A gateway's secret, admitted at the coordinator on first ask."""
        if name not in self.gateway_secrets:
            self.gateway_secrets[name] = self.gateways().admit(name)[0]
        return self.gateway_secrets[name]

    def start_gateway(self, extra: list[str] | None = None) -> tuple[Proc, str, str]:
        """A gateway admitted as ``gateway``, with a database of its own: ``(process, URL,
        API key)`` (a key made in that database for the caller)."""
        from tests.conftest import free_port

        db = f"sqlite:///{self.root / 'gateway.db'}"
        port = free_port()
        proc = self.spawn("gateway", self.root / "gw-home", [
            "gateway", "start", "--coordinator-url", self.url, "--listen", f"127.0.0.1:{port}",
            "--db", db, "--refresh_s=0.5", *(extra or []),
        ], env=self.gateway_env())  # fmt: skip
        key, _ = KeyStore(open_database(db)).create("app")
        return proc, f"http://127.0.0.1:{port}", key

    def gateway_env(self, name: str = "gateway") -> dict[str, str]:
        """What a gateway process needs to be admitted: its secret in the environment."""
        return {"BAZAAR_GATEWAY_SECRET": self.admit_gateway(name)}

    def routes(self, secret: str | None = None) -> dict[str, dict[str, Any]]:
        """Serving routes by node name (URL, models, serving token), as an admitted gateway
        reads them (with ``secret``, default: the gateway named ``gateway``)."""
        headers = {"Authorization": f"Bearer {secret or self.admit_gateway()}"}
        resp = httpx.get(f"{self.url}/v1/network/routes", timeout=5, headers=headers)
        resp.raise_for_status()
        return {r["name"]: r for r in resp.json()["data"]}

    def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        """A call to the coordinator's REST API with a researcher's key (``api_key`` unless
        given); the decoded JSON (errors raise)."""
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        resp = httpx.request(method, f"{self.url}{path}", timeout=10, headers=headers, **kwargs)
        resp.raise_for_status()
        return resp.json()

    def wait_run(
        self, run_id: str, state: str = "completed", timeout_s: float = 120, every_s: float = 0.1
    ) -> Any:
        def probe() -> Any:
            run = self.api("GET", f"/v1/runs/{run_id}")
            return run if run["state"] == state else None

        return wait_until(probe, timeout_s, every_s, what=f"run {run_id} {state}")

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Nodes by name, from the coordinator's REST API."""
        resp = httpx.get(f"{self.url}/v1/network/nodes", timeout=5)
        resp.raise_for_status()
        return {n["name"]: n for n in resp.json()["data"]}

    def statuses(self) -> dict[str, str]:
        return {name: n["status"] for name, n in self.nodes().items()}

    def wait_status(self, expect: dict[str, str], timeout_s: float = 60) -> dict[str, str]:
        def probe() -> dict[str, str] | None:
            got = self.statuses()
            return got if all(got.get(k) == v for k, v in expect.items()) else None

        return wait_until(probe, timeout_s, what=f"statuses {expect}")

    def metric_lines(self, name: str, url: str | None = None) -> dict[str, float]:
        """Every sample of a Prometheus metric, by its name with labels."""
        text = httpx.get(f"{url or self.url}/metrics", timeout=5).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        }

    def metric(self, name: str, labels: str = "", url: str | None = None) -> float:
        """One sample of a Prometheus metric (0 when absent), e.g. metric("x_total", 'a="b"')."""
        text = httpx.get(f"{url or self.url}/metrics", timeout=5).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def _flag(args: list[str], name: str) -> str:
    """The value of ``name`` in ``args`` (``--db URL`` or ``--db=URL``), or empty."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""
