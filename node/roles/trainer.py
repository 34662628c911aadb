"""The trainer role: take a round from the coordinator, train, publish the next version.

The loop, once the node has joined with the trainer role:

1. ask the coordinator for a round (``TrainRequest`` on ``/bazaar/adapters/1.0.0``): the run,
   the version its rollouts were sampled at, this trainer's share of them (rank of group size),
   and the hivemind DHT peers of the run's trainers; ``NoTraining`` says when to ask again;
2. fetch each rollout's payload from its producer (hash and signature checked), count its
   tokens (the report carries the counts, signed: evidence the ledger reconciles against),
   rebuild the prompts from the lease and recompute rewards with the environment;
3. run a DiLoCo round on the run's ``Trainer`` (``node/training/trainer.py``): H inner steps
   from a fresh AdamW give this trainer's quantized part; it signs the part, serves it (by
   hash, with its adapter shards) and commits to it at the coordinator (``RoundCommitment``)
   *before* the all-reduce; then the parts are averaged with the round's other trainers
   through hivemind (in a child process; alone, no averaging) and the outer step taken — in a
   worker thread. A verifier may replay the round and check the part and the version against
   it (``verification/training.py``);
4. cut the new adapter into shards, serve them, and submit the signed manifest of the version
   the assignment names; the version is made once every trainer of the round signed the same
   manifest; publish the manifest on gossip (nodes fetch the version at once); then share the
   state, for trainers that join later.

A trainer whose weights are not at the round's version (it joined late, missed a round, or its
all-reduce group's result lost to another's) takes the published version first (``_recover``:
fetched here, loaded by ``Trainer.recover``). This role is the network side of a round; the
``Trainer`` owns everything that touches the model (build, round, recover, export).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from node.config import NodeConfig
from node.roles.base import Role
from node.store.adapters import cut
from node.store.versions import VersionSync
from node.training.collective import CollectiveSpec
from protocol.adapters import (
    AdapterManifest,
    CommitmentAck,
    LeaseCount,
    ManifestAck,
    NoTraining,
    ReportAck,
    RoundCommitment,
    RoundReport,
    SampleText,
    TrainAssignment,
    TrainingPart,
    TrainRequest,
    TurnText,
    VersionRewards,
    committed_part,
    parse_part,
)
from protocol.envelope import seal
from protocol.errors import DecodeError, ProtocolError
from protocol.leases import Lease
from protocol.payloads import fetch_committed_part, fetch_rollout
from protocol.rollouts import RolloutPayload
from protocol.runs import TrainSettings
from protocol.versions import ADAPTERS as ADAPTERS_PROTOCOL
from verification.rollouts import sample_tokens

if TYPE_CHECKING:
    from node.agent import NodeAgent
    from node.training.examples import Completion
    from node.training.trainer import Sum, Trainer

log = logging.getLogger(__name__)

PENDING_LIMIT_S = 600.0
"""How long a trainer keeps handing in a manifest the round's other trainers have not signed."""
GROUP_WAIT_MIN_S = 30.0
LONE_WAIT_S = CollectiveSpec.matchmaking_s + 2.0
"""How long a trainer dealt a round alone meets any other trainer that still works on it: one
whole matchmaking window (the collective tries no step its matchmaking time does not fit)."""
JOIN_ATTEMPTS = 5
"""Times in a row the trainer tries to join the all-reduce's DHT before its role stops (its
bootstrap peers may be restarting; a DHT that never starts is a fault of this node)."""


def group_wait_s(own_s: float, group_size: int = 2, co_trainers: int = 1) -> float:
    """How long a round's all-reduce waits for the group it was dealt to before this trainer
    goes on alone: at least ``GROUP_WAIT_MIN_S``, and twice what this trainer's own round took
    to get there (fetching, scoring, inner steps). Its partners do the same work from the same
    deal, so one up to twice as slow (a busier machine, a bigger model on a CPU) is still
    waited for; going alone too early makes each trainer sign its own manifest — a conflict,
    and the round trained again, as slowly as before.

    A round dealt to this trainer alone waits ``LONE_WAIT_S``, enough to meet a trainer dealt
    it earlier that still works on it, and not at all when the coordinator counts no other
    live trainer (the others left or were banned): no group can form, and waiting the full
    time for one made every round of a trainer left alone 30 s long."""
    if group_size > 1:
        return max(GROUP_WAIT_MIN_S, 2.0 * own_s)
    return LONE_WAIT_S if co_trainers else 0.0


