"""The trainer role: take a round from the coordinator, train, publish the next version.

The loop, once the node has joined with the trainer role:

1. ask the coordinator for a round (``TrainRequest`` on ``/bazaar/adapters/1.0.0``): the run,
   the version its rollouts were sampled at, this trainer's share of them (rank of group size),
   and the hivemind DHT peers of the run's trainers; ``NoTraining`` says when to ask again;
2. fetch each rollout's payload from its producer (hash and signature checked), rebuild the
   prompts from the lease and recompute rewards with the environment;
3. run a DiLoCo round (``node/training/trainer.py``) — H inner steps, the quantized
   pseudo-gradient averaged with the round's other trainers through hivemind (in a child
   process; alone, no averaging), the outer step — in a worker thread;
4. cut the new adapter into shards, serve them, and submit the signed manifest; every trainer
   of the round ends with the same bytes, so the coordinator records the first and counts the
   others as holders; publish the manifest on gossip (nodes fetch the version at once); then
   share the state, for trainers that join later.

A trainer whose weights are not at the round's version (it joined late, missed a round, or its
all-reduce group's result lost to another's) takes the published version first (``_recover``).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from node.config import NodeConfig
from node.roles.base import Role
from node.store.adapters import cut, read_files
from node.store.payloads import fetch_payload
from node.store.versions import VersionSync
from protocol.adapters import (
    AdapterManifest,
    ManifestAck,
    NoTraining,
    ReportAck,
    RoundReport,
    SampleText,
    TrainAssignment,
    TrainRequest,
    TrainSettings,
    VersionRewards,
)
from protocol.errors import ProtocolError
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload
from protocol.versions import ADAPTERS as ADAPTERS_PROTOCOL

if TYPE_CHECKING:
    from node.agent import NodeAgent

log = logging.getLogger(__name__)


class TrainerRole(Role):
    name = "trainer"

    def __init__(self, config: NodeConfig, data_dir: Path, versions: VersionSync) -> None:
        self.config, self.data_dir = config, data_dir
        self.versions = versions
        self.shards = versions.shards
        self.version = -1
        self.parts: Any = None  # (LoraTrainer, Quantizer, OuterOptimizer, tokenizer)
        self.built_for: tuple[str, Any] | None = None  # the run and settings parts are for
        self.collective: Any = None

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
            if self.collective is not None:
                self.collective.close()

    async def round(self, a: TrainAssignment) -> None:
        if self.built_for != (a.run_id, a.settings):  # a trainer trains one run at a time
            if self.collective is not None:
                await trio.to_thread.run_sync(self.collective.close)
                self.collective = None
            self.parts = await trio.to_thread.run_sync(self._build, a.run_id, a.settings)
            self.built_for, self.version = (a.run_id, a.settings), 0
        trainer, quantizer, outer, tokenizer = self.parts
        if a.group_size > 1 and self.collective is None:
            self.collective = await trio.to_thread.run_sync(self._collective, a, trainer)
        if self.version != a.version and not await self._recover(a):
            log.warning("at version %d, the round is at %d: skipped", self.version, a.version)
            await trio.sleep(1.0)
            return
        examples, report = await self._examples(a, tokenizer)
        if not report.rewards:  # not one payload fetched: its producers may come back
            log.warning("no rollout of the round of %s v%d could be fetched; asking again",
                        a.run_id, a.version)  # fmt: skip
            await trio.sleep(1.0)
            return
        if not examples:
            log.info("the round of %s v%d has no learning signal (every group's completions "
                     "scored alike): its version takes no inner step", a.run_id, a.version,
                     extra={"run_id": a.run_id})  # fmt: skip
        from node.training.trainer import diloco_round, export_state, inner_batches

        batches = inner_batches(examples, a.settings.inner_steps)

        tag = f"{a.run_id}@{a.version}"

        def average(q: Any) -> tuple[Any, int]:
            if self.collective is None:
                return q, 1
            result = self.collective.average(q, tag, a.group_size)
            return result.integer_sum, result.group_size

        _, stats, k = await trio.to_thread.run_sync(
            diloco_round, trainer, batches, quantizer, outer, average
        )
        self.version = a.version + 1
        manifest = await trio.to_thread.run_sync(self._publish, a.run_id, trainer)
        ack = await self.agent.ask(manifest, (ManifestAck,), ADAPTERS_PROTOCOL)
        loss = stats[-1].loss if stats else float("nan")
        log.info("trained %s v%d from %d completions in a group of %d (loss %.4f): %s",
                 a.run_id, self.version, len(examples), k, loss, ack.outcome,
                 extra={"run_id": a.run_id})  # fmt: skip
        if ack.outcome in ("recorded", "duplicate"):
            await self.agent.publish_manifest(manifest)
        else:  # another group's result holds the version: recover from it next round
            self.version = -1
        await self._report(msgspec.structs.replace(
            report, tokens_trained=sum(len(c.tokens) for c in examples)
        ))  # fmt: skip
        if self.collective is not None:
            state = export_state(self.version, trainer, quantizer, outer)
            await trio.to_thread.run_sync(self.collective.share_state, *state)

    async def _report(self, report: RoundReport) -> None:
        try:
            ack = await self.agent.ask(report, (ReportAck,), ADAPTERS_PROTOCOL)
        except ProtocolError as e:
            log.warning("round report not delivered: %s", e)
            return
        if not ack.recorded:
            log.warning("round report refused: %s", ack.detail)

    def _build(self, run_id: str, settings: TrainSettings) -> tuple[Any, ...]:
        from transformers import AutoTokenizer

        from node.model.loading import resolve
        from node.training.trainer import trainer_parts

        base = resolve(self.config.model, Path(self.config.model_cache or self.data_dir))
        trainer, quantizer, outer = trainer_parts(base, run_id, settings)
        self.base_hash = hashlib.sha256(base.encode()).digest()  # the base's reference
        self.v0 = trainer.flat()  # version 0, the same on every trainer of the run
        return trainer, quantizer, outer, AutoTokenizer.from_pretrained(base)

    def _collective(self, a: TrainAssignment, trainer: Any) -> Any:
        from node.training.collective import Collective, CollectiveSpec

        spec = CollectiveSpec(list(a.hivemind_peers), a.run_id, sum(trainer.sizes),
                              target_group_size=8, round_timeout_s=30,
                              wire=a.settings.wire)  # fmt: skip
        collective = Collective(spec)
        collective.start()
        return collective

    async def _recover(self, a: TrainAssignment) -> bool:
        """Take the run's published state at the round's version: a trainer that joins late,
        missed rounds, or whose result lost to another group's (``conflict``) loads the
        version's adapter (fetched like any node's) and derives the quantizer scales from it and
        the version before, as every trainer did. With outer momentum, the momentum comes from a
        peer's shared state, accepted only if its weights are the published ones."""
        from node.training.trainer import import_state

        trainer, quantizer, outer, _ = self.parts
        run, v = a.run_id, a.version
        for needed in {v, v - 1} - {0, -1}:
            if not await self.versions.ensure(run, needed):
                return False

        def weights(version: int) -> Any:
            if version == 0:
                return self.v0
            _, path = self.versions.adapters.for_version(run, version) or ("", "")
            return trainer.adapter_weights(Path(path))

        def load() -> Any:
            w = weights(v)
            trainer.load_flat(w)
            quantizer.residual, outer.buffer = None, None
            if v == 0:
                quantizer.scales = [quantizer.initial_scale] * len(quantizer.sizes)
            else:
                quantizer.rescale((weights(v - 1) - w) / outer.lr)
            return w

        published = await trio.to_thread.run_sync(load)
        if outer.momentum and v > 0:
            state = None
            if self.collective is not None:
                state = await trio.to_thread.run_sync(self.collective.load_state, 30.0)
            if state is None or state[0].get("version") != v:
                return False
            import_state(state, trainer, quantizer, outer)
            if not bool((trainer.flat() == published).all()):
                log.warning("a peer's shared state is not version %d as published", v)
                trainer.load_flat(published)
                return False
        self.version = v
        log.info("took %s v%d from the published adapter", run, v, extra={"run_id": run})
        return True

    async def _examples(self, a: TrainAssignment, tokenizer: Any) -> tuple[list[Any], RoundReport]:
        """The round's training completions, and the report of what they were: every sampled
        completion's recomputed reward by version (groups without spread included), and a few
        of those trained on as text."""
        from envs import load_environment
        from node.training.trainer import training_examples
        from verification.rollouts import score_rollouts

        out: list[Any] = []
        totals: dict[int, list[float]] = {}
        texts: list[SampleText] = []
        std = a.settings.std_normalize
        for ref in a.rollouts:
            await self.agent.host.connect_any(list(ref.producer_addrs))
            try:
                env_ = await fetch_payload(self.agent.host, self.agent.identity, ref.producer,
                                           ref.payload_hash)  # fmt: skip
            except (ProtocolError, OSError, trio.TooSlowError) as e:
                log.warning("rollout %s not fetched: %s", ref.lease.lease_id, e)
                continue
            payload = env_.message
            assert isinstance(payload, RolloutPayload)
            env = load_environment(ref.lease.env_id)
            lease = ref.lease

            def score(env: Any = env, lease: Lease = lease, payload: Any = payload) -> Any:
                scores = score_rollouts(env, tokenizer, lease, payload)
                return scores, training_examples(env, tokenizer, lease, payload, std, scores)

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
                    ))  # fmt: skip
        rewards = [VersionRewards(v, int(n), total, sq) for v, (n, total, sq) in totals.items()]
        report = RoundReport(run_id=a.run_id, version=a.version, rewards=rewards[:64],
                             tokens_trained=0, samples=texts)  # fmt: skip
        return out, report

    def _publish(self, run_id: str, trainer: Any) -> AdapterManifest:
        with tempfile.TemporaryDirectory() as tmp:
            files = read_files(trainer.save(Path(tmp) / "adapter"))
        infos, shards = cut(files)
        for s in shards:
            self.shards.put(s)
        self.versions.adapters.add(run_id, self.version, files)  # for this node's other roles
        return AdapterManifest(
            run_id=run_id, version=self.version, parent_version=self.version - 1,
            base_model_hash=self.base_hash, shards=infos, total_bytes=sum(i.size for i in infos),
        )  # fmt: skip
