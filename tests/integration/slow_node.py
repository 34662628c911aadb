"""``python -m tests.integration.slow_node node start ...``: the real node CLI on a machine
``BAZAAR_SLOWDOWN`` times slower (default 5) at sampling: each lease's payload is handed over
only after ``BAZAAR_SLOWDOWN - 1`` times as long again as generating it took. Everything else
(identity, join, heartbeats, model, payloads, receipts) is the real node."""

from __future__ import annotations

import functools
import os
import time

import trio

import node.main
from node.roles.inference import InferenceRole
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload


class SlowRole(InferenceRole):
    slowdown = float(os.environ.get("BAZAAR_SLOWDOWN", "5"))

    async def generate(self, lease: Lease) -> RolloutPayload:
        started = time.monotonic()
        payload = await super().generate(lease)
        await trio.sleep((self.slowdown - 1) * (time.monotonic() - started))
        return payload


if __name__ == "__main__":
    node.main.start_node = functools.partial(node.main.start_node, inference_cls=SlowRole)
    from bazaar.cli import app

    app(prog_name="bazaar")
