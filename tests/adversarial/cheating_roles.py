"""The cheating node roles ``tests/adversarial/cheating_node.py`` runs: each a subclass of the
real role that changes one step. Kept apart from that entry point, which must import nothing
heavy at its top: a trainer's hivemind child process (``spawn``) imports the entry module again,
and hivemind cannot share a process with py-libp2p."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from node.roles.inference import InferenceRole
from node.roles.serving import ServingRole
from node.roles.trainer import TrainerRole
from protocol.adapters import RoundReport
from protocol.leases import Lease
from protocol.rollouts import ReceiptAck, RolloutPayload, RolloutReceipt
from protocol.tokenizers import unpack

if TYPE_CHECKING:  # the training package loads hivemind: never in a roles process
    from node.training.trainer import Trainer


class WithholdsPayloads(InferenceRole):
    """Submits receipts for payloads it does not keep, so no audit can ever check them."""

    async def deliver(
        self, lease: Lease, payload: RolloutPayload, frame: bytes, started: float
    ) -> None:
        await super().deliver(lease, payload, frame, started)
        self.store.evict(now=float("inf"))  # everything is past its retention now


class InflatesReceipts(InferenceRole):
    """Honest on leases sampled before version ``BAZAAR_CHEAT_FROM`` (by then some of its work
    was trained and paid for), then claims one more completion token than each payload holds."""

    async def submit(self, receipt: RolloutReceipt, attempts: int = 5) -> ReceiptAck | None:
        if receipt.policy_version >= int(os.environ.get("BAZAAR_CHEAT_FROM", "0")):
            receipt = msgspec.structs.replace(
                receipt, completion_tokens=receipt.completion_tokens + 1
            )
        return await super().submit(receipt, attempts)


class LiesInReports(TrainerRole):
    """Trains honestly, then reports every round's rewards as perfect (to trip the run's
    ``target_reward``) and ten times the tokens in each payload."""

    async def _report(self, report: RoundReport) -> None:
        rewards = [msgspec.structs.replace(r, reward_sum=float(r.samples),
                                           reward_sq_sum=float(r.samples))
                   for r in report.rewards]  # fmt: skip
        counts = [msgspec.structs.replace(c, tokens=10 * c.tokens) for c in report.counts]
        await super()._report(msgspec.structs.replace(report, rewards=rewards, counts=counts))


class PoisonsAdapter(TrainerRole):
    """Trains and all-reduces honestly, then publishes an adapter with its LoRA weights scaled
    tenfold: what the network would sample and serve if its manifest made the version."""

    def _adapter_files(self, trainer: Trainer) -> dict[str, bytes]:
        from safetensors.torch import load, save

        files = dict(super()._adapter_files(trainer))
        name = "adapter_model.safetensors"
        files[name] = save({k: 10 * v for k, v in load(files[name]).items()})
        return files


class SkipsInnerSteps(TrainerRole):
    """Takes none of its inner steps (the round's compute saved) and puts in the part of an
    empty round, claiming the round's pay like any trainer."""

    def _inner(self, trainer: Trainer, examples: list[Any], steps: int) -> Any:
        return trainer.inner([], steps)


class TrainsOnRolloutsNotDealt(TrainerRole):
    """Commits to its dealt rollouts but trains on completions that are none of them: each
    prompt paired with the next completion's tokens (rollouts of its own choosing)."""

    def _inner(self, trainer: Trainer, examples: list[Any], steps: int) -> Any:
        import dataclasses

        n = len(examples)
        other = [dataclasses.replace(c, tokens=examples[(i + 1) % n].tokens,
                                     behaviour=examples[(i + 1) % n].behaviour)
                 for i, c in enumerate(examples)]  # fmt: skip
        return trainer.inner(other, steps)


class ScalesItsPart(TrainerRole):
    """Puts its part into the all-reduce three times over (and commits to that): a bigger say
    in the version than its share."""

    def _inner(self, trainer: Trainer, examples: list[Any], steps: int) -> Any:
        import torch

        part, stats = trainer.inner(examples, steps)
        levels = trainer.quantizer.levels
        return torch.clamp(3 * part, -levels, levels), stats


class TampersAllReduce(TrainerRole):
    """Commits to its honest part, then puts it into the all-reduce three times over (a bigger
    say in the version than its share, where a replay of its part finds nothing wrong) and
    signs the step the all-reduce gave, unchecked."""

    def _reduce(
        self, trainer: Trainer, part: Any, tag: str, expected: int, me: str, wait_s: float
    ) -> Any:
        import torch

        levels = trainer.quantizer.levels
        return trainer.reduce(torch.clamp(3 * part, -levels, levels), tag, expected, me, wait_s)

    async def _vouch(self, a: Any, trainer: Trainer, part: Any, total: Any, me: str) -> Any:
        return total


class ForgesTokenizer(ServingRole):
    """Sends gateways a tokenizer of its own: the base model's with whole numbers and common
    words added as single tokens, so its answers would be counted short."""

    def tokenizer_files(self) -> bytes:
        from node.model.loading import load_tokenizer
        from protocol.tokenizers import pack_tokenizer

        honest = super().tokenizer_files()
        with tempfile.TemporaryDirectory() as tmp:
            tok = load_tokenizer(unpack(honest, Path(tmp)))
        tok.add_tokens([str(n) for n in range(10, 200)] + ["the", " the", "and"])
        return pack_tokenizer(tok)


ClaimsMoreTokens = InflatesReceipts
"""Claims one token more than every payload holds (``BAZAAR_CHEAT_FROM`` unset: from the start)."""

ROLES = {"WithholdsPayloads": "inference_cls", "InflatesReceipts": "inference_cls",
         "ClaimsMoreTokens": "inference_cls", "LiesInReports": "trainer_cls",
         "PoisonsAdapter": "trainer_cls", "SkipsInnerSteps": "trainer_cls",
         "TrainsOnRolloutsNotDealt": "trainer_cls", "ScalesItsPart": "trainer_cls",
         "TampersAllReduce": "trainer_cls", "ForgesTokenizer": "serving_cls"}  # fmt: skip
"""Each cheat, and the ``start_node`` argument its class replaces."""
