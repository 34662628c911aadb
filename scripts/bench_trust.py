"""Benchmark: trust no node's word — an honest run, and the same run with each attacker present.

Every scenario is a fresh network of real processes on loopback (``tests/integration/cluster.py``):
a coordinator that recounts every payload and recomputes its rewards (``--tokenizers.tiny``),
two honest samplers, two verifiers (a failed audit needs a second verifier to confirm it) and a
trainer, each node in its own process with its model in a child process — plus, in an attack
scenario, one attacker. The run spec is the same everywhere: the demo run (one-digit additions
on the tiny model, 8 prompts × 8 completions a lease) with ``rl.max_tokens`` 32 and a
``stop.target_reward`` of 0.95 that the model does not reach, so only a lie could end a run on
its reward. The honest run makes ``--rounds`` versions (``stop.max_rounds``). A run with an
attacker goes on until it has made ``--attack-rounds`` versions *and* its attacker is caught,
then it is cancelled (at most three times as many versions: then ``max_rounds`` ends it and the
benchmark waits ``--catch-timeout`` more) — a cheating producer must win leases to cheat at all,
and leases go to whichever node asks first. The researcher's key pays for it all.

The attacks (``ATTACKS`` in ``scripts/trust_attacks.py``: how the attacker is started, what the
coordinator needs, how to tell it was caught):

- ``inflated_receipts``: a producer honest on leases before version ``BAZAAR_CHEAT_FROM`` that
  then claims one token more than each payload holds. Every producer is trusted from the start
  in this scenario (no audits), so its honest work trains and is paid unaudited: what it must
  give back when the coordinator's own recount convicts it (``token_count``).
- ``lying_trainer``: a second trainer that trains honestly but reports perfect rewards (to trip
  ``target_reward``) and ten times the tokens in each payload. Caught: struck, never paid for
  training, and the run never stopped on ``target_reward``.
- ``inflated_logprobs``: a producer whose logprobs are inflated (``tests/adversarial/
  cheaters.py``), for the verifiers' ``logprobs`` check.
- ``withheld_payloads``: a producer that keeps none of its payloads (``unavailable``).
- ``freeloading_verifier``: a verifier that passes every audit without fetching a byte. It joins
  once the coordinator holds a known cheat, which an accomplice producer supplies: one that
  claims a token more than each payload holds, convicted by the coordinator's own count. Caught:
  banned, its pay for checks all forfeited.
- ``failing_verifier``: a verifier that fails every audit, with everyone from the start: its
  failures are outvoted by the two honest verifiers, and it fails known-honest payloads. Caught:
  banned and unpaid, no honest producer penalized.
- ``covering_verifier``: a colluding pair: an accomplice producer inflating its logprobs, and a
  verifier passing the accomplice's payloads unchecked (checking everyone else honestly), joining
  once a known cheat exists. Caught: the verifier banned and unpaid, the accomplice banned, and no
  audit of the accomplice's work decided honest.
- ``colluding_verifiers``: two verifiers that fail every payload of the honest ``sampler-1``
  and check everything else honestly (together a majority of two failures). They join once the
  coordinator holds two known-honest payloads of sampler-1's, which come from double-checked
  passes: at the default 5 % the network makes one per ~20 audits, longer than this benchmark's
  minutes, so this scenario double-checks half of the passes
  (``--audits.double_check_rate=0.5``). Their failures of sampler-1 wait until each answered a
  known-honest payload of sampler-1's, sent blind; they fail it. Caught: both struck (a ban
  takes two more strikes: more such answers, or outvoted verdicts) and no audit of sampler-1's
  work decided failed (``false_penalties`` counts sampler-1 too).
- ``gateway_bypass``: no attacker node; ``sampler-1`` also serves the model (``--serve``). Once
  the run has a version, an admitted gateway starts and a client calls the serving node straight
  — with no credential, a made-up one, a valid gateway API key, and a serving token it signed
  itself — then once through the gateway. Caught: every direct request refused (401) and no
  token served unmetered, the request through the gateway served and on the key's usage.
- ``coordinator_kill``: no attacker node; the coordinator is killed (``kill -9``) while a
  round holds part of the key's budget, and restarted. Caught = the restarted coordinator held
  the open round again (the key's reserved tokens equal what the run may still charge).

Metrics, per scenario (JSON keys ``<scenario>_<metric>``; the table shows them side by side):

- ``caught_rate``: attackers caught (struck or banned, or their lie refused as designed) ÷
  attackers.
- ``overcharge_tokens``: tokens the key paid that the payloads do not back — the run's charges
  beyond the ledger's independent recount of the kept payloads; the key's usage beyond the
  charges less the refunds; budget still reserved once the run is settled; and what the attacker
  was paid for work no audit vouched for and did not give back.
- ``refund_exact``: 1 when the run's refunds equal exactly what the caught producers were paid for
  work no audit vouched for (its audited-and-passed work keeps its pay; 1 when nothing was due).
- ``false_penalties``: strikes and bans of honest nodes (producers' and verifiers' strikes).
- ``billed_vs_independent_recount``: the run's charges ÷ the ledger's recount (exactly 1.0).

And for the honest run, ``audit_compute_fraction``: CPU seconds of the verifiers' process trees
÷ those of the samplers' (each a node process and its model process, read by ``psutil`` from the
outside, so nothing self-reported is trusted; known-answer audits, when the coordinator hands
them out, run on the same verifiers and are included). A verifier's tree holds everything a
verifier costs: fetching payloads and adapter versions, the replay in its model process, and its
idle polling and heartbeats; a sampler's: leasing, generating, signing, serving its payloads.
Measured twice: over the whole run (from submission, model loading included), and over the
steady state — from the moment the coordinator's trust records show every honest sampler's
``clean_streak`` at ``--audits.trusted_after`` (10) to the run's end — where audits run at the
floor (``--audits.floor_rate``, 0.04). The goal (≤ 0.05) is judged on the steady state: before
trust every receipt is audited by design, a cost paid once per producer however long it works.
Both windows are broken down: audit rate, CPU seconds per lease generated and per audit, and the
same fraction over the model processes alone.

Run: ``python scripts/bench_trust.py [--quick]`` (quick: 12 honest rounds and 4 with an
attacker, 9 minutes on two cores shared with other jobs; the full run 16; writes
``bench-results/trust.json``). ``--only NAME`` runs some scenarios alone.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import check_alive, wait_until, write_result  # noqa: E402  (scripts/, beside this file)
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table  # noqa: E402
from trust_attacks import (  # noqa: E402
    ACCOMPLICE,
    ATTACKER,
    ATTACKS,
    CHEATS,
    RUN,
    Attack,
    Seen,
    observe,
)

from bazaar.up import DEMO_SPEC, tiny_model  # noqa: E402
from coordinator.config import AuditConfig  # noqa: E402
from protocol.runs import load_spec  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from tests.integration.cluster import Cluster, Proc  # noqa: E402

console = Console()
if not console.is_terminal:
    console.width = 200  # a log file: keep the tables' rows on one line
HONEST = {"sampler-1": "inference", "sampler-2": "inference", "verifier-1": "verifier",
          "verifier-2": "verifier", "trainer-1": "trainer"}  # fmt: skip
SAMPLERS = [n for n, r in HONEST.items() if r == "inference"]
VERIFIERS = [n for n, r in HONEST.items() if r == "verifier"]
GOALS = {"caught_rate": 1.0, "overcharge_tokens": 0, "refund_exact": 1, "false_penalties": 0,
         "billed_vs_independent_recount": 1.0, "audit_compute_fraction": 0.05}  # fmt: skip


# -- CPU of process trees ---------------------------------------------------------------------


def cpu_tree(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process, and of its descendants (live, and those it
    reaped): a node's own work, and its model process's (and any other child's)."""
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        kids = t.children_user + t.children_system
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                kids += ct.user + ct.system + ct.children_user + ct.children_system
            except psutil.NoSuchProcess:
                pass
        return t.user + t.system, kids
    except psutil.NoSuchProcess:
        return 0.0, 0.0


