"""``python -m tests.adversarial.cheating_node node start ...``: the real node CLI with one part
swapped for a cheat named by ``BAZAAR_CHEAT``: a producer class of ``tests/adversarial/
cheaters.py`` (run in the node's model process; default ``InflatedLogprobs``), or one of the
roles of ``tests/adversarial/cheating_roles.py`` — ``WithholdsPayloads``, ``InflatesReceipts``
(inference), ``LiesInReports`` (trainer). Everything else is the real node."""

from __future__ import annotations

import functools
import os

if __name__ == "__main__":  # the hivemind child re-imports this module: nothing heavy above
    import node.main
    from tests.adversarial import cheating_roles

    cheat = os.environ.get("BAZAAR_CHEAT", "InflatedLogprobs")
    if cheat in cheating_roles.ROLES:
        role = getattr(cheating_roles, cheat)
        patched = functools.partial(node.main.start_node, **{cheating_roles.ROLES[cheat]: role})
    else:
        patched = functools.partial(
            node.main.start_node, producer=f"tests.adversarial.cheaters:{cheat}"
        )
    node.main.start_node = patched
    from bazaar.cli import app

    app(prog_name="bazaar")
