"""``bazaar`` command groups. Each command parses its options, imports what it needs, runs.

Errors a user can fix (a bad config, an unusable key file) print one clear line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bazaar import __version__
from bazaar.envs_cli import env_app
from bazaar.gateways_cli import gateway_admit, gateway_list, gateway_revoke
from bazaar.output import console
from bazaar.output import fail as _fail
from bazaar.runs_cli import evaluate_command, ledger, local_coordinator_url, run_app

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
gateway_app = typer.Typer(
    help="Run the OpenAI-compatible gateway (keys, metering, routing); admit gateways to the "
    "serving nodes."
)
app.add_typer(identity_app, name="identity")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(node_app, name="node")
app.add_typer(network_app, name="network")
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(gateway_app, name="gateway")
app.add_typer(run_app, name="run")
app.add_typer(env_app, name="env")
app.command("ledger")(ledger)
gateway_app.command("admit")(gateway_admit)
gateway_app.command("revoke")(gateway_revoke)
gateway_app.command("list")(gateway_list)
app.command("eval")(evaluate_command)

DbOpt = Annotated[
    str | None, typer.Option("--db", help="Database URL (default: SQLite in the data dir).")
]
# Commands with a config take any field as a dotted override: --membership.dead_after_missed=4
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file; flags and --a.b=value override it."),
]


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
    from protocol.errors import IdentityError
    from protocol.identity import KEY_FILE_NAME, load_or_create_identity
    from protocol.service.config import data_dir

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
    from protocol.errors import ConfigError
    from protocol.service.config import load_config

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
    from protocol.service.config import data_dir
    from protocol.service.lifecycle import exit_now

    cfg = _load(CoordinatorConfig, config, _overrides(ctx, listen=listen, http=http, db=db))
    exit_now(start_coordinator(cfg, data_dir()))


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
    from protocol.errors import ConfigError
    from protocol.service.config import data_dir
    from protocol.service.lifecycle import exit_now

    flags = dict(coordinator_url=coordinator_url, listen=listen, db=db)
    cfg = _load(GatewayConfig, config, _overrides(ctx, **flags))
    try:
        code = start_gateway(cfg, data_dir())
    except ConfigError as e:
        raise _fail(str(e)) from None
    exit_now(code)


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
    from protocol.errors import ConfigError
    from protocol.service.config import data_dir
    from protocol.service.lifecycle import exit_now

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
    exit_now(code)


@network_app.command("status")
def network_status(
    coordinator_url: Annotated[
        str | None, typer.Option(help="Coordinator REST URL (default: the local coordinator).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show every node the coordinator knows: status, roles, device, last heartbeat, and its
    audit record as a producer (reputation, strikes, bans) and as a verifier (known answers
    right and wrong, outvoted verdicts, strikes), with the latest signed verdicts."""
    import httpx

    from protocol.service.config import data_dir

    url = coordinator_url or local_coordinator_url(data_dir())
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
            "strikes", "as verifier", "version")  # fmt: skip
    for col in cols:  # a narrow terminal folds the wide columns, never a node's status
        table.add_column(
            col, no_wrap=col in ("name", "status"), min_width=7 if col == "status" else None
        )
    for n in nodes:
        pid, t = n["peer_id"], n["trust"]
        strikes = f"[red]{t['strikes']} banned[/]" if t["banned"] else str(t["strikes"])
        v = t["verifier"]
        checks = (f"{v['known_right']} right / {v['known_wrong']} wrong, {v['outvoted']} "
                  f"outvoted, {v['verifier_strikes']} strikes")  # fmt: skip
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
            checks,
            n["version"],
        )
    console.print(table)
    try:
        verdicts = httpx.get(f"{url.rstrip('/')}/v1/network/verdicts", timeout=10).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return
    if verdicts:
        # the latest passes, and failures for longer: an operator looks for those
        failed = {id(v) for v in [v for v in verdicts if not v["passed"]][-10:]}
        passed = {id(v) for v in [v for v in verdicts if v["passed"]][-5:]}
        recent = Table(title="latest verdicts, failures kept longer (signed by their verifiers)")
        for col in ("audit", "producer", "verifier", "result", "detail"):
            recent.add_column(col)
        for v in (v for v in verdicts if id(v) in failed | passed):
            result = "[green]passed[/]" if v["passed"] else f"[red]failed {v['failed_check']}[/]"
            if v["known_answer"]:  # a known-answer audit: was the verifier right?
                result += f" (known {v['known_answer']}: {v['audit_status']})"
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
    from bazaar.output import build_tiny_model
    from node.model.tiny import TinySpec, tiny_model_dir
    from protocol.service.config import data_dir

    spec = TinySpec(seed=seed, target_accuracy=target_accuracy, max_steps=max_steps)
    target = out or tiny_model_dir(data_dir(), spec)
    if (target / "bazaar-tiny.json").exists():
        console.print(f"already built: {target}", highlight=False)
        return
    build_tiny_model(target, spec)
    meta = json.loads((target / "bazaar-tiny.json").read_text())
    console.print(
        f"built {target} (accuracy {meta['accuracy']:.0%} after {meta['steps']} steps)",
        highlight=False,
    )


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(min=1, max=64, help="How many node processes.")] = 3,
    rounds: Annotated[
        int, typer.Option(min=1, max=10_000, help="Adapter versions the demo run trains.")
    ] = 60,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl+C).")
    ] = None,
    spec: Annotated[
        Path | None, typer.Option(help="The run to train (default: examples/arith-tiny.toml).")
    ] = None,
    model_cache: Annotated[
        Path | None, typer.Option(help="Where built models are cached (default: the data dir).")
    ] = None,
) -> None:
    """Run the whole loop on this machine: a coordinator, a gateway and N nodes on loopback train
    the demo run live, deploy it and serve it through the gateway; Ctrl+C stops everything."""
    from bazaar.up import DEMO_SPEC, run_local_network
    from protocol.service.config import data_dir

    code = run_local_network(data_dir() / "local", nodes, rounds, duration, console,
                             spec or DEMO_SPEC, model_cache)  # fmt: skip
    raise typer.Exit(code)


def _key_store(db: str | None) -> Any:
    from protocol.accounts import KeyStore, open_database
    from protocol.service.config import data_dir

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


def main() -> None:
    from protocol.service.parent import die_with_parent

    die_with_parent()  # started by ``bazaar up``: stop when it does, however it goes
    app()
