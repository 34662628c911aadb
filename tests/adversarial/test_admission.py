"""A Sybil gains nothing by multiplying identities: joins and leases are limited per address.

Three hosts, each in a network namespace of its own (one address each): the coordinator, a
Sybil that joins with 24 identities and has each ask for leases, and an honest inference node
with the real tiny model. The Sybil's joins past the per-address burst are refused
``rate_limited`` with a retry-after, its members together hold no more leases than the cap for
unaudited members of one address, and the honest node, from another address, joins at once and
has its rollouts counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration import netns
from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

_why = netns.unavailable_reason()
JOIN_BURST = 8
UNAUDITED_LEASES = 6


@pytest.fixture
def hosts() -> Iterator[dict[str, netns.Host]]:
    if _why is not None:
        pytest.skip(reason=f"the Sybil test needs network namespaces: {_why}")
    with netns.network(["coord", "sybil", "honest"]) as hosts:
        yield hosts


def test_a_sybil_is_rate_limited_while_an_honest_node_joins_and_works(
    hosts: dict[str, netns.Host], tmp_path: Path, tiny_model: Path
) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    coord = hosts["coord"]
    try:
        cluster.start_coordinator(
            listen_host=coord.address,
            ns=coord.ns,
            extra=[
                f"--admission.joins_per_address.burst={JOIN_BURST}",
                "--admission.joins_per_address.per_s=0.05",
                f"--admission.unaudited_leases_per_address={UNAUDITED_LEASES}",
            ],
        )
        spec = {"name": "r1", "env": {"name": "arith", "args": {"digits": 1}},
                "rl": {"max_examples": 64, "prompts_per_lease": 1, "group_size": 2,
                       "max_tokens": 4}}  # fmt: skip
        with netns.entered(coord.ns):
            cluster.api("POST", "/v1/runs", json=spec)

        out = tmp_path / "sybil.json"
        subprocess.run(
            ["ip", "netns", "exec", hosts["sybil"].ns, sys.executable, "-m",
             "tests.adversarial.sybil", "--coordinator", cluster.multiaddr, "--keys", "24",
             "--out", str(out)],
            cwd=REPO, check=True, timeout=180,
        )  # fmt: skip
        sybil = json.loads(out.read_text())
        # a few more than the burst may refill while it joins (0.05 a second)
        assert JOIN_BURST <= sybil["accepted"] <= JOIN_BURST + 2, sybil
        assert sybil["join_refusals"] == {"rate_limited": 24 - sybil["accepted"]}, sybil
        assert all(s > 0 for s in sybil["join_retry_after_s"]), sybil
        # its members hold what one address of newcomers may, not three each
        assert sybil["leases"] == UNAUDITED_LEASES, sybil
        assert sybil["lease_refusals"] == {"rate_limited": 3 * sybil["accepted"] - UNAUDITED_LEASES}
        assert all(s > 0 for s in sybil["lease_retry_after_s"]), sybil

        model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
        honest = cluster.start_node("honest", ns=hosts["honest"].ns, extra=model)

        def honest_rollouts() -> int:
            with netns.entered(coord.ns):
                nodes = cluster.nodes()
                rollouts = cluster.api("GET", "/v1/runs/r1/rollouts")["data"]
            me = nodes.get("honest", {}).get("peer_id")
            return sum(r["producer"] == me for r in rollouts)

        wait_until(honest_rollouts, 180, 0.5, what="the honest node's rollouts counted")
        with netns.entered(coord.ns):
            refused = cluster.metric("bazaar_joins_total", 'result="rate_limited"')
        assert refused == 24 - sybil["accepted"]
        log = honest.output()
        assert "join rate-limited" not in log and "refused (rate_limited)" not in log
    finally:
        cluster.stop_all()