Snapshot = dict[str, tuple[float, float]]


def snapshot(procs: dict[str, Proc]) -> Snapshot:
    return {name: cpu_tree(p.pid) for name, p in procs.items()}


def spent(a: Snapshot, b: Snapshot, names: list[str], part: str = "tree") -> float:
    """CPU seconds the named processes spent between two snapshots: ``tree`` (all), ``model``
    (their children: the model process)."""
    i = {"tree": (0, 1), "model": (1,)}[part]
    return sum(sum(b[n][k] - a[n][k] for k in i) for n in names)


# -- one scenario -----------------------------------------------------------------------------


@dataclass
class Scenario:
    attack: Attack | None
    cluster: Cluster
    coordinator_args: list[str]
    tiny: Path
    model_args: list[str]
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.attack.key if self.attack else "honest"

    def reserved(self) -> int:
        (key,) = [k for k in self.cluster.accounts().all() if k.name == "researcher"]
        return key.reserved_tokens

    def check(self) -> None:
        check_alive([*self.procs.items(), ("coordinator", self.cluster.coordinator)])


def run_spec(max_rounds: int, max_tokens: int) -> dict[str, Any]:
    spec = load_spec(DEMO_SPEC)
    stop = msgspec.structs.replace(spec.stop, max_rounds=max_rounds, target_reward=0.95)
    rl = msgspec.structs.replace(spec.rl, max_tokens=max_tokens)
    return {**msgspec.structs.replace(spec, name=RUN, stop=stop, rl=rl).to_dict(), "name": RUN}


