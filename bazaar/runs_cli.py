"""``bazaar run ...``: a researcher's commands, each a call to the coordinator's REST API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bazaar.output import console
from bazaar.output import fail as _fail

run_app = typer.Typer(help="Researchers' runs: submit a spec, watch, inspect, deploy, cancel.")

CoordinatorUrlOpt = Annotated[
    str | None, typer.Option(help="Coordinator REST URL (default: the local coordinator).")
]


ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="BAZAAR_API_KEY",
                 help="Your API key (bazaar keys create): the run is billed to it."),
]  # fmt: skip


def _coordinator(
    method: str, path: str, url: str | None, api_key: str | None = None, **kwargs: Any
) -> Any:
    """A coordinator REST call; its JSON, or a one-line error naming what went wrong."""
    import httpx

    from protocol.service.config import data_dir

    base = (url or local_coordinator_url(data_dir())).rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.request(method, f"{base}{path}", timeout=30, headers=headers, **kwargs)
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
    api_key: ApiKeyOpt = None,
) -> None:
    """Check a run spec locally, then submit it, billed to your key; prints the run's id."""
    from protocol.errors import ConfigError
    from protocol.runs import load_spec

    try:
        parsed = load_spec(spec)
    except ConfigError as e:
        raise _fail(str(e)) from None
    run = _coordinator("POST", "/v1/runs", coordinator_url, api_key, json=parsed.to_dict())
    console.print(f"run [bold]{run['id']}[/] submitted: {run['env']} on {run['base_model']}")


@run_app.command("fields")
def run_fields() -> None:
    """Every field a run spec may set, with its meaning (the spec's own documentation)."""
    from rich.table import Table

    from protocol.runs import RunSpec, field_docs

    defaults = RunSpec().to_dict()
    table = Table("field", "default", "meaning", show_lines=False)
    for key, doc in field_docs().items():
        value: Any = defaults
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, dict):
            table.add_row(key, "" if value is None else json.dumps(value), doc)
    console.print(table)


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
    """One run: state, settings, reward curve, tokens sampled, trained and billed, and its
    adapter versions with their holders."""
    run = _coordinator("GET", f"/v1/runs/{run_id}", coordinator_url)
    versions = _coordinator("GET", f"/v1/runs/{run_id}/versions", coordinator_url)["data"]
    rewards = _coordinator("GET", f"/v1/runs/{run_id}/rewards", coordinator_url)["data"]
    if as_json:
        print(json.dumps({**run, "versions": versions, "rewards": rewards}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"run {run_id}", show_header=False)
    for key in ("state", "stop_reason", "owner", "env", "base_model", "policy_version",
                "group_size", "examples_leased", "examples_delivered", "active_leases",
                "completion_tokens", "tokens_trained", "billed_tokens", "max_tokens",
                "deployed"):  # fmt: skip
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
        table.add_row(str(x["version"]), x["prompt"][-300:], _episode(x), f"{x['reward']:.2f}")
    console.print(table)


def _episode(sample: dict[str, Any], limit: int = 1200) -> str:
    """A completion as text: an episode turn by turn (the model's and the environment's)."""
    turns = sample.get("turns") or []
    if not turns:
        return str(sample["completion"][:300])
    marks = {"model": "▶ model", "environment": "◀ env"}
    text = "\n".join(f"{marks[t['by']]}: {t['text'][:300]}" for t in turns)
    return text[:limit]


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
    api_key: ApiKeyOpt = None,
) -> None:
    """Serve an adapter version at the gateway as model RUN (RUN@V is always served too);
    serving nodes fetch it like any version."""
    run_id, _, version = target.partition("@")
    if version and not version.isdigit():
        raise _fail(f"{target!r}: expected RUN or RUN@VERSION")
    body = {"version": int(version) if version else None}
    run = _coordinator("POST", f"/v1/runs/{run_id}/deploy", coordinator_url, api_key, json=body)
    console.print(f"model [bold]{run_id}[/] is now version {run['deployed']}")


