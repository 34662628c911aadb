"""``python -m tests.integration.stalling_node node start ...``: the real node CLI, whose
inference role takes a lease and then never delivers it — a node that hangs or is about to be
killed. Everything else (identity, join, heartbeats, model loading) is the real node."""

from __future__ import annotations

import functools
import logging

import trio

import node.main
from node.roles.inference import InferenceRole
from protocol.leases import Lease

log = logging.getLogger(__name__)


class StallingRole(InferenceRole):
    async def work(self, lease: Lease) -> None:
        log.warning("stalling on lease %s", lease.lease_id)
        await trio.sleep_forever()


if __name__ == "__main__":
    node.main.start_node = functools.partial(node.main.start_node, inference_cls=StallingRole)
    from bazaar.cli import app

    app(prog_name="bazaar")
