"""The live fuzzing harness (``fuzz_live.py``) against a real coordinator and a real node.

The default run sends 12 inputs per layer (a few seconds a process); ``-m slow`` sends 300.
Both processes must come out alive, still serving an honest peer after every layer, within
``RSS_BOUND_MB`` of their memory before, and with the faults counted.
"""

from __future__ import annotations

import pytest
import trio

from protocol.versions import ADAPTERS, AUDITS, LEASES, MEMBERSHIP, PAYLOAD
from tests.adversarial.fuzz_live import RSS_BOUND_MB, fuzz
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(600)

COORDINATOR_PROTOCOLS = [MEMBERSHIP, LEASES, AUDITS, ADAPTERS]
NODE_PROTOCOLS = [PAYLOAD]


def _fuzz_both(cluster: Cluster, per_layer: int) -> None:
    coordinator = cluster.start_coordinator()
    node = cluster.start_node("n1")
    cluster.wait_status({"n1": "alive"}, 60)
    node_addr = next(a for a in cluster.nodes()["n1"]["addrs"] if a.startswith("/ip4/127."))
    for target, proc, protocols, seed in [
        (cluster.multiaddr, coordinator, COORDINATOR_PROTOCOLS, 1),
        (node_addr, node, NODE_PROTOCOLS, 2),
    ]:
        report = trio.run(fuzz, target, proc.pid, cluster.multiaddr, protocols, per_layer, seed)
        assert proc.alive(), proc.output()[-3000:]
        assert report.failures == [], report
        assert report.rss_max_mb - report.rss_before_mb <= RSS_BOUND_MB, report
        assert sum(report.inputs.values()) == per_layer * (8 + len(protocols))
    assert cluster.statuses()["n1"] == "alive"  # the fuzzed node stayed a member
    assert cluster.metric("bazaar_peer_faults_total", 'layer="gossipsub",reason="decode_error"') > 0


def test_fuzzing_a_live_coordinator_and_node(cluster: Cluster) -> None:
    _fuzz_both(cluster, per_layer=12)


@pytest.mark.slow
def test_fuzzing_a_live_coordinator_and_node_at_length(cluster: Cluster) -> None:
    _fuzz_both(cluster, per_layer=300)
