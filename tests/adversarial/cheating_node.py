"""``python -m tests.adversarial.cheating_node node start ...``: the real node CLI with one part
swapped for a cheat named by ``BAZAAR_CHEAT``: a producer class of ``tests/adversarial/
cheaters.py`` (run in the node's model process; default ``InflatedLogprobs``); one of the roles
of ``tests/adversarial/cheating_roles.py`` — ``WithholdsPayloads``, ``InflatesReceipts`` (alias
``ClaimsMoreTokens``), inference; ``LiesInReports``, ``PoisonsAdapter``, ``SkipsInnerSteps``,
``TrainsOnRolloutsNotDealt``, ``ScalesItsPart``, trainer; ``ForgesTokenizer``, serving; or a
verifier role of ``tests/adversarial/lying_verifiers.py``. Everything else is the real node."""

from __future__ import annotations

import functools
import os

if __name__ == "__main__":  # the hivemind child re-imports this module: nothing heavy above
    import node.main
    from tests.adversarial import cheating_roles, lying_verifiers

    cheat = os.environ.get("BAZAAR_CHEAT", "InflatedLogprobs")
    if cheat in cheating_roles.ROLES:
        role = getattr(cheating_roles, cheat)
        patched = functools.partial(node.main.start_node, **{cheating_roles.ROLES[cheat]: role})
    elif hasattr(lying_verifiers, cheat):
        patched = functools.partial(
            node.main.start_node, verifier_cls=getattr(lying_verifiers, cheat)
        )
    else:
        patched = functools.partial(
            node.main.start_node, producer=f"tests.adversarial.cheaters:{cheat}"
        )
    node.main.start_node = patched
    from bazaar.cli import app

    app(prog_name="bazaar")
