"""The verifier role: take an audit, fetch the producer's payload, recompute, return a verdict.

The loop, once the node has joined:

1. ask the coordinator for an audit (``AuditRequest`` on ``/bazaar/audits/1.0.0``, naming the
   base model this node runs); ``NoAudit`` says how long to wait;
2. fetch the payload over ``/bazaar/payload/1.0.0`` from the sources the assignment lists, in
   order (the producer while it is up, then the coordinator, which keeps a copy of every
   payload it recounted): whoever serves it, it must hash to the receipt's digest and be signed
   by the producer (``signature``); if no source serves it before the audit's deadline, the
   audit fails ``unavailable``;
3. run every check in the model process (``verification/checks.py``: lease, the receipt's
   token count counted again, version, seed, termination, reward, seeded replay, logprobs)
   with the calibrated thresholds of its dtype, at the adapter version the lease named (fetched
   first if this node lacks it);
4. sign a ``Verdict`` naming the first failed check and send it; the ``VerdictAck`` says whether
   it was recorded, sent to another verifier, confirmed, or cleared.

The coordinator may answer with a replay of a trainer's round instead (``ReplayAssignment``):
the verifier fetches the round's committed parts (from their trainers, else the coordinator,
which keeps them), the dealt payloads, the starting version and the one before it, and the
adapter the trainer signed; trains the round again from the same weights with a fresh AdamW
(``node/training/replay.py``, in a worker thread) and checks the part and the version against
it (``verification/training.py``); a ``ReplayVerdict`` goes back. What it could not fetch or
compute is ``unavailable`` or ``verifier_error``: not counted against the trainer.

Some audits are known answers — payloads whose verdict is already settled, sent to check this
verifier; nothing tells them apart, and a wrong answer costs strikes, pay and in the end a ban
(``coordinator/audits.py``). Verifiers are paid only for verdicts that agree with the decision.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import trio
from prometheus_client import Counter

from node.config import NodeConfig
from node.model.worker import ModelWorker
from node.roles.base import Role
from node.store.versions import VersionSync
from protocol.adapters import AdapterManifest
from protocol.envelope import open_envelope
from protocol.errors import ProtocolError
from protocol.payloads import Unserved, fetch_committed_part, fetch_rollout
from protocol.rollouts import Dtype, RolloutPayload
from protocol.verification import (
    AuditAssignment,
    AuditRequest,
    NoAudit,
    ReplayAssignment,
    ReplayVerdict,
    Verdict,
    VerdictAck,
)
from protocol.versions import AUDITS as AUDITS_PROTOCOL
from verification.training import TrainingCheck

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger(__name__)

LONG_POLL_S = 5.0
"""How long the coordinator may hold a request for work (``AuditRequest.wait_s``): half the
transport's request timeout."""


