"""Multi-host: a coordinator and 3 nodes, each in its own network namespace, over veth.

Cutting one node's link makes it dead; restoring the link makes it alive again, by itself.
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

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

_why = netns.unavailable_reason()


@pytest.fixture
def hosts() -> Iterator[dict[str, netns.Host]]:
    if _why is not None:
        pytest.skip(reason=f"multi-host test needs network namespaces: {_why}")
    with netns.network(["coord", "n1", "n2", "n3"]) as hosts:
        yield hosts


def test_cut_link_makes_a_node_dead_and_restoring_it_brings_it_back(
    hosts: dict[str, netns.Host], tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0, dead_after=3.0)
    coord = hosts["coord"]
    try:
        cluster.start_coordinator(listen_host=coord.address, ns=coord.ns)
        assert cluster.multiaddr.startswith(f"/ip4/{coord.address}/tcp/")
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name, ns=hosts[name].ns)

        def statuses() -> dict[str, str]:
            # the REST API lives in the coordinator's namespace: ask from there, with the CLI
            out = subprocess.run(
                ["ip", "netns", "exec", coord.ns, sys.executable, "-m", "bazaar", "network",
                 "status", "--coordinator-url", cluster.url, "--json"],
                capture_output=True, text=True, check=True, cwd=REPO, timeout=30,
            )  # fmt: skip
            return {n["name"]: n["status"] for n in json.loads(out.stdout)}

        def expect(want: dict[str, str]) -> object:
            return wait_until(
                lambda: all(statuses().get(k) == v for k, v in want.items()), 90, 0.2, str(want)
            )

        expect({"n1": "alive", "n2": "alive", "n3": "alive"})
        hosts["n2"].cut()
        expect({"n2": "dead"})
        assert statuses()["n1"] == statuses()["n3"] == "alive"
        hosts["n2"].restore()
        expect({"n1": "alive", "n2": "alive", "n3": "alive"})
        assert all(p.alive() for p in cluster.procs)
    finally:
        cluster.stop_all()


def test_nodes_on_other_hosts_find_a_coordinator_from_its_rest_url(
    hosts: dict[str, netns.Host], tmp_path: Path
) -> None:
    """How a compose file or a data center starts nodes: the coordinator listens on 0.0.0.0,
    and nodes on other hosts are given only its REST URL."""
    cluster = Cluster(tmp_path, interval_s=1.0)
    coord = hosts["coord"]
    try:
        cluster.start_coordinator(listen_host="0.0.0.0", ns=coord.ns)
        assert cluster.multiaddr.startswith("/ip4/0.0.0.0/")  # not dialable as it is
        url = f"http://{coord.address}:{cluster.http_port}"
        for name in ("n1", "n2"):
            cluster.start_node(name, ns=hosts[name].ns, coordinator=url)

        def both_alive() -> bool:
            out = subprocess.run(
                ["ip", "netns", "exec", coord.ns, sys.executable, "-m", "bazaar", "network",
                 "status", "--coordinator-url", cluster.url, "--json"],
                capture_output=True, text=True, check=True, cwd=REPO, timeout=30,
            )  # fmt: skip
            got = {n["name"]: n["status"] for n in json.loads(out.stdout)}
            return got == {"n1": "alive", "n2": "alive"}

        wait_until(both_alive, 90, 0.5, what="nodes joined through the REST URL")
    finally:
        cluster.stop_all()
