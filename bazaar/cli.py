"""``bazaar`` command groups. Each command parses its options, imports what it needs, runs.

Errors a user can fix (a bad config, an unusable key file) print one clear line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bazaar import __version__

app = typer.Typer(
    help="Bazaar: reinforcement-learning post-training on a peer-to-peer GPU network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
identity_app = typer.Typer(help="This machine's node identity (Ed25519 key and peer id).")
coordinator_app = typer.Typer(help="Run the coordinator: membership, REST API, database.")
node_app = typer.Typer(help="Run a node that contributes compute to the network.")
network_app = typer.Typer(help="Inspect the network.")
model_app = typer.Typer(help="Base models: build the tiny model that tests and demos use.")
keys_app = typer.Typer(help="The gateway's API keys: budgets in tokens and rate limits.")
gateway_app = typer.Typer(help="Run the OpenAI-compatible gateway: keys, metering, routing.")
run_app = typer.Typer(help="Researchers' runs: submit a spec, watch, cancel.")
app.add_typer(identity_app, name="identity")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(node_app, name="node")
app.add_typer(network_app, name="network")
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(gateway_app, name="gateway")
app.add_typer(run_app, name="run")

DbOpt = Annotated[
    str | None, typer.Option("--db", help="Database URL (default: SQLite in the data dir).")
]
# Commands with a config take any field as a dotted override: --membership.dead_after_missed=4
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file; flags and --a.b=value override it."),
]

console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        console.print(f"bazaar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    pass


@identity_app.command("show")
def identity_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print this node's peer id, creating the key on first use."""
    from protocol.config import data_dir
    from protocol.errors import IdentityError
    from protocol.identity import KEY_FILE_NAME, load_or_create_identity

    path = data_dir() / KEY_FILE_NAME
    try:
        ident, created = load_or_create_identity(path)
    except IdentityError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps({"peer_id": ident.peer_id, "key_file": str(path), "created": created}))
        return
    if created:
        console.print(f"created a new identity in {path}")
    console.print(f"peer id:  [bold]{ident.peer_id}[/]", highlight=False)
    console.print(f"key file: {path}", highlight=False)


