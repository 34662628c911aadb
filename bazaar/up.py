"""``bazaar up``: the whole loop on one machine — train, deploy, serve — watched live.

Builds the tiny model first if it is not cached (one model cache for every process), then starts
a coordinator, a gateway and N nodes on loopback, each a process with its own data directory
under ``<data dir>/local`` (the gateway shares the coordinator's, so both open one accounts
database). The gateway is admitted at the coordinator as ``local`` (a new secret each time,
handed to it in its environment), so the serving nodes answer it and nobody else. It creates
the demo researcher's API key once (kept in ``local/demo-key``, mode
0600), submits the demo run (``examples/arith-tiny.toml``, stopped after ``--rounds`` versions)
billed to it, and shows the run live: round, version, reward, tokens, nodes. When the run is
done it deploys the adapter, asks the gateway for a chat completion from the base model and
from the adapter, evaluates both on 200 held-out examples through the gateway (the table of
``bazaar eval --compare``; showcase and evaluation also go to ``local/demo-result.json``),
prints how to call it with curl and the ``openai`` client, and keeps serving until Ctrl+C (or
``--duration`` seconds after the start).

Ctrl+C at any point stops everything cleanly: every process gets SIGTERM, in order — nodes
(their goodbyes reach a live coordinator), the gateway (it gives its budget holds back), the
coordinator (it flushes its database) — and is waited for; only what has not stopped within the
grace period is killed. Every process runs in a session of its own, so the terminal's Ctrl+C
reaches this process alone and the order holds — and every process is tied to this one's life
(``protocol/service/parent.py``), so that if this one dies without stopping them (SIGKILL, or
Ctrl+C on ``bazaar up | tee log``, where ``tee`` goes first and output breaks), they stop too.
Output that breaks while stopping does not stop the stopping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from protocol.service.parent import child_env

REPO = Path(__file__).resolve().parent.parent
DEMO_SPEC = REPO / "examples" / "arith-tiny.toml"
DEMO_EVAL_N = 200
"""Examples ``bazaar up`` evaluates base and adapter on at the end of the demo."""
STATUS_COLORS = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
BARS = "▁▂▃▄▅▆▇█"


class Stop(Exception):
    """The network is to stop (Ctrl+C, SIGTERM, ``--duration``)."""


def node_layout(i: int, n: int) -> tuple[str, bool]:
    """Roles of node ``i`` of ``n``, and whether it serves the OpenAI API: one node does it all
    alone; otherwise a serving sampler-verifier, a trainer, a second sampler-verifier (each
    sampler's rollouts are audited by the other: no node checks its own work, and a run
    trains only on audited or trusted rollouts), then more of each."""
    if n == 1:
        return "inference,trainer,verifier", True
    if n == 2:
        return [("inference,verifier", True), ("trainer,verifier", False)][i]
    first = [("inference,verifier", True), ("trainer", False), ("inference,verifier", False)]
    more = [("inference", False), ("trainer", False), ("inference,verifier", False)]
    return first[i] if i < len(first) else more[(i - len(first)) % len(more)]


@dataclass
class LocalNetwork:
    root: Path
    console: Console
    deadline: float | None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def spawn(
        self, name: str, home: Path, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(env or {}), **child_env(), "BAZAAR_HOME": str(home),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        with open(self.logs / f"{name}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "bazaar", *args], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs.append((name, p))
        return p

    def wait(self, what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
        """Poll ``probe`` until it returns something truthy; fails if a process died."""
        end = time.monotonic() + timeout_s
        with self.console.status(what):
            while True:
                self.check()
                if got := probe():
                    return got
                if time.monotonic() > end:
                    raise RuntimeError(f"timed out: {what}; see the logs in {self.logs}")
                time.sleep(0.2)

    def start_coordinator(self, home: Path, extra: list[str]) -> tuple[str, str]:
        """A coordinator on loopback; its REST URL and multiaddr once it is up."""
        info_file = home / "coordinator.json"
        info_file.unlink(missing_ok=True)
        self.spawn("coordinator", home, [
            "coordinator", "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0",
            *extra,
        ])  # fmt: skip
        self.wait("starting the coordinator", info_file.exists, 60)
        info = json.loads(info_file.read_text())
        return str(info["http"]), str(info["multiaddrs"][0])

    def start_nodes(
        self, n: int, coordinator: str, cache: Path, serve: bool = True, preload: bool = True,
        model: str = "tiny",
    ) -> None:  # fmt: skip
        """``n`` nodes laid out by ``node_layout`` (the first one serving the OpenAI API, unless
        ``serve`` is off), each with its own data directory, sharing one model cache; samplers
        load their model (``--model``) at start unless ``preload`` is off."""
        for i in range(n):
            roles, serves = node_layout(i, n)
            self.spawn(f"node-{i}", self.root / f"node-{i}", [
                "node", "start", "--name", f"node-{i}", "--roles", roles,
                "--coordinator", coordinator, "--listen", "/ip4/127.0.0.1/tcp/0",
                f"--model_cache={cache}", f"--model={model}", "--torch_threads=1",
                f"--preload={preload}",
                *(["--serve"] if serve and serves else []),
            ])  # fmt: skip

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Stop
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}); see {self.logs}/{name}.log")

    def stop(self, interrupted: bool) -> bool:
        """Nodes first, so their goodbyes reach a coordinator still running; the gateway; then
        the coordinator. True if every process stopped by itself, cleanly. A second Ctrl+C
        (or a signal forwarded twice) must not cut this short and leave processes behind: the
        waits are bounded anyway."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.say("\nstopping the network" + (" (interrupted)" * interrupted))
        order = [[(n, p) for n, p in self.procs if n.startswith("node-")],
                 [(n, p) for n, p in self.procs if n == "gateway"],
                 [(n, p) for n, p in self.procs if n == "coordinator"]]  # fmt: skip
        for group in order:
            for _, p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for _, p in group:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        bad = {name: p.returncode for name, p in self.procs if p.returncode != 0}
        if bad:
            self.say(f"[yellow]stopped; unclean exits: {bad}")
        else:
            self.say(f"stopped {len(self.procs)} processes cleanly")
        return not bad

    def say(self, text: str) -> None:
        """Print, unless the output is gone (a pipe whose reader died on the same Ctrl+C)."""
        with contextlib.suppress(OSError):
            self.console.print(text)


