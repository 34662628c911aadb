"""A Sybil: one machine that joins the network with many identities and has each ask for as
many leases as it may hold. ``tests/adversarial/test_admission.py`` runs it in a network
namespace of its own (one address) and reads the JSON it writes:

    python -m tests.adversarial.sybil --coordinator MULTIADDR --keys 24 --out result.json
"""

from __future__ import annotations

import argparse
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from protocol.errors import RemoteError
from protocol.leases import Lease, LeaseRequest, NoLease
from protocol.versions import LEASES
from tests.integration.peer import Peer, peer


async def attack(coordinator: str, keys: int) -> dict[str, Any]:
    out: dict[str, Any] = {"accepted": 0, "join_refusals": {}, "join_retry_after_s": [],
                           "leases": 0, "lease_refusals": {}, "lease_retry_after_s": [],
                           "errors": []}  # fmt: skip
    async with AsyncExitStack() as stack:
        for i in range(keys):
            p = await stack.enter_async_context(peer(coordinator))
            try:
                await p.join(["inference"], name=f"sybil-{i}")
            except RemoteError as e:
                out["join_refusals"][e.code] = out["join_refusals"].get(e.code, 0) + 1
                out["join_retry_after_s"].append(e.retry_after_s)
                continue
            out["accepted"] += 1
            await _take_leases(p, out)  # at once: it sends no heartbeats
    return out


async def _take_leases(p: Peer, out: dict[str, Any]) -> None:
    for _ in range(3):  # as many as one node may hold
        ask = LeaseRequest(max_prompts=1, base_model="tiny")
        try:
            reply = await p.ask(LEASES, ask)
        except RemoteError as e:
            out["lease_refusals"][e.code] = out["lease_refusals"].get(e.code, 0) + 1
            out["lease_retry_after_s"].append(e.retry_after_s)
            if e.code != "rate_limited":
                out["errors"].append(e.message)
            continue
        if isinstance(reply, Lease):
            out["leases"] += 1
        else:
            assert isinstance(reply, NoLease), reply
            out["lease_refusals"]["no_lease"] = out["lease_refusals"].get("no_lease", 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--keys", type=int, default=24)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = trio.run(attack, args.coordinator, args.keys)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