def play(
    attack: Attack | None, args: argparse.Namespace, cache: Path, tiny: Path, progress: Progress
) -> dict[str, Any]:
    """One scenario on a fresh network: what it measured (and, for the honest run, the checks'
    CPU cost); ``failed`` with the reason if it could not finish."""
    key = attack.key if attack else "honest"
    rounds = args.rounds if attack is None else args.attack_rounds
    task = progress.add_task(f"{key}: starting", total=rounds)
    root = Path(tempfile.mkdtemp(prefix=f"bench-trust-{key}-"))
    coordinator_args = [
        f"--tokenizers.tiny={tiny}", f"--leases.round_leases={args.round_leases}",
        f"--audits.trusted_after={args.trusted_after}", f"--audits.floor_rate={args.floor_rate}",
        *(attack.coordinator if attack else ()),
    ]  # fmt: skip
    model_args = [f"--model_cache={cache}", "--torch_threads=1"]
    cluster = Cluster(root, interval_s=2.0, sessions=True)
    sc = Scenario(attack, cluster, coordinator_args, tiny, model_args)
    out: dict[str, Any] = {}
    try:
        start(sc, progress, task)
        cpu, times = {"start": snapshot(sc.procs)}, {"start": time.time()}
        # an attacker's run goes on (up to 3x its rounds) until it is caught: a producer has to
        # win leases to cheat at all, and leases go to whoever asks first
        cap = rounds if attack is None else 3 * rounds
        sc.cluster.api("POST", "/v1/runs", json=run_spec(cap, args.max_tokens))
        did = follow(sc, args, rounds, cpu, times, progress, task)
        cpu["end"], times["end"] = snapshot(sc.procs), time.time()
        if attack and not attack.caught(observe(sc, did)):
            progress.update(task, description=f"{key}: waiting for the attacker to be caught")
            wait_until(sc.check, "the attacker caught", lambda: attack.caught(observe(sc, did)),
                 args.catch_timeout)  # fmt: skip
        progress.update(task, description=f"{key}: settling the bill")
        try:
            wait_until(sc.check, "the run's bill settling", lambda: (
                sc.cluster.api("GET", f"/v1/runs/{RUN}")["held_tokens"] == 0
                and sc.reserved() == 0), 60)  # fmt: skip
        except RuntimeError:  # what stays reserved on the key is counted as overcharged
            console.print(f"[red]{key}: the key's budget is still held a minute after the run")
        seen = observe(sc, did)
        out = measure(seen, attack)
        if attack is None:
            out.update(audit_cost(seen, cpu, times, args))
        out["seconds"] = times["end"] - times["start"]
        progress.update(task, description=f"{key}: done ({out['seconds']:.0f} s)")
    except (RuntimeError, AssertionError) as e:
        progress.update(task, description=f"{key}: [red]failed[/]")
        console.print(f"[red]{key} failed: {e}; logs in {root}", soft_wrap=True)
        out = {"failed": str(e)}
    finally:
        sc.cluster.stop_all()
    if "failed" not in out:
        shutil.rmtree(root, ignore_errors=True)
    return out