def run_local_network(
    root: Path,
    nodes: int,
    rounds: int,
    duration_s: float | None,
    console: Console,
    spec_path: Path = DEMO_SPEC,
    model_cache: Path | None = None,
) -> int:
    root.mkdir(parents=True, exist_ok=True)
    net = LocalNetwork(root, console, None if duration_s is None else time.monotonic() + duration_s)
    net.logs.mkdir(exist_ok=True)
    # Ctrl+C and SIGTERM both mean "stop the network cleanly", however we were started (a
    # background job inherits SIGINT as ignored; Python would then never raise KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted, failed = False, False
    try:
        _demo(net, nodes, rounds, spec_path, model_cache or root)
    except KeyboardInterrupt:
        interrupted = True
    except BrokenPipeError:  # the output's reader went (``| tee`` on Ctrl+C): stop, quietly
        interrupted = True
    except Stop:
        pass
    except RuntimeError as e:
        console.print(f"[red]{e}", soft_wrap=True)
        failed = True
    finally:
        clean = net.stop(interrupted)
    return 1 if failed or not clean else 0


def _demo(net: LocalNetwork, n: int, rounds: int, spec_path: Path, cache: Path) -> None:
    console = net.console
    tiny = tiny_model(cache)
    coord_home = net.root / "coordinator"
    url, maddr = net.start_coordinator(
        coord_home, ["--leases.round_leases=1", f"--tokenizers.tiny={tiny}"]
    )
    gateway = f"http://127.0.0.1:{_free_port()}"
    net.spawn("gateway", coord_home, [
        "gateway", "start", "--coordinator-url", url, "--listen", gateway.removeprefix("http://"),
        f"--tokenizers.tiny={tiny}", "--refresh_s=1",
    ], env={"BAZAAR_GATEWAY_SECRET": _admit_gateway(coord_home)})  # fmt: skip
    net.start_nodes(n, maddr, cache)
    net.wait("starting the gateway", lambda: _answers(f"{gateway}/health"), 60)
    console.print(f"coordinator {url}   gateway {gateway}   logs {net.logs}", soft_wrap=True)
    key = _demo_key(net.root, coord_home)
    run_id = _submit(url, key, spec_path, rounds, audited=n > 1)
    console.print(f"run [bold]{run_id}[/] submitted ({spec_path.name}, {rounds} rounds)")
    run = _watch(net, url, run_id, n)
    if run["state"] != "completed":
        raise RuntimeError(f"run {run_id} ended {run['state']}: {run['stop_reason']}")
    _serve_demo(net, url, gateway, key, run_id, spec_path)
    hint = "serving; Ctrl+C stops the network"
    _follow(net, lambda: _nodes_view(url, n, hint))