@run_app.command("cancel")
def run_cancel(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    coordinator_url: CoordinatorUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Stop a run: no more leases or training rounds (what was delivered and trained stays)."""
    run = _coordinator("POST", f"/v1/runs/{run_id}/cancel", coordinator_url, api_key)
    console.print(f"run [bold]{run['id']}[/] {run['state']}")


def ledger(
    run: Annotated[str | None, typer.Option("--run", help="Only this run's entries.")] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="Only this node's entries (its peer id).")
    ] = None,
    coordinator_url: CoordinatorUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Who paid for which tokens and who earned them, and whether every run's bill reconciles
    with the evidence: the tokens in the payloads themselves, counted again by the coordinator
    from its copies, and the trainers' signed counts; the key's usage records equal the charges
    less the refunds. Exits 1 if one does not."""
    params = {k: v for k, v in (("run", run), ("node", node)) if v}
    data = _coordinator("GET", "/v1/ledger", coordinator_url, params=params)
    if as_json:
        print(json.dumps(data, indent=2))
        raise typer.Exit(0 if data["reconciled"] else 1)
    from rich.table import Table

    accounts = Table(title="balances (tokens)")
    accounts.add_column("account")
    accounts.add_column("balance", justify="right")
    for account, balance in data["balances"].items():
        accounts.add_row(account[:60], f"{balance:,}")
    console.print(accounts)
    runs = Table(title="runs: billed vs recounted from the payloads")
    cols = ("run", "owner", "sampled", "recounted", "trainers' count", "trained",
            "recounted", "refunded", "key usage", "ok")  # fmt: skip
    for col in cols:
        runs.add_column(col, justify="left" if col in ("run", "owner") else "right")
    for r in data["runs"]:
        usage = "-" if r["key_usage"] is None else f"{r['key_usage']:,}"
        runs.add_row(r["run"], r["owner"] or "-", f"{r['charged_sampled']:,}",
                     f"{r['recounted_sampled']:,}", f"{r['trainer_counted_sampled']:,}",
                     f"{r['charged_trained']:,}", f"{r['recounted_trained']:,}",
                     f"{r['refunded']:,}", usage,
                     "[green]✓[/]" if r["reconciled"] else "[red]✗[/]")  # fmt: skip
        if r["evidence_missing"]:
            console.print(f"[yellow]{r['run']}: {len(r['evidence_missing'])} charged payloads "
                          "are no longer kept[/]")  # fmt: skip
    console.print(runs)
    entries = Table(title=f"last entries ({data['entry_count']} in all)")
    for col in ("run", "kind", "from", "to", "tokens"):
        entries.add_column(col)
    for e in data["entries"][-20:]:
        entries.add_row(e["run_id"], e["kind"], e["debit"][:24], e["credit"][:24],
                        f"{e['tokens']:,}")  # fmt: skip
    console.print(entries)
    verdict = "[green]reconciled[/]" if data["reconciled"] else "[red]NOT reconciled[/]"
    console.print(f"{verdict}: balances sum to {data['balance_sum']}")
    raise typer.Exit(0 if data["reconciled"] else 1)


def local_coordinator_url(home: Path) -> str:
    try:
        return str(json.loads((home / "coordinator.json").read_text())["http"])
    except (OSError, ValueError, KeyError):
        return "http://127.0.0.1:8700"


def evaluate_command(
    env: Annotated[str, typer.Option("--env", help="Environment (as a run spec names it).")],
    model: Annotated[
        str, typer.Option("--model", help="base, RUN (its deployed version) or RUN@VERSION.")
    ],
    n: Annotated[int, typer.Option("-n", min=1, max=100_000, help="Examples to answer.")] = 100,
    k: Annotated[
        int, typer.Option("-k", min=1, max=64, help="Attempts per example (avg@k, pass@k).")
    ] = 1,
    pass_threshold: Annotated[
        float, typer.Option(help="The reward an attempt needs to count as a pass.")
    ] = 1.0,
    env_args: Annotated[
        str, typer.Option("--env-args", help='Environment arguments as JSON: {"digits": 1}.')
    ] = "{}",
    compare: Annotated[
        bool, typer.Option("--compare", help="Also evaluate the base model, side by side.")
    ] = False,
    base_model: Annotated[
        str, typer.Option(help="The base model 'base' means (default: the adapter's base).")
    ] = "",
    temperature: Annotated[float, typer.Option(min=0.0, max=10.0)] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the examples and of their sampling.")] = (
        1_000_003
    ),
    gateway_url: Annotated[
        str, typer.Option(envvar="BAZAAR_GATEWAY_URL", help="The gateway's URL.")
    ] = "http://127.0.0.1:8800",
    api_key: ApiKeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Answer an environment's examples through the gateway (a multi-turn environment: whole
    episodes) and print avg@k and pass@k with 95 % confidence intervals (--compare: the base
    model beside the adapter)."""
    import openai

    from bazaar.evaluate import evaluate_models, table

    try:
        args = json.loads(env_args)
        assert isinstance(args, dict)
    except (ValueError, AssertionError):
        raise _fail(f"--env-args must be a JSON object, got {env_args!r}") from None
    if not api_key:
        raise _fail("an API key is needed: --api-key or BAZAAR_API_KEY (bazaar keys create)")
    client = openai.OpenAI(base_url=f"{gateway_url.rstrip('/')}/v1", api_key=api_key,
                           max_retries=2)  # fmt: skip
    try:
        cards = {m.id: m for m in client.models.list().data}
        card = cards.get(model)
        root = getattr(card, "root", None) or getattr(card, "parent", None)
        base = str(base_model or root or "tiny")
        models = [base if model == "base" else model]
        if compare and model != "base":
            models.insert(0, base)
        results = evaluate_models(client, console, env, args, models, n, k=k,
                                  threshold=pass_threshold, seed=seed, temperature=temperature,
                                  max_tokens=max_tokens)  # fmt: skip
    except openai.APIError as e:
        raise _fail(f"the gateway refused: {e}") from None
    except ValueError as e:
        raise _fail(str(e)) from None
    if as_json:  # mean and ci95: avg@k
        print(json.dumps({m: {"n": r.avg.n, "k": r.k, "mean": r.avg.mean, "ci95": r.avg.ci95,
                              "pass_threshold": r.threshold,
                              "pass": {str(j): {"mean": p.mean, "ci95": p.ci95}
                                       for j, p in r.passes.items()}}
                          for m, r in results.items()}, indent=2))  # fmt: skip
        return
    title = f"{env} {env_args if args else ''} — {n} examples × {k}, through {gateway_url}"
    console.print(table(results, title))
