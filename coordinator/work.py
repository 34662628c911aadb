"""The coordinator's rollout work: runs, leases and receipts, kept in the database.

Inference nodes speak to it over the lease protocol (``/bazaar/leases/1.0.0``, signed both ways):
``LeaseRequest`` → ``Lease`` or ``NoLease``, and ``RolloutReceipt`` → ``ReceiptAck``. Every change
is written to the database before the answer goes out, so a lease a node holds, or a receipt it
was told counted, survives a coordinator restart. Writes go through one lock and each takes its
snapshot inside it, so the database never moves backwards when two requests race.

Who may ask is the server's call (members with the inference role); which leases and which
receipts count is the lease book's (``coordinator/leases.py``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import msgspec
import trio

from coordinator.audits import Audit, AuditBook, Penalty, Trust, VerdictRecord
from coordinator.billing import Billing
from coordinator.config import AuditConfig, LeaseConfig
from coordinator.db import (
    AdapterRow,
    Base,
    LedgerRow,
    ReceiptRow,
    ReportRow,
    TrustRow,
    VerdictRow,
    WorkStore,
)
from coordinator.leases import LeaseBook, LeaseState, ReceiptOutcome, RunState
from coordinator.metrics import CoordinatorMetrics
from coordinator.reports import ReportBook
from coordinator.rows import (
    adapter_row,
    audit_row,
    lease_row,
    lease_state,
    ledger_row,
    report_row,
    run_row,
    run_state,
)
from coordinator.runs import RunSpec, plan_run
from envs import load_environment
from protocol.accounts import ApiKey, KeyStore
from protocol.adapters import (
    AdapterManifest,
    ManifestAck,
    NoTraining,
    ReportAck,
    RolloutRef,
    RoundReport,
    TrainAssignment,
    TrainRequest,
    VersionInfo,
    VersionsReply,
    VersionsRequest,
)
from protocol.codec import encode_body
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.membership import PeerRecord
from protocol.rollouts import ReceiptAck, RolloutReceipt
from protocol.verification import AuditAssignment, AuditRequest, NoAudit, Verdict, VerdictAck

log = logging.getLogger(__name__)


class RolloutService:
    def __init__(
        self,
        config: LeaseConfig,
        audit_config: AuditConfig,
        store: WorkStore,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float],
        accounts: KeyStore | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.book = LeaseBook(clock)
        self.audits = AuditBook(audit_config, clock)
        self._db_lock = trio.Lock()
        self.versions: dict[str, dict[int, AdapterRow]] = {}
        """Each run's recorded adapter versions."""
        self.held: dict[str, dict[str, int]] = {}
        """The adapter versions each node last said it holds (with its lease requests)."""
        self.reports = ReportBook()
        self.billing = Billing(accounts, clock)

    def restore(self) -> None:
        """Load runs and leases from the database (blocking: call before serving)."""
        run_rows, lease_rows = self.store.load()
        runs = [run_state(r) for r in run_rows]
        leases = [lease_state(r) for r in lease_rows]
        self.book.restore(runs, leases)
        for row in self.store.load_adapters():
            self.versions.setdefault(row.run_id, {})[row.version] = row
        for report in self.store.load_reports():
            self.reports.add(report)
        self.billing.restore(self.store.load_ledger(), runs)
        for run in runs:
            if run.state in ("queued", "running"):
                try:  # a task library uninstalled since, say: the run cannot go on
                    load_environment(run.plan.env)
                except ValueError as e:
                    run.state, run.stop_reason = "failed", f"environment: {e}"[:200]
                    self.store.save([run_row(run)])
                    log.error("run %s failed: %s", run.plan.run_id, run.stop_reason,
                              extra={"run_id": run.plan.run_id})  # fmt: skip
        trust_rows, audit_rows, verdict_rows = self.store.load_audits()
        for t in trust_rows:
            self.audits.trust[t.peer_id] = Trust(**t.record)
        for a in audit_rows:
            status = "pending" if a.status == "assigned" else a.status  # its verifier is gone
            self.audits.audits[a.audit_id] = Audit(
                a.audit_id, a.lease_id, a.run_id, a.producer, a.payload_hash, a.created_at,
                a.stage, status,
            )  # fmt: skip
        for v in verdict_rows:
            if v.audit_id in self.audits.audits:
                self.audits.audits[v.audit_id].verdicts.append(
                    VerdictRecord(v.verifier, v.passed, v.failed_check, v.detail, v.frame, v.at)
                )
        if runs or audit_rows:
            log.info(
                "restored %d runs, %d leases and %d audits from the database",
                len(runs),
                len(leases),
                len(audit_rows),
            )

    # -- runs ---------------------------------------------------------------------------------

    async def create_run(self, spec: RunSpec, owner: ApiKey | None = None) -> RunState:
        """Add a run, billed to ``owner``; ``ValueError`` for a bad spec or a taken run id.
        Beyond ``max_running_runs`` it waits, ``queued``."""
        if spec.name and spec.name in self.book.runs:
            raise ValueError(f"run {spec.name!r} already exists")
        plan = await trio.to_thread.run_sync(plan_run, spec)  # may import a task library
        running = self._running()
        run = self.book.add_run(
            plan, "queued" if running >= self.config.max_running_runs else "running"
        )
        if owner is not None:
            run.owner, run.owner_key_id = owner.name, owner.id
        await self._save(runs=[run])
        log.info(
            "run %s %s: %s, %s examples x %d samples on %s, billed to %s",
            plan.run_id, "created" if run.state == "running" else "queued", plan.env,
            plan.total_examples or "unlimited", plan.group_size, plan.base_model,
            run.owner or "no one", extra={"run_id": plan.run_id},
        )  # fmt: skip
        return run

    def _running(self) -> int:
        return sum(r.state == "running" for r in self.book.runs.values())

    async def finish(self, run: RunState, state: str, reason: str) -> None:
        """A run stops (``completed`` for ``reason``, ``cancelled``, ``failed``): no more
        leases or rounds; the oldest queued run starts."""
        if run.state not in ("queued", "running"):
            return
        run.state, run.stop_reason = state, reason
        await self._ended(run)

    async def _ended(self, run: RunState) -> None:
        await self.billing.close_reported(run)
        started = []
        running = self._running()
        for queued in sorted((r for r in self.book.runs.values() if r.state == "queued"),
                             key=lambda r: r.created_at):  # fmt: skip
            if running >= self.config.max_running_runs:
                break
            queued.state, running = "running", running + 1
            started.append(queued)
        await self._save(runs=[run, *started])
        log.info("run %s %s (%s)", run.plan.run_id, run.state, run.stop_reason,
                 extra={"run_id": run.plan.run_id})  # fmt: skip
        for r in started:
            log.info("run %s starts (was queued)", r.plan.run_id, extra={"run_id": r.plan.run_id})

    async def deploy(self, run: RunState, version: int) -> None:
        """Serve ``version`` as model ``<run>``; ``ValueError`` if no such version was made."""
        if version not in self.versions.get(run.plan.run_id, {}):
            raise ValueError(f"run {run.plan.run_id!r} has no adapter version {version}")
        run.deployed = version
        await self._save(runs=[run])
        log.info("run %s deploys version %d", run.plan.run_id, version,
                 extra={"run_id": run.plan.run_id})  # fmt: skip

    async def cancel_run(self, run: RunState) -> None:
        await self.finish(run, "cancelled", "cancelled")

    # -- adapter versions -----------------------------------------------------------------------

    async def record_manifest(self, peer: str, msg: AdapterManifest, frame: bytes) -> ManifestAck:
        """A trainer's manifest of a new version: the run's next version if it is the next
        one; the same manifest from another trainer of the round adds a holder."""
        run = self.book.runs.get(msg.run_id)
        if run is None:
            return ManifestAck(outcome="unknown_run", version=0, detail=f"no run {msg.run_id!r}")
        digest = hashlib.sha256(encode_body(msg)).hexdigest()
        held = self.versions.setdefault(msg.run_id, {})
        current = run.policy_version
        if msg.version == current and current in held:
            row = held[current]
            if row.manifest_hash != digest:
                log.warning("trainer %s sent another manifest for %s v%d", peer, msg.run_id,
                            current, extra={"run_id": msg.run_id})  # fmt: skip
                return ManifestAck(outcome="conflict", version=current,
                                   detail="a different manifest holds this version")  # fmt: skip
            if peer not in row.signers:
                row.signers = [*row.signers, peer]
                await self._save(adapters=[row])
            return ManifestAck(outcome="duplicate", version=current)
        if msg.version != current + 1 or msg.parent_version != current:
            detail = f"the next version is {current + 1}, from {current}"
            return ManifestAck(outcome="stale", version=current, detail=detail)
        row = AdapterRow(run_id=msg.run_id, version=msg.version, manifest_hash=digest,
                         frame=frame, signers=[peer], created_at=self.book.clock())  # fmt: skip
        held[msg.version] = row
        self.book.set_policy_version(msg.run_id, msg.version)
        await self._save(runs=[run], adapters=[row])
        log.info("run %s is at version %d (manifest from %s)", msg.run_id, msg.version, peer,
                 extra={"run_id": msg.run_id})  # fmt: skip
        if run.plan.max_rounds is not None and msg.version >= run.plan.max_rounds:
            await self.finish(run, "completed", "max_rounds")
        return ManifestAck(outcome="recorded", version=msg.version)

    def current_versions(
        self, req: VersionsRequest, addrs_of: Callable[[str], list[str]]
    ) -> VersionsReply:
        """The current version of every running run on the request's base model (or the one
        version it names), with its holders: the trainers that made it first, then nodes that
        hold it."""
        wanted: list[tuple[str, int]] = []
        if req.run_id is not None and req.version is not None:
            wanted = [(req.run_id, req.version)]
        else:
            wanted = [(r.plan.run_id, r.policy_version) for r in self.book.runs.values()
                      if r.state == "running" and r.plan.base_model == req.base_model]  # fmt: skip
        deployed = [(r.plan.run_id, r.deployed) for r in self.book.runs.values()
                     if r.deployed is not None and r.plan.base_model == req.base_model]  # fmt: skip

        def infos(pairs: list[tuple[str, int]]) -> list[VersionInfo]:
            out = []
            for run_id, v in pairs:
                row = self.versions.get(run_id, {}).get(v)
                run = self.book.runs.get(run_id)
                if row is None or run is None or run.plan.base_model != req.base_model:
                    continue
                nodes = [p for p, held in self.held.items()
                         if held.get(run_id) == v and p not in row.signers]  # fmt: skip
                holders = [PeerRecord(p, addrs_of(p)[:16]) for p in [*row.signers, *nodes][:64]]
                out.append(VersionInfo(run_id, v, row.frame, holders, min(len(row.signers), 64)))
            return out[:32]

        return VersionsReply(versions=infos(wanted), deployed=infos(deployed))

    async def train(
        self,
        peer: str,
        req: TrainRequest,
        trainers: list[str],
        addrs_of: Callable[[str], list[str]],
        hivemind_peers: list[str],
    ) -> TrainAssignment | NoTraining:
        """A trainer's share of the next round of a run on its base model.

        A round of version ``v`` takes ``round_leases`` counted rollouts per live trainer from
        the run's staleness window (the newest versions first, then in order of delivery) and
        deals them round robin over the trainers;
        the first trainer to ask fixes the round's rollouts (``trained_in``), so the others get
        the rest of the same set, and the rollouts delivered meanwhile wait for the next round.
        """
        for run in self.book.runs.values():
            if run.state != "running" or run.plan.base_model != req.base_model:
                continue
            if peer not in trainers:
                continue
            v, k = run.policy_version, len(trainers)
            ready = sorted(
                (s for s in self.book.leases.values()
                 if s.lease.run_id == run.plan.run_id and self.book.trainable(run, s)),
                key=lambda s: (s.trained_in != v, -s.lease.policy_version,
                               s.completed_at or 0.0, s.lease.lease_id),
            )  # fmt: skip
            dealt = [s for s in ready if s.trained_in == v]
            if not dealt:
                if len(ready) < self.config.round_leases * k:
                    continue
                dealt = ready[: self.config.round_leases * k]
                if not await self.billing.admit_round(run, v, dealt):
                    await self.finish(run, "completed", "budget")
                    continue
                for s in dealt:
                    s.trained_in = v
            rank = trainers.index(peer)
            share = dealt[rank::k]
            if not share:
                continue
            for s in share:
                s.trained_by = peer
            self.billing.dealt(run.plan.run_id, v, peer)
            await self._save(leases=dealt)
            refs = [RolloutRef(s.lease, s.node, addrs_of(s.node)[:16], s.payload_hash or b"")
                    for s in share]  # fmt: skip
            return TrainAssignment(run_id=run.plan.run_id, version=v, rollouts=refs, rank=rank,
                                   group_size=k, hivemind_peers=hivemind_peers[:16],
                                   settings=run.plan.training)  # fmt: skip
        return NoTraining(retry_after_s=self.config.retry_after_s)

    async def record_report(self, peer: str, msg: RoundReport) -> ReportAck:
        """A trainer's report of a round it trained (a resend replaces the earlier one)."""
        run = self.book.runs.get(msg.run_id)
        if run is None or msg.version > run.policy_version:
            return ReportAck(recorded=False, detail="no such run, or a round not reached yet")
        row = ReportRow(
            run_id=msg.run_id, round=msg.version, trainer=peer,
            rewards=[msgspec.to_builtins(r) for r in msg.rewards],
            tokens_trained=msg.tokens_trained,
            samples=[msgspec.to_builtins(x) for x in msg.samples], at=self.book.clock(),
        )  # fmt: skip
        first = (msg.version, peer) not in self.reports.by_run.get(msg.run_id, {})
        if not first:  # what was billed stays billed
            row.tokens_trained = self.reports.by_run[msg.run_id][(msg.version, peer)].tokens_trained
        self.reports.add(row)
        entries = []
        made = self.versions.get(msg.run_id, {}).get(msg.version + 1)
        if first and made is not None and peer in made.signers:  # its round moved the model
            share = [s for s in self.book.leases.values() if s.lease.run_id == msg.run_id
                     and s.trained_in == msg.version and s.trained_by == peer]  # fmt: skip
            entries = await self.billing.charge_round(run, msg.version, peer, share,
                                                      msg.tokens_trained)  # fmt: skip
        self.billing.reported(run, msg.version, peer)
        await self.billing.close_reported(run)
        await self._save(reports=[row], ledger=entries)
        target = run.plan.target_reward
        if (
            target is not None
            and run.state == "running"
            and any(
                r["samples"] >= run.plan.min_samples and r["mean"] >= target
                for r in self.reports.rewards(msg.run_id)
            )
        ):
            await self.finish(run, "completed", "target_reward")
        return ReportAck(recorded=True)

    # -- the lease protocol -------------------------------------------------------------------

    async def lease(self, peer: str, req: LeaseRequest, trainers: int = 0) -> Lease | NoLease:
        """A lease for ``peer``. While ``trainers`` are on the network, a run has at most two
        rounds' worth of leases out or waiting for training (``round_leases`` per trainer, per
        round): one round is sampled while the trainers train the one before, and the rest of
        the run's examples wait for the versions made from them."""
        await self.expire()
        self.held[peer] = dict(req.adapter_versions)  # what it can serve to other nodes too
        lease = self.book.issue_for(
            peer,
            req.base_model,
            req.max_prompts,
            dict(req.adapter_versions),
            self.config.max_active_per_node,
            2 * self.config.round_leases * trainers if trainers else None,
        )
        if lease is None:
            return NoLease(retry_after_s=self.config.retry_after_s)
        run, state = self.book.runs[lease.run_id], self.book.leases[lease.lease_id]
        await self._save(runs=[run], leases=[state])
        self.metrics.leases_issued.inc()
        log.debug("lease %s (%d examples) to %s", lease.lease_id, len(lease.example_indices), peer)
        return lease

    async def receipt(self, peer: str, receipt: RolloutReceipt) -> ReceiptAck:
        run = self.book.runs.get(receipt.run_id)
        was = run.state if run else ""
        outcome = self.book.receipt(peer, receipt)
        state = self.book.leases.get(receipt.lease_id)
        row = ReceiptRow(
            lease_id=receipt.lease_id,
            run_id=receipt.run_id,
            node=peer,
            payload_hash=receipt.payload_hash,
            num_samples=receipt.num_samples,
            completion_tokens=receipt.completion_tokens,
            outcome=outcome.value,
            received_at=self.book.clock(),
        )
        known = state is not None and outcome not in (
            ReceiptOutcome.UNKNOWN_LEASE,
            ReceiptOutcome.WRONG_NODE,
        )
        await self._save(
            runs=[self.book.runs[receipt.run_id]] if known else [],
            leases=[state] if known and state is not None else [],
            receipts=[row],
        )
        self.metrics.receipts.labels(outcome.value).inc()
        counted = len(state.counted) if outcome is ReceiptOutcome.COUNTED and state else 0
        if outcome is ReceiptOutcome.COUNTED:
            self.metrics.rollout_tokens.inc(receipt.completion_tokens)
            self.audits.trust_of(peer).credited_tokens += receipt.completion_tokens
            # drawn now, after the receipt arrived: the producer could not know
            audit = self.audits.on_counted(
                receipt.lease_id, receipt.run_id, peer, receipt.payload_hash,
                self.book.runs[receipt.run_id].plan.audit_floor,
            )  # fmt: skip
            await self._save(audits=[audit] if audit else [], trust=[peer])
            if run is not None and was == "running" and run.state != "running":
                await self._ended(run)  # its last example delivered
        else:
            log.info("receipt for lease %s from %s: %s", receipt.lease_id, peer, outcome.value)
        return ReceiptAck(
            lease_id=receipt.lease_id, outcome=outcome.value, counted_examples=counted
        )

    # -- the audit protocol -------------------------------------------------------------------

    async def audit_request(
        self, peer: str, req: AuditRequest, addrs_of: Callable[[str], list[str]]
    ) -> AuditAssignment | NoAudit:
        audit = self.audits.assign(
            peer, lambda a: self.book.runs[a.run_id].plan.base_model == req.base_model
        )
        if audit is None:
            return NoAudit(retry_after_s=self.config.retry_after_s)
        await self._save(audits=[audit])
        run = self.book.runs[audit.run_id]
        lease = self.book.leases[audit.lease_id].lease
        return AuditAssignment(
            audit_id=audit.audit_id,
            lease=lease,
            producer=audit.producer,
            producer_addrs=addrs_of(audit.producer)[:16],
            payload_hash=audit.payload_hash,
            current_version=run.policy_version,
            # the lease fixed the version: the run moving on since is not the producer's doing
            max_staleness=max(0, run.policy_version - lease.policy_version),
            deadline_ms=int(audit.deadline * 1000),
        )

    async def verdict(self, peer: str, verdict: Verdict, frame: bytes) -> VerdictAck:
        outcome, penalty = self.audits.verdict(peer, verdict, frame)
        audit = self.audits.audits.get(verdict.audit_id)
        self.metrics.verdicts.labels(outcome).inc()
        if audit is None or outcome in ("unknown_audit", "wrong_verifier"):
            log.warning("verdict from %s refused: %s", peer, outcome)
            return VerdictAck(audit_id=verdict.audit_id, outcome=outcome)
        record = audit.verdicts[-1]
        row = VerdictRow(
            audit_id=audit.audit_id, verifier=peer, passed=record.passed,
            failed_check=record.failed_check, detail=record.detail, frame=frame, at=record.at,
        )  # fmt: skip
        tokens = self.book.leases[audit.lease_id].completion_tokens
        credit = self.billing.credit_verified(audit.run_id, audit.audit_id, peer, tokens)
        entries = [credit] if credit else []
        leases: list[LeaseState] = []
        if penalty is not None:
            leases = self._penalize(penalty)
            entries += self.billing.forfeit(
                audit.run_id, penalty.producer, [s.lease.lease_id for s in leases]
            )
        elif not verdict.passed:
            log.warning(
                "audit %s of %s failed %s (%s); asking a second verifier",
                audit.audit_id, audit.producer, verdict.failed_check, verdict.detail,
            )  # fmt: skip
        await self._save(
            runs=[self.book.runs[r] for r in {s.lease.run_id for s in leases}],
            leases=leases,
            audits=[audit] + [a for a in self.audits.audits.values() if a.status == "cancelled"],
            trust=[audit.producer],
            appended=[row],
            ledger=entries,
        )
        return VerdictAck(audit_id=verdict.audit_id, outcome=outcome)

    def _penalize(self, penalty: Penalty) -> list[LeaseState]:
        """Reject the rollout, quarantine the producer's unaudited work in the window, forfeit
        its credits there; returns the leases changed."""
        now = self.book.clock()
        window = self.audits.config.quarantine_window_s
        passed = {a.lease_id for a in self.audits.audits.values() if a.status == "passed"}
        rejected = self.book.leases[penalty.lease_id]
        quarantined = [
            s
            for s in self.book.leases.values()
            if s.node == penalty.producer
            and s.status == "completed"
            and s.counted
            and s.lease.lease_id not in passed
            and s.lease.lease_id != penalty.lease_id
            and (s.completed_at or 0.0) >= now - window
        ]
        forfeited = rejected.completion_tokens if rejected.counted else 0
        self.book.uncount(penalty.lease_id, "rejected")
        for s in quarantined:
            forfeited += s.completion_tokens
            self.book.uncount(s.lease.lease_id, "quarantined")
        self.audits.cancel_for({s.lease.lease_id for s in quarantined})
        trust = self.audits.trust_of(penalty.producer)
        trust.credited_tokens -= forfeited
        trust.forfeited_tokens += forfeited
        self.metrics.penalties.inc()
        log.warning(
            "confirmed %s failure by %s on lease %s: rollout rejected, %d receipts quarantined, "
            "%d tokens of credit forfeited, strike %d%s",
            penalty.failed_check, penalty.producer, penalty.lease_id, len(quarantined),
            forfeited, trust.strikes, "; banned" if penalty.banned else "",
            extra={"peer": penalty.producer, "lease_id": penalty.lease_id},
        )  # fmt: skip
        return [rejected, *quarantined]

    async def expire(self) -> None:
        self.audits.expire()
        expired = self.book.expire()
        if expired:
            self.metrics.leases_expired.inc(len(expired))
            for s in expired:
                log.info(
                    "lease %s of %s expired; %d examples go back to the queue",
                    s.lease.lease_id,
                    s.node,
                    len(s.lease.example_indices),
                )
            await self._save(leases=expired)

    async def expire_loop(self, period_s: float = 1.0) -> None:
        while True:
            await trio.sleep(period_s)
            await self.expire()

    # -- persistence --------------------------------------------------------------------------

    async def _save(
        self,
        runs: Sequence[RunState] = (),
        leases: Sequence[LeaseState] = (),
        receipts: Sequence[ReceiptRow] = (),
        audits: Sequence[Audit] = (),
        trust: Sequence[str] = (),
        appended: Sequence[VerdictRow] = (),
        adapters: Sequence[AdapterRow] = (),
        reports: Sequence[ReportRow] = (),
        ledger: Sequence[LedgerRow] = (),
    ) -> None:
        async with self._db_lock:
            rows: list[Base] = [run_row(r) for r in runs]
            rows += [adapter_row(a) for a in adapters]
            rows += [report_row(r) for r in reports]
            rows += [lease_row(s) for s in leases]
            rows += [audit_row(a) for a in audits]
            rows += [
                TrustRow(peer_id=p, record=vars(self.audits.trust_of(p)).copy()) for p in trust
            ]
            added = [*receipts, *appended, *(ledger_row(e) for e in ledger)]
            await trio.to_thread.run_sync(self.store.save, rows, added)

    # -- views (REST API) ---------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        counts = dict.fromkeys(("queued", "running", "completed", "failed", "cancelled"), 0)
        for run in self.book.runs.values():
            counts[run.state] = counts.get(run.state, 0) + 1
        for state, n in counts.items():
            self.metrics.runs.labels(state).set(n)