def tiny_model(cache: Path) -> Path:
    """The tiny model's directory in the shared cache, built now (with progress) if missing."""
    from bazaar.output import build_tiny_model
    from node.model.tiny import META_FILE, TinySpec, tiny_model_dir

    target = tiny_model_dir(cache, TinySpec())
    return target if (target / META_FILE).exists() else build_tiny_model(target, TinySpec())


def _admit_gateway(coordinator_home: Path, name: str = "local") -> str:
    """Admit the local gateway at the coordinator (its database, as ``bazaar gateway admit
    --replace`` does): a new secret each time, the last one replaced."""
    from coordinator.db import default_url, open_database
    from coordinator.gateways import GatewayStore

    return GatewayStore(open_database(default_url(coordinator_home))).admit(name, replace=True)[0]


def _demo_key(root: Path, accounts_home: Path) -> str:
    """The demo researcher's key: made once, kept in ``demo-key`` (0600) for later runs."""
    from protocol.accounts import KeyStore, open_database

    store = KeyStore(open_database(f"sqlite:///{accounts_home / 'gateway.db'}"))
    path = root / "demo-key"
    if path.exists() and store.authenticate(path.read_text().strip()) is not None:
        return path.read_text().strip()
    taken = {k.name for k in store.all()}
    name = next(f"demo-{i}" for i in range(1, 10_000) if f"demo-{i}" not in taken)
    secret, _ = store.create(name, budget_tokens=50_000_000)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def _submit(url: str, key: str, spec_path: Path, rounds: int, audited: bool = True) -> str:
    """Submit the demo run; ``audited`` off (one node alone: no one else can audit its work)
    trains on rollouts whose token count the coordinator confirmed, audited or not."""
    import msgspec

    from protocol.runs import load_spec

    spec = load_spec(spec_path)
    spec = msgspec.structs.replace(spec, stop=msgspec.structs.replace(spec.stop, max_rounds=rounds))
    if not audited:
        checks = msgspec.structs.replace(spec.verification, trusted_only=False)
        spec = msgspec.structs.replace(spec, verification=checks)
    taken = {r["id"] for r in httpx.get(f"{url}/v1/runs", timeout=10).json()["data"]}
    name = next(f"{spec.name}{f'-{i}' if i > 1 else ''}" for i in range(1, 10_000)
                if f"{spec.name}{f'-{i}' if i > 1 else ''}" not in taken)  # fmt: skip
    body = {**spec.to_dict(), "name": name}
    resp = httpx.post(f"{url}/v1/runs", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    if resp.status_code >= 400:
        raise RuntimeError(f"the coordinator refused the demo run: {resp.text[:300]}")
    return str(resp.json()["id"])


def _watch(net: LocalNetwork, url: str, run_id: str, n: int) -> dict[str, Any]:
    """Show the run until it is no longer queued or running; its last view."""
    last: dict[str, Any] = {}

    def view() -> tuple[Group, str]:
        nonlocal last
        try:
            last = httpx.get(f"{url}/v1/runs/{run_id}", timeout=5).json()
            rewards = httpx.get(f"{url}/v1/runs/{run_id}/rewards", timeout=5).json()["data"]
        except httpx.HTTPError as e:
            return Group(Text(f"coordinator not answering: {e}", style="red")), "coordinator down"
        table, summary = _run_view(last, rewards)
        nodes, node_summary = _nodes_view(url, n, "Ctrl+C stops the network")
        return Group(table, nodes), f"{summary}; {node_summary}"

    _follow(net, view, until=lambda: last.get("state") not in (None, "queued", "running"))
    return last


def _run_view(run: dict[str, Any], rewards: list[dict[str, Any]]) -> tuple[Table, str]:
    rounds = run.get("max_rounds")
    version = run["policy_version"]
    curve = [r["mean"] for r in rewards]
    reward = (f"{curve[0]:.3f} at v{rewards[0]['version']} → {curve[-1]:.3f} at "
              f"v{rewards[-1]['version']}") if curve else "—"  # fmt: skip
    spark = "".join(BARS[min(int(v * len(BARS)), len(BARS) - 1)] for v in curve[-40:])
    rows = [
        ("state", f"{run['state']} {run['stop_reason']}".strip()),
        ("round / version", f"{version}" + (f" of {rounds}" if rounds else "")),
        ("reward (trained completions)", f"{reward}  {spark}"),
        ("tokens sampled", f"{run['completion_tokens']:,}"),
        ("tokens trained", f"{run['tokens_trained']:,}"),
        ("tokens billed", f"{run['billed_tokens']:,} to key {run['owner']!r}"),
    ]
    table = Table(title=f"run {run['id']}: {run['env']} on {run['base_model']}", show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    summary = (f"run {run['id']} {run['state']} v{version}: reward {reward}, "
               f"{run['completion_tokens']:,} tokens sampled, {run['tokens_trained']:,} trained, "
               f"{run['billed_tokens']:,} billed")  # fmt: skip
    return table, summary


def _nodes_view(url: str, expected: int, hint: str) -> tuple[Group, str]:
    """The nodes table, and a one-line summary of it."""
    try:
        data = httpx.get(f"{url}/v1/network/nodes", timeout=5).json()["data"]
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
            n["name"], f"{n['peer_id'][:12]}…", ",".join(n["roles"]),
            f"[{STATUS_COLORS.get(n['status'], 'white')}]{n['status']}[/]",
            f"{n['last_seen_ago_s']:.1f}s ago", str(n["heartbeats"]),
        )  # fmt: skip
    return Group(table), summary


def _follow(
    net: LocalNetwork,
    view: Callable[[], tuple[Group, str]],
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Show ``view`` live on a terminal, or print its summary line whenever it changes (a log
    file, CI), until ``until()``; raises ``Stop`` at the deadline."""
    if net.console.is_terminal:
        with Live(console=net.console, refresh_per_second=2) as live:
            while not until():
                net.check()
                live.update(view()[0])
                time.sleep(0.5)
        return
    last = ""
    while not until():
        net.check()
        summary = view()[1]
        if summary != last:
            net.console.print(summary, soft_wrap=True, highlight=False)
            last = summary
        time.sleep(0.5)


def _serve_demo(
    net: LocalNetwork, url: str, gateway: str, key: str, run_id: str, spec_path: Path
) -> None:
    """Deploy the run's adapter, wait for the gateway to route it, answer one example with the
    base model and with the adapter, and print how to call it."""
    import openai

    from envs import load_environment
    from protocol.runs import load_spec

    resp = httpx.post(f"{url}/v1/runs/{run_id}/deploy", json={}, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    if resp.status_code >= 400:
        raise RuntimeError(f"deploy refused: {resp.text[:300]}")
    version = resp.json()["deployed"]
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=2)
    net.wait(f"the gateway to route model {run_id} (v{version})",
             lambda: run_id in [m.id for m in client.models.list().data], 120)  # fmt: skip
    spec = load_spec(spec_path)
    env = load_environment(spec.env.name, **spec.env.args)
    example = env.example(7, 0)
    question = str(example.prompt[-1]["content"])
    net.console.print(f"\n[bold]deployed {run_id} v{version}[/]; asking the gateway: "
                      f"{question!r} (answer {example.answer!r})", soft_wrap=True)  # fmt: skip
    showcase: dict[str, Any] = {"question": question, "answer": example.answer}
    for model in (spec.base_model, run_id):
        done = client.chat.completions.create(
            model=model, messages=example.prompt,  # type: ignore[arg-type]
            max_tokens=spec.rl.max_tokens, temperature=0,
        )  # fmt: skip
        text = done.choices[0].message.content or ""
        reward = env.score(example, text).reward
        showcase[model] = {"text": text, "reward": reward}
        net.console.print(f"  chat completion from {model}: {text!r} (reward {reward:.2f})",
                          soft_wrap=True, highlight=False)  # fmt: skip
    evaluated = _compare(net, client, spec, run_id)
    result = {"run": run_id, "version": version, "showcase": showcase, "eval": evaluated}
    (net.root / "demo-result.json").write_text(json.dumps(result, indent=2) + "\n")
    key_file = net.root / "demo-key"
    body = json.dumps({"model": run_id, "messages": [{"role": "user", "content": question}],
                       "max_tokens": spec.rl.max_tokens})  # fmt: skip
    net.console.print(f"""
Call it yourself (the demo key is in {key_file}):

  curl {gateway}/v1/chat/completions \\
    -H "Authorization: Bearer $(cat {key_file})" -H "Content-Type: application/json" \\
    -d '{body}'

  from openai import OpenAI
  client = OpenAI(base_url="{gateway}/v1", api_key=open("{key_file}").read().strip())
  print(client.chat.completions.create(model="{run_id}", max_tokens={spec.rl.max_tokens},
        messages=[{{"role": "user", "content": {question!r}}}]).choices[0].message.content)

  BAZAAR_API_KEY=$(cat {key_file}) bazaar eval --gateway-url {gateway} --env {spec.env.name} \\
    --env-args '{json.dumps(spec.env.args)}' --model {run_id} --compare -n 200 \\
    --max-tokens {spec.rl.max_tokens}
  bazaar ledger --coordinator-url {url}
""", soft_wrap=True, highlight=False, markup=False)  # fmt: skip


def _compare(net: LocalNetwork, client: Any, spec: Any, run_id: str) -> dict[str, Any]:
    """``bazaar eval --compare`` on the deployed adapter: the base model and the adapter answer
    the same held-out examples with the same seeds, through the gateway, and the table shows
    what the run bought with its 95 % interval. Returns each model's mean and interval."""
    from bazaar.evaluate import evaluate_models, table

    results = evaluate_models(client, net.console, spec.env.name, spec.env.args,
                              [spec.base_model, run_id], DEMO_EVAL_N,
                              max_tokens=spec.rl.max_tokens)  # fmt: skip
    title = f"{spec.env.name} {json.dumps(spec.env.args)}: {DEMO_EVAL_N} held-out examples"
    net.console.print(table(results, title))
    return {m: {"n": r.avg.n, "mean": r.avg.mean, "ci95": r.avg.ci95} for m, r in results.items()}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).is_success
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    """A loopback port free now (the gateway binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
