"""``python -m tests.adversarial.cheating_node node start ...``: the real node CLI with one part
swapped for a cheat named by ``BAZAAR_CHEAT``: a producer class of ``tests/adversarial/
cheaters.py`` (run in the node's model process; default ``InflatedLogprobs``), or one of the
roles below — ``WithholdsPayloads``, ``InflatesReceipts`` (inference), ``LiesInReports``
(trainer). Everything else is the real node."""

from __future__ import annotations

import functools
import os

import msgspec

import node.main
from node.roles.inference import InferenceRole
from node.roles.trainer import TrainerRole
from protocol.adapters import RoundReport
from protocol.leases import Lease
from protocol.rollouts import ReceiptAck, RolloutPayload, RolloutReceipt


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


ROLES = {"WithholdsPayloads": "inference_cls", "InflatesReceipts": "inference_cls",
         "LiesInReports": "trainer_cls"}  # fmt: skip


if __name__ == "__main__":
    cheat = os.environ.get("BAZAAR_CHEAT", "InflatedLogprobs")
    if cheat in ROLES:
        patched = functools.partial(node.main.start_node, **{ROLES[cheat]: globals()[cheat]})
    else:
        patched = functools.partial(
            node.main.start_node, producer=f"tests.adversarial.cheaters:{cheat}"
        )
    node.main.start_node = patched
    from bazaar.cli import app

    app(prog_name="bazaar")