def dht_moved(joined: Sequence[str], now: Sequence[str]) -> bool:
    """Whether the run's DHT bootstrap is elsewhere than where this trainer joined it: the
    coordinator restarted and started another. A trainer left in the old one never meets one
    that joined the new one (every round "could not find a group": each goes on alone, their
    manifests conflict, the round is trained again, for ever)."""
    return bool(now) and set(now) != set(joined)


class TrainerRole(Role):
    name = "trainer"

    def __init__(self, config: NodeConfig, data_dir: Path, versions: VersionSync) -> None:
        self.config, self.data_dir = config, data_dir
        self.versions = versions
        self.join_failures = 0
        """Failed starts of the all-reduce in a row."""
        self.shards = versions.shards
        self.trainer: Trainer | None = None
        self.built_for: tuple[str, TrainSettings] | None = None  # the run and settings it is for
        self.base_hash = b""  # the base model's reference, hashed, for manifests

    async def run(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.versions.attach(agent)
        try:
            while True:
                try:
                    request = TrainRequest(base_model=self.config.model)
                    expect = (TrainAssignment, NoTraining)
                    reply = await agent.ask(request, expect, ADAPTERS_PROTOCOL)
                except ProtocolError as e:
                    log.warning("training request failed: %s", e)
                    await trio.sleep(e.retry_after_s or self.config.reconnect_max_backoff_s)
                    continue
                if isinstance(reply, TrainAssignment):
                    await self.round(reply)
                elif isinstance(reply, NoTraining):
                    await trio.sleep(reply.retry_after_s)
        finally:
            if self.trainer is not None:
                self.trainer.close()

    async def round(self, a: TrainAssignment) -> None:
        started = trio.current_time()
        if self.trainer is None or self.built_for != (a.run_id, a.settings):
            if self.trainer is not None:  # a trainer trains one run at a time
                await trio.to_thread.run_sync(self.trainer.close)
            self.trainer = await trio.to_thread.run_sync(self._build, a.run_id, a.settings)
            self.built_for = (a.run_id, a.settings)
        trainer = self.trainer
        peers = list(a.hivemind_peers)
        if trainer.collective is not None and dht_moved(trainer.collective.spec.initial_peers,
                                                        peers):  # fmt: skip
            log.info("the trainers' DHT is elsewhere now (the coordinator restarted): joining "
                     "it again")  # fmt: skip
            await trio.to_thread.run_sync(trainer.close)
        if a.group_size > 1 and trainer.collective is None:
            try:
                await trio.to_thread.run_sync(
                    trainer.join, peers, a.run_id, a.settings.diloco.compression,
                    self.agent.host.peer_id,
                )  # fmt: skip
            except RuntimeError as e:  # its bootstrap peers restarting, say: ask again
                self.join_failures += 1
                if self.join_failures >= JOIN_ATTEMPTS:
                    raise
                log.warning("could not join the trainers' all-reduce (%s); asking again", e)
                await trio.sleep(2.0 * self.join_failures)
                return
            self.join_failures = 0
        if trainer.version != a.version and not await self._recover(a, trainer):
            log.warning("at version %d, the round is at %d: skipped", trainer.version, a.version)
            await trio.sleep(1.0)
            return
        examples, report = await self._examples(a, trainer)
        if not report.rewards:  # not one payload fetched: its producers may come back
            log.warning("no rollout of the round of %s v%d could be fetched; asking again",
                        a.run_id, a.version)  # fmt: skip
            await trio.sleep(1.0)
            return
        if not examples:
            log.info("the round of %s v%d has no learning signal (every group's completions "
                     "scored alike): its version takes no inner step", a.run_id, a.version,
                     extra={"run_id": a.run_id})  # fmt: skip
        part, stats = await trio.to_thread.run_sync(
            self._inner, trainer, examples, a.settings.diloco.inner_steps
        )
        digest = await self._commit(a, trainer, part, [c.lease_id for c in report.counts])
        if digest is None:
            trainer.version = -1  # the weights are this round's local ones: take the version
            await trio.sleep(1.0)
            return
        me = committed_part(self.agent.host.peer_id, digest)  # its name in the all-reduce
        wait_s = group_wait_s(trio.current_time() - started, a.group_size, len(a.co_trainers))
        reduced = await trio.to_thread.run_sync(
            self._reduce, trainer, part, f"{a.run_id}@{a.version}", a.group_size, me, wait_s
        )  # fmt: skip
        total = await self._vouch(a, trainer, part, reduced, me)
        if total is None:
            trainer.version = -1  # nothing signed: take the network's next round
            await trio.sleep(1.0)
            return
        trained = await trio.to_thread.run_sync(trainer.apply, total, stats, a.makes())
        group = list(trained.members) or [me]
        manifest = await trio.to_thread.run_sync(self._publish, a.run_id, trainer, a.version, group)
        ack = await self._submit(manifest)
        if ack is None:  # the version was never recorded: take the network's next round
            trainer.version = -1
            return
        loss = trained.stats[-1].loss if trained.stats else float("nan")
        log.info("trained %s v%d from %d completions in a group of %d (loss %.4f): %s",
                 a.run_id, trainer.version, len(examples), trained.group_size, loss,
                 ack.outcome, extra={"run_id": a.run_id})  # fmt: skip
        if ack.outcome in ("recorded", "duplicate"):
            await self.agent.publish_manifest(manifest)
        else:  # another group's result holds the version: recover from it next round
            trainer.version = -1
        await self._report(report)
        if trainer.collective is not None:
            await trio.to_thread.run_sync(trainer.share_state)

    async def _submit(self, manifest: AdapterManifest, attempts: int = 8) -> ManifestAck | None:
        """Hand the new version's manifest to the coordinator, again while it cannot be reached
        (a coordinator restarting holds the round open meanwhile), and again while the answer
        is ``pending`` (the round's other trainers have not signed theirs yet, for at most
        ``PENDING_LIMIT_S``); None if the coordinator stayed away."""
        backoff, failed = 0.5, 0
        give_up = trio.current_time() + PENDING_LIMIT_S
        while failed < attempts:
            try:
                ack = await self.agent.ask(manifest, (ManifestAck,), ADAPTERS_PROTOCOL)
            except ProtocolError as e:
                failed += 1
                log.warning("manifest of %s v%d not delivered (%s); attempt %d",
                            manifest.run_id, manifest.version, e, failed)  # fmt: skip
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)
                continue
            if ack.outcome != "pending" or trio.current_time() > give_up:
                return ack
            await trio.sleep(0.1)  # the coordinator waited for the others already
        log.error("gave up handing in %s v%d", manifest.run_id, manifest.version)
        return None

    async def _report(self, report: RoundReport) -> None:
        try:
            ack = await self.agent.ask(report, (ReportAck,), ADAPTERS_PROTOCOL)
        except ProtocolError as e:
            log.warning("round report not delivered: %s", e)
            return
        if not ack.recorded:
            log.warning("round report refused: %s", ack.detail)

    def _build(self, run_id: str, settings: TrainSettings) -> Trainer:
        from node.model.loading import resolve
        from node.training.trainer import Trainer

        base = resolve(self.config.model, Path(self.config.model_cache or self.data_dir))
        self.base_hash = hashlib.sha256(base.encode()).digest()
        return Trainer.build(base, run_id, settings)

    async def _recover(self, a: TrainAssignment, trainer: Trainer) -> bool:
        """Fetch the run's published versions the round's one is derived from (it and the one
        before, as any node fetches them), and take it (``Trainer.recover``)."""
        run, v, parent = a.run_id, a.version, a.parent_of_start()
        for needed in {v, parent} - {0, -1}:
            if not await self.versions.ensure(run, needed):
                return False

        def adapter_dir(version: int) -> Path:
            held = self.versions.adapters.for_version(run, version)
            assert held is not None  # only versions past 0 are read, and those were ensured
            return Path(held[1])

        if not await trio.to_thread.run_sync(trainer.recover, v, adapter_dir, parent):
            return False
        log.info("took %s v%d from the published adapter", run, v, extra={"run_id": run})
        return True

    async def _examples(
        self, a: TrainAssignment, trainer: Trainer
    ) -> tuple[list[Completion], RoundReport]:
        """The round's training completions, and the report of what they were: every sampled
        completion's recomputed reward by version (groups without spread included), and a few
        of those trained on as text."""
        from envs import load_environment

        out: list[Completion] = []
        totals: dict[int, list[float]] = {}
        texts: list[SampleText] = []
        counts: list[LeaseCount] = []
        tokenizer = trainer.tokenizer
        for ref in a.rollouts:
            try:  # from its producer, else from the coordinator's copy
                env_ = await fetch_rollout(self.agent.host, self.agent.identity, ref.producer,
                                           list(ref.producer_addrs), ref.payload_hash)  # fmt: skip
            except ProtocolError as e:
                log.warning("rollout %s not fetched: %s", ref.lease.lease_id, e)
                continue
            payload = env_.message
            assert isinstance(payload, RolloutPayload)
            try:  # my own count of what I train on: evidence the ledger reconciles against
                tokens = sum(len(sample_tokens(s)[0]) for s in payload.samples)
            except DecodeError as e:
                log.warning("rollout %s is malformed: %s", ref.lease.lease_id, e)
                continue
            counts.append(LeaseCount(ref.lease.lease_id, tokens))
            env = load_environment(ref.lease.env_id)
            lease = ref.lease

            def score(env: Any = env, lease: Lease = lease, payload: Any = payload) -> Any:
                return trainer.examples(env, lease, payload, a.settings.loss.std_normalize)

            scores, completions = await trio.to_thread.run_sync(score)
            out += completions
            t = totals.setdefault(lease.policy_version, [0, 0.0, 0.0])
            for group in scores:
                for sc in group:
                    t[0], t[1], t[2] = t[0] + 1, t[1] + sc.reward, t[2] + sc.reward**2
            for c in completions[:2]:  # two of each lease, up to 32 in all
                if len(texts) < 32:
                    texts.append(SampleText(
                        version=lease.policy_version, prompt=tokenizer.decode(c.prompt)[-4000:],
                        completion=tokenizer.decode(c.tokens)[:4000], reward=c.reward,
                        turns=turn_texts(tokenizer, c),
                    ))  # fmt: skip
        rewards = [VersionRewards(v, int(n), total, sq) for v, (n, total, sq) in totals.items()]
        report = RoundReport(run_id=a.run_id, version=a.version, rewards=rewards[:64],
                             samples=texts, counts=counts)  # fmt: skip
        return out, report

    def _adapter_files(self, trainer: Trainer) -> dict[str, bytes]:
        """The trained adapter's PEFT files, as this trainer publishes them."""
        return trainer.export()

    def _inner(self, trainer: Trainer, examples: list[Completion], steps: int) -> Any:
        """The round's inner steps: this trainer's part (``Trainer.inner``)."""
        return trainer.inner(examples, steps)

    def _reduce(
        self, trainer: Trainer, part: Any, tag: str, expected: int, me: str, wait_s: float
    ) -> Sum:
        """The all-reduce of the round's parts (``Trainer.reduce``)."""
        return trainer.reduce(part, tag, expected, me, wait_s)

    async def _vouch(
        self, a: TrainAssignment, trainer: Trainer, part: Any, total: Sum, me: str
    ) -> Sum | None:
        """The sum whose step this trainer signs: the all-reduce's, checked against the parts
        its members committed to (fetched from them, else from the coordinator). Where the two
        differ, someone put another part into the all-reduce than it committed: the committed
        parts' own sum is signed instead, so such a trainer moves no honest trainer's version —
        and a version that is not the step of its committed parts (the sum check of a replay)
        was signed by no honest trainer. None: a member's part cannot be had, so nothing is
        vouched for (the round is left to the others; the trainer takes the next one)."""
        import torch

        from node.training.trainer import Sum

        if total.parts == 1:
            return total
        addrs = {r.peer_id: list(r.addrs) for r in a.co_trainers}
        parts = [torch.as_tensor(part).to(torch.int64).view(-1)]
        if len(set(total.members)) != total.parts or me not in total.members:
            log.warning("the all-reduce of %s round %d named %s for %d parts: not signed",
                        a.run_id, a.version, list(total.members), total.parts)  # fmt: skip
            return None
        for name in sorted(set(total.members) - {me}):
            try:
                peer, digest = parse_part(name)
            except ValueError:
                log.warning("the all-reduce named a part %r: not signed", name[:80])
                return None
            got = await fetch_committed_part(self.agent.host, self.agent.identity, peer,
                                             addrs.get(peer, []), digest,
                                             self.agent.coordinator_id)  # fmt: skip
            if got is None or (got.run_id, got.version, got.levels) != (
                a.run_id, a.version, trainer.quantizer.levels
            ):  # fmt: skip
                log.warning("the part %s of %s round %d cannot be had: not signed", name[:80],
                            a.run_id, a.version)  # fmt: skip
                return None
            theirs = torch.frombuffer(bytearray(got.part), dtype=torch.int8).to(torch.int64)
            if theirs.shape != parts[0].shape:
                log.warning("the part %s has %d weights, not %d: not signed", name[:80],
                            theirs.numel(), parts[0].numel())  # fmt: skip
                return None
            parts.append(theirs)
        committed = torch.stack(parts).sum(dim=0)
        if torch.equal(committed, total.integer_sum.view(-1)):
            return total
        off = int((committed != total.integer_sum.view(-1)).sum())
        log.error("the all-reduce of %s round %d is not the sum of the parts its %d trainers "
                  "committed to (%d weights differ): one put another part in; signing the "
                  "step of the committed parts", a.run_id, a.version, total.parts, off,
                  extra={"run_id": a.run_id})  # fmt: skip
        return Sum(committed.view_as(total.integer_sum), total.parts, total.members)

    async def _commit(
        self, a: TrainAssignment, trainer: Trainer, part: Any, lease_ids: list[str]
    ) -> bytes | None:
        """Sign the round's part, serve it (with the adapter shards, by hash) and commit to it
        at the coordinator before the all-reduce: a replay of the round is checked against it.
        Its hash; None if the coordinator refused it or could not be reached."""
        import numpy as np

        body = TrainingPart(run_id=a.run_id, version=a.version, levels=trainer.quantizer.levels,
                            part=np.asarray(part, dtype=np.int8).tobytes())  # fmt: skip
        digest = self.shards.put(seal(self.agent.identity, body))
        commitment = RoundCommitment(run_id=a.run_id, version=a.version, part_hash=digest,
                                     lease_ids=lease_ids)  # fmt: skip
        for attempt in range(4):
            try:
                ack = await self.agent.ask(commitment, (CommitmentAck,), ADAPTERS_PROTOCOL)
            except ProtocolError as e:
                log.warning("commitment of %s round %d not delivered (%s); attempt %d",
                            a.run_id, a.version, e, attempt + 1)  # fmt: skip
                await trio.sleep(0.5 * 2**attempt)
                continue
            if not ack.accepted:
                log.warning("commitment of %s round %d refused: %s", a.run_id, a.version,
                            ack.detail)  # fmt: skip
            return digest if ack.accepted else None
        return None

    def _publish(
        self, run_id: str, trainer: Trainer, parent: int, group: list[str]
    ) -> AdapterManifest:
        files = self._adapter_files(trainer)
        infos, shards = cut(files)
        for s in shards:
            self.shards.put(s)
        self.versions.adapters.add(run_id, trainer.version, files)  # for this node's other roles
        return AdapterManifest(
            run_id=run_id, version=trainer.version, parent_version=parent,
            base_model_hash=self.base_hash, shards=infos, total_bytes=sum(i.size for i in infos),
            group=sorted(group),
        )  # fmt: skip


def turn_texts(tokenizer: Any, c: Completion, limit: int = 2000) -> list[TurnText]:
    """An episode's turns as text, the model's and the environment's (none: a single turn)."""
    if c.sampled is None:
        return []
    out: list[TurnText] = []
    start = 0
    for i in range(1, len(c.tokens) + 1):
        if i == len(c.tokens) or c.sampled[i] != c.sampled[start]:
            text = tokenizer.decode(c.tokens[start:i])[:limit]
            out.append(TurnText("model" if c.sampled[start] else "environment", text))
            start = i
    return out[:64]