class VerifierRole(Role):
    name = "verifier"
    follows_versions = False  # it fetches the version an audit needs, when it needs it

    def __init__(
        self,
        config: NodeConfig,
        model: ModelWorker,
        versions: VersionSync,
        data_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.versions = versions
        self.adapters = versions.adapters
        self.data_dir = data_dir or Path(config.model_cache or ".")
        self.replayer: Any = None
        """The replays' trainer (``node/training/replay.py``), built at the first replay."""
        self._replaying = threading.Lock()
        """One replay at a time on the replayer, an abandoned one included."""

    async def run(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.versions.attach(agent)
        r = agent.metrics.registry
        self.verdicts = Counter(
            "bazaar_verdicts_sent", "Verdicts sent, by failed check", ["check"], registry=r
        )
        async with trio.open_nursery() as nursery:
            # loaded before the first request: an audit's deadline runs from its assignment
            if not await self.model.ensure_started(nursery):
                return
            while True:
                work = await self._next_audit()
                if isinstance(work, ReplayAssignment):
                    await self.replay(work)
                else:
                    await self.audit(work)

    async def _next_audit(self) -> AuditAssignment | ReplayAssignment:
        dtypes = [d for d in get_args(Dtype) if d in self.model.dtypes]
        profile = self.model.profile
        exact = profile.device if profile is not None and profile.threads else ""
        request = AuditRequest(
            base_model=self.config.model, wait_s=LONG_POLL_S, dtypes=dtypes, device=exact
        )
        while True:
            try:
                expect = (AuditAssignment, ReplayAssignment, NoAudit)
                reply = await self.agent.ask(request, expect, AUDITS_PROTOCOL)
            except ProtocolError as e:
                log.warning("audit request failed: %s", e)
                await trio.sleep(e.retry_after_s or self.config.reconnect_max_backoff_s)
                continue
            if isinstance(reply, (AuditAssignment, ReplayAssignment)):
                return reply
            if isinstance(reply, NoAudit):
                await trio.sleep(reply.retry_after_s)

    async def audit(self, a: AuditAssignment) -> None:
        started = time.monotonic()
        passed, check, detail, stats = await self.check(a)
        verdict = Verdict(
            audit_id=a.audit_id,
            lease_id=a.lease.lease_id,
            producer=a.producer,
            payload_hash=a.payload_hash,
            passed=passed,
            failed_check=check,
            detail=detail[:4000],
            stats=stats,
        )
        self.verdicts.labels(check or "passed").inc()
        try:
            ack = await self.agent.ask(verdict, VerdictAck, AUDITS_PROTOCOL)
        except ProtocolError as e:
            log.warning("verdict on audit %s not delivered: %s", a.audit_id, e)
            return
        log.info(
            "audit %s of %s: %s in %.2fs -> %s",
            a.audit_id,
            a.producer,
            "passed" if passed else f"failed {check} ({detail})",
            time.monotonic() - started,
            ack.outcome,
            extra={"audit_id": a.audit_id, "producer": a.producer},
        )

    async def replay(self, a: ReplayAssignment) -> None:
        """Replay a trainer's round and send the verdict (``node/training/replay.py``)."""
        started = time.monotonic()
        try:
            check = await self.check_replay(a)
        except Exception as e:  # fails closed, as "could not check": another verifier will
            log.exception("replay %s could not be checked", a.audit_id)
            check = TrainingCheck(False, "verifier_error", f"{type(e).__name__}: {e}")
        verdict = ReplayVerdict(audit_id=a.audit_id, trainer=a.trainer, passed=check.passed,
                                failed_check=check.check, detail=check.detail[:4000],
                                stats=dict(list(check.stats.items())[:64]))  # fmt: skip
        self.verdicts.labels(check.check or "passed").inc()
        try:
            ack = await self.agent.ask(verdict, VerdictAck, AUDITS_PROTOCOL)
        except ProtocolError as e:
            log.warning("verdict on replay %s not delivered: %s", a.audit_id, e)
            return
        log.info("replay %s of %s round %d: %s in %.2fs -> %s", a.audit_id, a.trainer, a.version,
                 "passed" if check.passed else f"failed {check.check} ({check.detail})",
                 time.monotonic() - started, ack.outcome,
                 extra={"audit_id": a.audit_id, "peer": a.trainer})  # fmt: skip

    async def check_replay(self, a: ReplayAssignment) -> TrainingCheck:
        """Fetch what the round was made of, then replay and check it in a worker thread."""
        from node.model.loading import resolve
        from node.store.adapters import assemble
        from node.store.shards import fetch_version
        from node.training.replay import Replayer

        host, me = self.agent.host, self.agent.identity
        parts = []
        for ref in a.parts:
            part = await self._fetch_part(ref.trainer, list(ref.addrs), ref.part_hash)
            if part is None:
                return TrainingCheck(False, "unavailable", f"part of {ref.trainer} not fetched")
            if (part.run_id, part.version) != (a.run_id, a.version):
                return TrainingCheck(False, "part_range", "a part of another round")
            parts.append(part)
        payloads = []
        for r in a.rollouts:
            got = await self.fetch_rollout(r.lease.lease_id, r.producer, list(r.producer_addrs),
                                           r.payload_hash, a.deadline_ms)  # fmt: skip
            if not isinstance(got, RolloutPayload):
                return TrainingCheck(False, "unavailable", got)
            payloads.append((r.lease, got))
        for v in {a.version, a.parent} - {0, -1}:
            if not await self.versions.ensure(a.run_id, v):
                return TrainingCheck(False, "verifier_error", f"{a.run_id} v{v} cannot be had")
        env = open_envelope(a.manifest, None)
        manifest = env.message
        group = {p.trainer for p in a.parts}  # the trainer signed it, or the same bytes as it
        if env.sender not in group or not isinstance(manifest, AdapterManifest):
            return TrainingCheck(False, "verifier_error", "the manifest is not the round's")
        seeds = [h.peer_id for h in a.holders]
        for h in a.holders:
            await host.connect_any(list(h.addrs))
        shards = await fetch_version(host, me, manifest, self.versions.shards, seeds)
        made = assemble(manifest, shards)

        def held(v: int) -> Path | None:
            if v <= 0:
                return None
            found = self.adapters.for_version(a.run_id, v)
            return Path(found[1]) if found else None

        if self.replayer is None:
            cache = self.config.model_cache or str(self.data_dir)
            self.replayer = Replayer(resolve(self.config.model, Path(cache)))
        replayer = self.replayer
        start = held(a.version)
        parent = held(a.parent) if a.version > 0 else None
        blobs, levels = [p.part for p in parts], parts[0].levels

        def replay() -> TrainingCheck:
            with self._replaying:
                return replayer.replay(a.run_id, a.settings, start, parent, payloads, blobs,
                                       levels, made)  # fmt: skip

        # abandoned when the node stops: a replay on a real model runs for minutes, and a
        # stopping node waited it out past its SIGTERM (the process ends with the thread)
        return await trio.to_thread.run_sync(replay, abandon_on_cancel=True)  # type: ignore[call-arg]

    async def _fetch_part(self, trainer: str, addrs: list[str], digest: bytes) -> Any:
        """A committed part, from its trainer, else from the coordinator (which keeps them)."""
        agent = self.agent
        return await fetch_committed_part(agent.host, agent.identity, trainer, addrs, digest,
                                          agent.coordinator_id)  # fmt: skip

    async def fetch_rollout(self, lease_id: str, producer: str, addrs: list[str], digest: bytes,
                            deadline_ms: int) -> RolloutPayload | str:  # fmt: skip
        """A payload from the first of its sources that serves it, or why none did (each
        source gets what is left before the deadline, and at least 1 s: a replay's deadline
        is the coordinator's clock)."""
        agent = self.agent
        try:
            timeout_s = max(1.0, deadline_ms / 1000 - time.time())
            env = await fetch_rollout(agent.host, agent.identity, producer, addrs, digest,
                                      timeout_s)  # fmt: skip
        except ProtocolError as e:
            return f"rollout {lease_id} not fetched: {e}"
        assert isinstance(env.message, RolloutPayload)
        return env.message

    async def check(self, a: AuditAssignment) -> tuple[bool, str, str, dict[str, float]]:
        """``(passed, failed check, detail, stats)``; fails closed on anything unexpected."""
        payload = await self.fetch(a)
        if isinstance(payload, tuple):
            return payload
        if not await self.versions.ensure(a.lease.run_id, a.lease.policy_version):
            detail = f"adapter {a.lease.run_id} v{a.lease.policy_version} cannot be fetched"
            return False, "verifier_error", detail, {}
        try:
            adapter = self.adapters.for_version(a.lease.run_id, a.lease.policy_version)
            outcome = await self.model.verify(
                a.lease, payload, a.current_version, a.max_staleness, adapter, a.completion_tokens
            )
        except ValueError as e:  # no such adapter here, or the model process could not check
            return False, "verifier_error", str(e), {}
        return outcome.passed, outcome.failed_check, outcome.detail, outcome.stats

    async def fetch(
        self, a: AuditAssignment
    ) -> RolloutPayload | tuple[bool, str, str, dict[str, float]]:
        """The payload from the first source that serves it before the audit's deadline (the
        producer's signature and the receipt's hash checked whoever serves it), or the failed
        verdict: ``signature`` if a source served a payload that is not the producer's, else
        ``unavailable``."""
        deadline = a.deadline_ms / 1000
        if deadline <= time.time():
            return False, "unavailable", "the audit's deadline passed before the fetch", {}
        agent = self.agent
        try:
            env = await fetch_rollout(agent.host, agent.identity, a.producer, a.producer_addrs,
                                      a.payload_hash, deadline - time.time(), deadline)  # fmt: skip
        except Unserved as e:
            return False, "signature" if e.forged else "unavailable", str(e), {}
        assert isinstance(env.message, RolloutPayload)  # fetch_rollout checked the type
        return env.message
