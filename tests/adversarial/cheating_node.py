"""``python -m tests.adversarial.cheating_node node start ...``: the real node CLI with one part
swapped for a cheat named by ``BAZAAR_CHEAT``: a producer class of ``tests/adversarial/
cheaters.py`` (run in the node's model process; default ``InflatedLogprobs``), or
``WithholdsPayloads``, an inference role that hands in receipts but never keeps the payloads.
Everything else is the real node."""

from __future__ import annotations

import functools
import os

import node.main
from node.roles.inference import InferenceRole
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload


class WithholdsPayloads(InferenceRole):
    """Submits receipts for payloads it does not keep, so no audit can ever check them."""

    async def deliver(
        self, lease: Lease, payload: RolloutPayload, frame: bytes, started: float
    ) -> None:
        await super().deliver(lease, payload, frame, started)
        self.store.evict(now=float("inf"))  # everything is past its retention now


if __name__ == "__main__":
    cheat = os.environ.get("BAZAAR_CHEAT", "InflatedLogprobs")
    if cheat == "WithholdsPayloads":
        patched = functools.partial(node.main.start_node, inference_cls=WithholdsPayloads)
    else:
        patched = functools.partial(
            node.main.start_node, producer=f"tests.adversarial.cheaters:{cheat}"
        )
    node.main.start_node = patched
    from bazaar.cli import app

    app(prog_name="bazaar")