def _overrides(ctx: typer.Context, **flags: Any) -> list[str]:
    """Explicit flags first, as TOML values (strings quoted), then the free ``--a.b=v`` ones."""
    out = [f"--{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return out + list(ctx.args)


def _load(model: Any, config: Path | None, overrides: list[str]) -> Any:
    from protocol.config import load_config
    from protocol.errors import ConfigError

    try:
        return load_config(model, config, overrides)
    except ConfigError as e:
        raise _fail(str(e)) from None


@coordinator_app.command("start", context_settings=OVERRIDES)
def coordinator_start(
    ctx: typer.Context,
    listen: Annotated[
        str | None, typer.Option(help="libp2p multiaddr, e.g. /ip4/0.0.0.0/tcp/4001.")
    ] = None,
    http: Annotated[str | None, typer.Option(help="REST API HOST:PORT.")] = None,
    db: Annotated[
        str | None, typer.Option(help="Database URL (default: SQLite in data dir).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Start the coordinator and run until Ctrl+C."""
    from coordinator.config import CoordinatorConfig
    from coordinator.main import start_coordinator
    from protocol.config import data_dir

    cfg = _load(CoordinatorConfig, config, _overrides(ctx, listen=listen, http=http, db=db))
    raise typer.Exit(start_coordinator(cfg, data_dir()))


@gateway_app.command("start", context_settings=OVERRIDES)
def gateway_start(
    ctx: typer.Context,
    coordinator_url: Annotated[
        str | None, typer.Option(help="Coordinator REST URL (default: the local coordinator).")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT of the API.")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the OpenAI-compatible API until Ctrl+C."""
    from gateway.config import GatewayConfig
    from gateway.main import start_gateway
    from protocol.config import data_dir
    from protocol.errors import ConfigError

    flags = dict(coordinator_url=coordinator_url, listen=listen, db=db)
    cfg = _load(GatewayConfig, config, _overrides(ctx, **flags))
    try:
        code = start_gateway(cfg, data_dir())
    except ConfigError as e:
        raise _fail(str(e)) from None
    raise typer.Exit(code)


@node_app.command("start", context_settings=OVERRIDES)
def node_start(
    ctx: typer.Context,
    coordinator: Annotated[
        str | None, typer.Option(help="Coordinator multiaddr ending in /p2p/<peer id>.")
    ] = None,
    roles: Annotated[
        str | None, typer.Option(help="Comma-separated: inference,trainer,verifier.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name (default: host name).")] = None,
    listen: Annotated[str | None, typer.Option(help="libp2p listen multiaddr.")] = None,
    metrics_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve Prometheus /metrics on.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Base model: tiny (default), smollm2, HF_ID, DIR or FILE.gguf."),
    ] = None,
    serve: Annotated[
        bool | None, typer.Option("--serve", help="Serve the model over an OpenAI-compatible API.")
    ] = None,
    serve_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT of the serving endpoint (port 0: any).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Join the network and contribute this machine until Ctrl+C."""
    from node.config import NodeConfig
    from node.main import start_node
    from protocol.config import data_dir
    from protocol.errors import ConfigError

    role_list = [r.strip() for r in roles.split(",") if r.strip()] if roles is not None else None
    flags = dict(
        coordinator=coordinator,
        roles=role_list,
        name=name,
        listen=listen,
        metrics_listen=metrics_listen,
        model=model,
        serve=serve,
        serve_listen=serve_listen,
    )
    cfg = _load(NodeConfig, config, _overrides(ctx, **flags))
    try:
        code = start_node(cfg, data_dir())
    except ConfigError as e:
        raise _fail(str(e)) from None
    raise typer.Exit(code)


@network_app.command("status")
def network_status(
    coordinator_url: Annotated[
        str | None, typer.Option(help="Coordinator REST URL (default: the local coordinator).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show every node the coordinator knows: status, roles, device, last heartbeat, and its
    audit record (reputation, strikes, bans) with the latest signed verdicts."""
    import httpx

    from protocol.config import data_dir

    url = coordinator_url or _local_coordinator_url(data_dir())
    try:
        resp = httpx.get(f"{url.rstrip('/')}/v1/network/nodes", timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise _fail(f"cannot read nodes from the coordinator at {url}: {e}") from None
    nodes = resp.json()["data"]
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    from rich.table import Table

    colors = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
    table = Table(title=f"{len(nodes)} nodes at {url}")
    cols = ("name", "peer id", "roles", "device", "status", "last seen", "audits", "reputation",
            "strikes", "version")  # fmt: skip
    for col in cols:
        table.add_column(col)
    for n in nodes:
        pid, t = n["peer_id"], n["trust"]
        strikes = f"[red]{t['strikes']} banned[/]" if t["banned"] else str(t["strikes"])
        table.add_row(
            n["name"],
            f"{pid[:12]}…{pid[-6:]}",
            ",".join(n["roles"]),
            n["device"],
            f"[{colors.get(n['status'], 'white')}]{n['status']}[/]",
            f"{n['last_seen_ago_s']:.1f}s ago",
            f"{t['passed']} passed / {t['failed']} failed",
            f"{t['reputation']:.2f}",
            strikes,
            n["version"],
        )
    console.print(table)
    try:
        verdicts = httpx.get(f"{url.rstrip('/')}/v1/network/verdicts", timeout=10).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return
    if verdicts:
        recent = Table(title="latest verdicts (signed by their verifiers)")
        for col in ("audit", "producer", "verifier", "result", "detail"):
            recent.add_column(col)
        for v in verdicts[-10:]:
            result = "[green]passed[/]" if v["passed"] else f"[red]failed {v['failed_check']}[/]"
            recent.add_row(
                v["audit_id"][:8], v["producer_name"], v["verifier_name"], result, v["detail"][:60]
            )
        console.print(recent)


@model_app.command("tiny")
def model_tiny(
    out: Annotated[
        Path | None, typer.Option(help="Directory to write (default: cached in the data dir).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Initialization and data seed.")] = 0,
    target_accuracy: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Stop warm-up training at this accuracy.")
    ] = 0.4,
    max_steps: Annotated[int, typer.Option(min=1, help="Training schedule length.")] = 1500,
) -> None:
    """Build the tiny model (Llama architecture, byte tokenizer) in Hugging Face format."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from node.models.tiny import TinySpec, build_tiny_model, tiny_model_dir
    from protocol.config import data_dir

    spec = TinySpec(seed=seed, target_accuracy=target_accuracy, max_steps=max_steps)
    target = out or tiny_model_dir(data_dir(), spec)
    if (target / "bazaar-tiny.json").exists():
        console.print(f"already built: {target}", highlight=False)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("warm-up training", total=spec.max_steps, info="")

        def report(step: int, loss: float, accuracy: float) -> None:
            info = f"step {step}  loss {loss:.3f}  accuracy {accuracy:.0%}"
            progress.update(task, completed=step, info=info)

        build_tiny_model(target, spec, report)
    meta = json.loads((target / "bazaar-tiny.json").read_text())
    console.print(
        f"built {target} (accuracy {meta['accuracy']:.0%} after {meta['steps']} steps)",
        highlight=False,
    )


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(min=1, max=64, help="How many node processes.")] = 3,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl+C).")
    ] = None,
) -> None:
    """Run a local network (a coordinator and N nodes on loopback) and watch it live."""
    from bazaar.up import run_local_network
    from protocol.config import data_dir

    raise typer.Exit(run_local_network(data_dir() / "local", nodes, duration, console))


def _key_store(db: str | None) -> Any:
    from gateway.keys import KeyStore, open_database
    from protocol.config import data_dir

    return KeyStore(open_database(db or f"sqlite:///{data_dir() / 'gateway.db'}"))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A unique name for the key.")],
    budget_tokens: Annotated[
        int | None, typer.Option(min=0, help="Tokens the key may spend (default: unlimited).")
    ] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    db: DbOpt = None,
) -> None:
    """Create a key; the secret is printed once and stored only as a hash."""
    try:
        secret, key = _key_store(db).create(name, budget_tokens, rpm, tpm)
    except ValueError as e:
        raise _fail(str(e)) from None
    print(secret)
    budget = "unlimited" if key.budget_tokens is None else f"{key.budget_tokens} tokens"
    console.print(f"[dim]key {key.name!r} created ({budget}); the secret is not shown again[/]")


@keys_app.command("list")
def keys_list(
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List keys with their budgets and spending (never their secrets)."""
    import dataclasses

    keys = _key_store(db).all()
    if as_json:
        print(json.dumps([dataclasses.asdict(k) for k in keys], indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(keys)} API keys")
    for col in ("name", "budget", "used", "held by gateways", "rpm", "tpm", "state"):
        table.add_column(col)
    for k in keys:
        table.add_row(
            k.name, "∞" if k.budget_tokens is None else str(k.budget_tokens), str(k.used_tokens),
            str(k.reserved_tokens), str(k.rpm or "∞"), str(k.tpm or "∞"),
            "[red]revoked[/]" if k.revoked else "active",
        )  # fmt: skip
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")], db: DbOpt = None
) -> None:
    """Revoke a key: every later request with it gets 401."""
    if not _key_store(db).revoke(name):
        raise _fail(f"no key named {name!r}")
    console.print(f"key {name!r} revoked")


CoordinatorUrlOpt = Annotated[
    str | None, typer.Option(help="Coordinator REST URL (default: the local coordinator).")
]


def _coordinator(method: str, path: str, url: str | None, **kwargs: Any) -> Any:
    """A coordinator REST call; its JSON, or a one-line error naming what went wrong."""
    import httpx

    from protocol.config import data_dir

    base = (url or _local_coordinator_url(data_dir())).rstrip("/")
    try:
        resp = httpx.request(method, f"{base}{path}", timeout=30, **kwargs)
    except httpx.HTTPError as e:
        raise _fail(f"cannot reach the coordinator at {base}: {e}") from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise _fail(f"{message} (HTTP {resp.status_code})")
    return resp.json()


@run_app.command("submit")
def run_submit(
    spec: Annotated[Path, typer.Argument(help="The run's spec (TOML; see examples/).")],
    coordinator_url: CoordinatorUrlOpt = None,
) -> None:
    """Check a run spec locally, then submit it; prints the run's id."""
    from coordinator.runs import RunSpec
    from protocol.errors import ConfigError

    try:
        parsed = RunSpec.from_toml(spec)
    except ConfigError as e:
        raise _fail(str(e)) from None
    run = _coordinator("POST", "/v1/runs", coordinator_url, json=parsed.model_dump())
    console.print(f"run [bold]{run['id']}[/] submitted: {run['env']} on {run['base_model']}")


@run_app.command("list")
def run_list(
    coordinator_url: CoordinatorUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Every run: state, version, examples delivered, tokens."""
    runs = _coordinator("GET", "/v1/runs", coordinator_url)["data"]
    if as_json:
        print(json.dumps(runs, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs")
    for col in ("run", "state", "env", "base model", "version", "examples", "tokens"):
        table.add_column(col)
    for r in runs:
        examples = f"{r['examples_delivered']}/{r['total_examples'] or '∞'}"
        cells = [str(r["policy_version"]), examples, f"{r['completion_tokens']:,}"]
        table.add_row(r["id"], r["state"], r["env"], r["base_model"], *cells)
    console.print(table)


@run_app.command("status")
def run_status(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    coordinator_url: CoordinatorUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """One run: its state and settings, and its adapter versions with their holders."""
    run = _coordinator("GET", f"/v1/runs/{run_id}", coordinator_url)
    versions = _coordinator("GET", f"/v1/runs/{run_id}/versions", coordinator_url)["data"]
    rewards = _coordinator("GET", f"/v1/runs/{run_id}/rewards", coordinator_url)["data"]
    if as_json:
        print(json.dumps({**run, "versions": versions, "rewards": rewards}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"run {run_id}", show_header=False)
    for key in ("state", "env", "base_model", "policy_version", "group_size", "examples_leased",
                "examples_delivered", "active_leases", "completion_tokens",
                "tokens_trained"):  # fmt: skip
        table.add_row(key, str(run[key]))
    if rewards:
        first, last = rewards[0], rewards[-1]
        best = max(rewards, key=lambda r: r["mean"])
        summary = (f"v{first['version']} {first['mean']:.3f} → v{last['version']} "
                   f"{last['mean']:.3f} (best v{best['version']} {best['mean']:.3f})")  # fmt: skip
        table.add_row("reward", summary)
        table.add_row("reward curve", _sparkline([r["mean"] for r in rewards]))
    console.print(table)
    if versions:
        vt = Table(title="adapter versions")
        for col in ("version", "manifest", "trainers holding it"):
            vt.add_column(col)
        for v in versions:
            vt.add_row(str(v["version"]), v["manifest_sha256"][:16], str(len(v["holders"])))
        console.print(vt)


def _sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(bars[int((v - low) / span * (len(bars) - 1))] for v in values[-60:])


@run_app.command("rollouts")
def run_rollouts(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    version: Annotated[int | None, typer.Option(help="Only completions of this version.")] = None,
    best: Annotated[bool, typer.Option("--best", help="The highest rewards first.")] = False,
    worst: Annotated[bool, typer.Option("--worst", help="The lowest rewards first.")] = False,
    n: Annotated[int, typer.Option("-n", help="How many.")] = 10,
    coordinator_url: CoordinatorUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Completions the trainers trained on, as text: prompt, completion, reward, version."""
    if best and worst:
        raise _fail("--best or --worst, not both")
    order = "best" if best else "worst" if worst else "recent"
    params: dict[str, Any] = {"order": order, "n": n}
    if version is not None:
        params["version"] = version
    data = _coordinator("GET", f"/v1/runs/{run_id}/samples", coordinator_url, params=params)
    samples = data["data"]
    if as_json:
        print(json.dumps(samples, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(samples)} completions of {run_id} ({order})", show_lines=True)
    for col in ("version", "prompt", "completion", "reward"):
        table.add_column(col, overflow="fold")
    for x in samples:
        table.add_row(str(x["version"]), x["prompt"][-300:], x["completion"][:300],
                      f"{x['reward']:.2f}")  # fmt: skip
    console.print(table)


@run_app.command("plot")
def run_plot(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Image file to write (PNG, SVG).")
    ] = Path("reward.png"),
    coordinator_url: CoordinatorUrlOpt = None,
) -> None:
    """Plot the reward (mean, and ± one standard deviation) by adapter version."""
    rewards = _coordinator("GET", f"/v1/runs/{run_id}/rewards", coordinator_url)["data"]
    if not rewards:
        raise _fail(f"run {run_id} has no reward reports yet (no round trained)")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    xs = [r["version"] for r in rewards]
    mean = [r["mean"] for r in rewards]
    std = [r["std"] for r in rewards]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, mean, marker="o", label="mean reward")
    ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2,
                    label="± 1 std")  # fmt: skip
    ax.set_xlabel("adapter version the completions were sampled at")
    ax.set_ylabel("reward")
    ax.set_title(f"run {run_id}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    console.print(f"wrote {out} ({len(rewards)} versions)")


@run_app.command("logs")
def run_logs(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing new lines.")
    ] = False,
    coordinator_url: CoordinatorUrlOpt = None,
) -> None:
    """The coordinator's log lines about a run (created, rounds, versions, penalties, ...)."""
    import time as _time

    seen = 0
    while True:
        lines = _coordinator("GET", f"/v1/runs/{run_id}/logs", coordinator_url,
                             params={"after": seen})["data"]  # fmt: skip
        for line in lines:
            stamp = _time.strftime("%H:%M:%S", _time.localtime(line["at"]))
            console.print(f"{stamp} {line['level']:<7} {line['message']}", highlight=False,
                          soft_wrap=True)  # fmt: skip
            seen = line["seq"]
        if not follow:
            return
        _time.sleep(1.0)


@run_app.command("deploy")
def run_deploy(
    target: Annotated[str, typer.Argument(help="RUN (its current version) or RUN@VERSION.")],
    coordinator_url: CoordinatorUrlOpt = None,
) -> None:
    """Serve an adapter version at the gateway as model RUN (RUN@V is always served too);
    serving nodes fetch it like any version."""
    run_id, _, version = target.partition("@")
    if version and not version.isdigit():
        raise _fail(f"{target!r}: expected RUN or RUN@VERSION")
    body = {"version": int(version) if version else None}
    run = _coordinator("POST", f"/v1/runs/{run_id}/deploy", coordinator_url, json=body)
    console.print(f"model [bold]{run_id}[/] is now version {run['deployed']}")


@run_app.command("cancel")
def run_cancel(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    coordinator_url: CoordinatorUrlOpt = None,
) -> None:
    """Stop a run: no more leases or training rounds (what was delivered and trained stays)."""
    run = _coordinator("POST", f"/v1/runs/{run_id}/cancel", coordinator_url)
    console.print(f"run [bold]{run['id']}[/] {run['state']}")


def _local_coordinator_url(home: Path) -> str:
    try:
        return str(json.loads((home / "coordinator.json").read_text())["http"])
    except (OSError, ValueError, KeyError):
        return "http://127.0.0.1:8700"


def main() -> None:
    app()