def start(sc: Scenario, progress: Progress, task: TaskID) -> None:
    """The coordinator, the honest nodes, an accomplice and the attackers (unless they join
    later), until every node is alive."""
    cluster, attack = sc.cluster, sc.attack
    cluster.start_coordinator(extra=sc.coordinator_args)
    for name, roles in HONEST.items():
        serve = ["--serve"] if attack and attack.serve and name == "sampler-1" else []
        sc.procs[name] = cluster.start_node(name, roles=roles, extra=[*sc.model_args, *serve])
    if attack and attack.accomplice:
        sc.procs[ACCOMPLICE] = cluster.start_node(
            ACCOMPLICE, roles="inference", extra=sc.model_args, module=CHEATS,
            env={"BAZAAR_CHEAT": attack.accomplice},
        )  # fmt: skip
    if attack and attack.roles and attack.joins_when is None:
        start_attackers(sc)
    progress.update(task, description=f"{sc.key}: {len(sc.procs)} nodes joining")
    wait_until(sc.check, "nodes joining", lambda: sum(
        s == "alive" for s in cluster.statuses().values()) >= len(sc.procs), 120)  # fmt: skip


def start_attackers(sc: Scenario) -> None:
    attack = sc.attack
    assert attack is not None
    env = {"BAZAAR_CHEAT": attack.cheat, **dict(attack.env)}
    if attack.peer:
        peer = attack.peer
        nodes = sc.cluster.nodes
        env["BAZAAR_PEER"] = wait_until(
            sc.check, f"{peer}'s id", lambda: nodes()[peer]["peer_id"], 60
        )
    for i in range(attack.attackers):
        name = ATTACKER if i == 0 else f"{ATTACKER}-{i + 1}"
        sc.procs[name] = sc.cluster.start_node(
            name, roles=attack.roles, extra=sc.model_args, module=CHEATS, env=env
        )


def follow(
    sc: Scenario,
    args: argparse.Namespace,
    rounds: int,
    cpu: dict[str, Snapshot],
    times: dict[str, float],
    progress: Progress,
    task: TaskID,
) -> dict[str, Any]:
    """Watch the run until it ends: snapshot the CPU once every honest sampler is trusted
    (honest run), play the attack's ``during`` step, and cancel an attacker's run once it has
    made ``rounds`` versions and the attacker is caught. What ``during`` recorded."""
    attack, cluster = sc.attack, sc.cluster
    did: dict[str, Any] | None = None
    end = time.monotonic() + args.timeout_per_round * rounds * (1 if attack is None else 3) + 120
    while True:
        sc.check()
        if time.monotonic() > end:
            raise RuntimeError("the run did not end in time")
        time.sleep(0.3)
        try:
            run = cluster.api("GET", f"/v1/runs/{RUN}")
            trust = {n["name"]: n["trust"] for n in cluster.api("GET", "/v1/trust")["nodes"]}
        except Exception:  # the coordinator restarting (coordinator_kill)
            continue
        if run["state"] not in ("queued", "running"):
            return did or {}
        streaks = [trust.get(n, {}).get("clean_streak", 0) for n in SAMPLERS]
        if attack is None and "trusted" not in cpu and min(streaks) >= args.trusted_after:
            cpu["trusted"], times["trusted"] = snapshot(sc.procs), time.time()
        note = f"trusted {sum(s >= args.trusted_after for s in streaks)}/{len(SAMPLERS)}"
        if attack and attack.roles and ATTACKER not in sc.procs:
            note = "the attackers wait for the network's known answers"
        elif attack and attack.roles:
            t = trust.get(ATTACKER, {})
            strikes = t.get("strikes", 0) + t.get("verifier", {}).get("verifier_strikes", 0)
            note = f"attacker {strikes} strikes" + (", banned" * t.get("banned", 0))
        if attack and attack.joins_when and ATTACKER not in sc.procs and attack.joins_when(sc):
            start_attackers(sc)
        if attack and attack.during and did is None:
            did = attack.during(sc, run)
        if attack and run["policy_version"] >= rounds and attack.caught(observe(sc, did or {})):
            cluster.api("POST", f"/v1/runs/{RUN}/cancel")
        version = run["policy_version"]
        progress.update(task, completed=min(version, rounds), description=(
            f"{sc.key}: v{version}, {note}, {run['refunded_tokens']} refunded"))  # fmt: skip


# -- the metrics ------------------------------------------------------------------------------


