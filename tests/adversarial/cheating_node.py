"""``python -m tests.adversarial.cheating_node node start ...``: the real node CLI whose model
process runs a cheating producer (``BAZAAR_CHEAT``, default ``InflatedLogprobs`` from
``tests/adversarial/cheaters.py``). Everything else is the real node."""

from __future__ import annotations

import functools
import os

import node.main

if __name__ == "__main__":
    cheat = os.environ.get("BAZAAR_CHEAT", "InflatedLogprobs")
    node.main.start_node = functools.partial(
        node.main.start_node, producer=f"tests.adversarial.cheaters:{cheat}"
    )
    from bazaar.cli import app

    app(prog_name="bazaar")
