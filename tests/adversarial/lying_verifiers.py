"""Lying verifiers: each a subclass of the node's real ``VerifierRole`` (``node/roles/verifier.py``)
changing one step — the verdict it reaches (``check``). ``cheating_node`` runs one inside a real
node process (``BAZAAR_CHEAT=<class name>``); the partner or target producer of the colluding
ones is named by its peer id in ``BAZAAR_PEER``. Everything else, the verdict's signature and
delivery included, is the real role."""

from __future__ import annotations

import os
from typing import Any

from node.roles.verifier import VerifierRole
from protocol.verification import AuditAssignment

Result = tuple[bool, str, str, dict[str, float]]


class FreeloadingVerifier(VerifierRole):
    """Passes every audit without fetching the payload: paid for checks it never makes."""

    async def check(self, a: AuditAssignment) -> Result:
        return True, "", "", {}


class FailingVerifier(VerifierRole):
    """Fails every audit without fetching the payload: it would have honest producers
    penalized (a grudge, or a broken replay it does not notice)."""

    async def check(self, a: AuditAssignment) -> Result:
        return False, "logprobs", "sample 0 position 0: claimed logprob is off", {}


class _Colluding(VerifierRole):
    """Honest, except towards one producer (``BAZAAR_PEER``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the role's own arguments
        super().__init__(*args, **kwargs)
        self.peer = os.environ["BAZAAR_PEER"]


class CoversForPartner(_Colluding):
    """Passes its partner producer's payloads unchecked, so its cheats go through; checks
    everyone else honestly."""

    async def check(self, a: AuditAssignment) -> Result:
        if a.producer == self.peer:
            return True, "", "", {}
        return await super().check(a)


class FailsTarget(_Colluding):
    """Fails its target producer's payloads unchecked (two of them would have it banned);
    checks everyone else honestly."""

    async def check(self, a: AuditAssignment) -> Result:
        if a.producer == self.peer:
            return False, "sampling_replay", "sample 0 position 1: not the seeded pick", {}
        return await super().check(a)