def measure(seen: Seen, attack: Attack | None) -> dict[str, Any]:
    bill = seen.bill
    charged, recounted, refunded = bill["charged"], bill["recounted"], bill["refunded"]
    # what the attacker was paid for work no audit vouched for: all of it is to be given back
    cheats = [n for n in seen.trust if n.startswith(ATTACKER) or n == ACCOMPLICE]
    ids = {seen.trust[n]["peer_id"] for n in cheats}
    vouched = {v["lease_id"] for v in seen.verdicts
               if v["producer"] in ids and v["audit_status"] == "passed"}  # fmt: skip
    accounts = {seen.account(n) for n in cheats}
    due = sum(e["tokens"] for e in seen.sampled
              if e["credit"] in accounts and e["ref"] not in vouched)  # fmt: skip
    given_back = sum(e["tokens"] for e in seen.refunds
                     if e["debit"] in accounts and e["credit"].startswith("key:"))  # fmt: skip
    overcharge = (max(0, charged - recounted) + max(0, seen.key_used - (charged - refunded))
                  + seen.key_reserved + max(0, due - given_back))  # fmt: skip
    honest = [t for name, t in seen.trust.items() if name in HONEST]
    out: dict[str, Any] = {
        "caught_rate": float(attack.caught(seen)) if attack else None,
        "overcharge_tokens": overcharge,
        "refund_exact": (int(refunded == given_back == due)
                         if attack is None or attack.refund_applies else None),
        "false_penalties": sum(t["strikes"] + int(t["banned"]) + t["verifier"]["verifier_strikes"]
                               for t in honest),
        "billed_vs_independent_recount": charged / recounted if recounted else None,
        "charged_tokens": charged, "recounted_tokens": recounted, "refunded_tokens": refunded,
        "refund_due_tokens": due, "key_used_tokens": seen.key_used,
        "key_reserved_tokens": seen.key_reserved,
        "claimed_tokens": seen.run["claimed_tokens"],
        "confirmed_tokens": seen.run["confirmed_tokens"],
        "reconciled": int(bill["reconciled"]), "stop_reason": seen.run["stop_reason"],
        "versions": seen.run["policy_version"],
    }  # fmt: skip
    if seen.attacker:
        a = seen.attacker
        out.update(attacker_strikes=a["strikes"] + a["verifier"]["verifier_strikes"],
                   attacker_banned=int(all(t["banned"] for t in seen.attackers())),
                   attacker_verified_tokens=sum(t["verifier"]["verified_tokens"]
                                                for t in seen.attackers()),
                   attacker_forfeited_verified_tokens=sum(
                       t["verifier"]["verified_forfeited_tokens"] for t in seen.attackers()),
                   attacker_paid_tokens=seen.paid(ATTACKER, seen.sampled),
                   attacker_paid_training_tokens=seen.paid(ATTACKER, seen.trained),
                   attacker_failed_checks=sorted({v["failed_check"] for v in seen.verdicts
                                                  if v["producer"] == a["peer_id"]
                                                  and not v["passed"]}))  # fmt: skip
    out.update(seen.extra)
    return out


def audit_cost(
    seen: Seen, cpu: dict[str, Snapshot], times: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    """Verifier compute ÷ producer compute, over the whole run and after trust, with the audit
    rate and the CPU per lease and per audit in each window."""
    ids = {seen.trust[n]["peer_id"] for n in SAMPLERS if n in seen.trust}
    leases = [r for r in seen.rollouts if r["producer"] in ids]
    first = [v for v in seen.verdicts if v["producer"] in ids and v["stage"] == "first"]
    audited = {v["lease_id"] for v in first}
    out: dict[str, Any] = {"trusted_after": args.trusted_after, "floor_rate": args.floor_rate,
                           "mean_completion_tokens": seen.run["confirmed_tokens"]
                           / max(1, sum(len(r["counted_examples"]) for r in seen.rollouts)
                                 * seen.run["group_size"])}  # fmt: skip
    windows = {"whole": ("start", "end")}
    if "trusted" in cpu:
        windows |= {"before_trust": ("start", "trusted"), "steady": ("trusted", "end")}
        out["seconds_to_trust"] = times["trusted"] - times["start"]
    for name, (a, b) in windows.items():
        t0, t1 = times[a], times[b]
        made = [r for r in leases if t0 <= r["completed_at"] < t1]
        producer, verifier = spent(cpu[a], cpu[b], SAMPLERS), spent(cpu[a], cpu[b], VERIFIERS)
        model_p = spent(cpu[a], cpu[b], SAMPLERS, "model")
        model_v = spent(cpu[a], cpu[b], VERIFIERS, "model")
        verdicts = sum(t0 <= v["at"] < t1 for v in first)
        w = "" if name == "steady" else f"_{name}"
        out |= {
            f"audit_compute_fraction{w}": verifier / producer if producer else None,
            f"audit_compute_fraction_model{w}": model_v / model_p if model_p else None,
            f"producer_cpu_s{w}": producer, f"verifier_cpu_s{w}": verifier,
            f"producer_model_cpu_s{w}": model_p, f"verifier_model_cpu_s{w}": model_v,
            f"leases{w}": len(made), f"audits{w}": verdicts,
            f"audit_rate{w}": (sum(r["lease_id"] in audited for r in made) / len(made)
                               if made else None),
            f"producer_cpu_s_per_lease{w}": producer / len(made) if made else None,
            f"verifier_cpu_s_per_audit{w}": verifier / verdicts if verdicts else None,
        }  # fmt: skip
    if "audit_compute_fraction" not in out:
        out["audit_compute_fraction"] = None  # trust never reached: no steady state measured
    return out


# -- output -----------------------------------------------------------------------------------


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "n/a"
    return format(v, spec) if spec else str(v)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    table = Table(
        title="trust no node's word: each attack beside the honest run "
        f"({args.rounds} rounds honest, {args.attack_rounds} with an attacker)"
    )
    for col in ("scenario", "caught_rate", "overcharge_tokens", "refund_exact",
                "false_penalties", "billed / recount", "run ended", "notes"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("scenario", "notes") else "right")
    labels = {"honest": "honest run (no attacker)", **{a.key: a.label for a in ATTACKS}}
    flat: dict[str, Any] = {}
    for key, r in results.items():
        if "failed" in r:
            table.add_row(labels[key], *["—"] * 6, f"[red]failed: {r['failed'][:60]}")
            flat[f"{key}_failed"] = 1
            continue
        notes = []
        if "attacker_strikes" in r:
            notes.append(f"{r['attacker_strikes']} strikes" + (", banned" * r["attacker_banned"]))
            if r["attacker_failed_checks"]:
                notes.append("/".join(r["attacker_failed_checks"]))
            notes.append(f"paid {r['attacker_paid_tokens']} for rollouts, "
                         f"{r['attacker_paid_training_tokens']} for training; "
                         f"refunded {r['refunded_tokens']}")  # fmt: skip
        if "attacker_verified_tokens" in r and r["attacker_forfeited_verified_tokens"]:
            notes.append(f"{r['attacker_forfeited_verified_tokens']} verifier credit forfeited")
        if "direct_attempts" in r:
            notes.append(f"{r['direct_refused']}/{r['direct_attempts']} direct requests refused, "
                         f"{r['direct_served_tokens']} tokens served unmetered; through the "
                         f"gateway metered: {bool(r['gateway_metered'])}")  # fmt: skip
        if "held_again" in r:
            notes.append(f"killed holding {r['killed_holding']}; after restart reserved "
                         f"{r['restart_reserved']} = held {r['restart_held']}")  # fmt: skip
        table.add_row(labels[key], fmt(r["caught_rate"], ".2f"), fmt(r["overcharge_tokens"]),
                      fmt(r["refund_exact"]), fmt(r["false_penalties"]),
                      fmt(r["billed_vs_independent_recount"], ".4f"), r["stop_reason"],
                      "; ".join(notes))  # fmt: skip
        for k, v in r.items():
            if isinstance(v, bool | int | float) or v is None:
                flat[f"{key}_{k}"] = v
    console.print(table)
    done = [r for r in results.values() if "failed" not in r]
    attacks = [r for k, r in results.items() if k != "honest" and "failed" not in r]
    summary: dict[str, Any] = {
        "caught_rate": (sum(r["caught_rate"] for r in attacks) / len(attacks)
                        if attacks else None),
        "overcharge_tokens": sum(r["overcharge_tokens"] for r in done),
        "refund_exact": min((r["refund_exact"] for r in done if r["refund_exact"] is not None),
                            default=None),
        "false_penalties": sum(r["false_penalties"] for r in done),
        "billed_vs_independent_recount": (sum(r["charged_tokens"] for r in done)
                                          / max(1, sum(r["recounted_tokens"] for r in done))),
        "billing_exact_every_scenario": int(all(
            r["charged_tokens"] == r["recounted_tokens"] for r in done)),
        "scenarios_failed": len(results) - len(done),
    }  # fmt: skip
    honest = results.get("honest", {})
    if "failed" not in honest and honest:
        summary["audit_compute_fraction"] = honest.get("audit_compute_fraction")
        summary["audit_compute_fraction_whole"] = honest.get("audit_compute_fraction_whole")
        cost = Table(title="the checks' cost in the honest run: verifiers' CPU ÷ samplers' CPU "
                           "(process trees, psutil)")  # fmt: skip
        for col in ("window", "fraction (trees)", "fraction (model processes)",
                    "samplers CPU s", "verifiers CPU s", "leases", "audits (rate)",
                    "sampler CPU s / lease", "verifier CPU s / audit"):  # fmt: skip
            cost.add_column(col, justify="left" if col == "window" else "right")
        for name, w in (("whole run", "_whole"), ("before trust", "_before_trust"),
                        ("steady state (goal ≤ 0.05)", "")):  # fmt: skip
            if f"producer_cpu_s{w}" in honest:
                h = {k: honest[f"{k}{w}"] for k in (
                    "audit_compute_fraction", "audit_compute_fraction_model", "producer_cpu_s",
                    "verifier_cpu_s", "leases", "audits", "audit_rate",
                    "producer_cpu_s_per_lease", "verifier_cpu_s_per_audit")}  # fmt: skip
                rate = "" if h["audit_rate"] is None else f" ({h['audit_rate']:.0%})"
                cost.add_row(name, fmt(h["audit_compute_fraction"], ".3f"),
                             fmt(h["audit_compute_fraction_model"], ".3f"),
                             f"{h['producer_cpu_s']:.1f}", f"{h['verifier_cpu_s']:.1f}",
                             str(h["leases"]), f"{h['audits']}{rate}",
                             fmt(h["producer_cpu_s_per_lease"], ".2f"),
                             fmt(h["verifier_cpu_s_per_audit"], ".2f"))  # fmt: skip
        console.print(cost)
    console.print("goals: " + ", ".join(f"{k} {'≤' if k == 'audit_compute_fraction' else '='} "
                                        f"{v}" for k, v in GOALS.items()))  # fmt: skip
    console.print("summary: " + ", ".join(f"{k} {fmt(v)}" for k, v in summary.items()))
    return {**summary, **{f"goal_{k}": v for k, v in GOALS.items()}, **flat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 honest rounds, 4 with an attacker")
    parser.add_argument("--rounds", type=int, default=40, help="versions of the honest run")
    parser.add_argument("--attack-rounds", type=int, default=10,
                        help="versions of a run with an attacker")  # fmt: skip
    parser.add_argument("--round-leases", type=int, default=4,
                        help="the coordinator's leases.round_leases")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32, help="the run's rl.max_tokens")
    parser.add_argument("--trusted-after", type=int, default=10,
                        help="the coordinator's audits.trusted_after")  # fmt: skip
    parser.add_argument("--floor-rate", type=float, default=AuditConfig().floor_rate,
                        help="the coordinator's audits.floor_rate")  # fmt: skip
    parser.add_argument("--catch-timeout", type=float, default=120,
                        help="seconds to wait after the run for the attacker's catch")  # fmt: skip
    parser.add_argument("--timeout-per-round", type=float, default=20)
    parser.add_argument("--only", action="append", default=[],
                        help="run only these scenarios (honest, or an attack's name)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "trust.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.attack_rounds = 12, 4
    known = {"honest", *(a.key for a in ATTACKS)}
    if unknown := set(args.only) - known:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {sorted(known)}")
    # Ctrl+C and SIGTERM stop the network's processes (each in a session of its own), however
    # this was started (a background job inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cache = data_dir()
    tiny = tiny_model(cache)
    plan: list[Attack | None] = [None, *ATTACKS]
    plan = [a for a in plan if not args.only or (a.key if a else "honest") in args.only]
    results: dict[str, dict[str, Any]] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())  # fmt: skip
    try:
        with Progress(*columns, console=console) as progress:
            for attack in plan:
                key = attack.key if attack else "honest"
                results[key] = play(attack, args, cache, tiny, progress)
    except KeyboardInterrupt:  # play() stopped its network on the way out
        console.print("[yellow]interrupted: every process stopped, no result written")
        sys.exit(130)
    result = report(results, args)
    result.update(quick=int(args.quick), rounds=args.rounds, attack_rounds=args.attack_rounds,
                  round_leases=args.round_leases, max_tokens=args.max_tokens,
                  trusted_after=args.trusted_after, floor_rate=args.floor_rate)  # fmt: skip
    write_result(args.out, result)
    if result["scenarios_failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
