"""``--preload``: a sampler loads its model when it starts, so a run's first lease costs
generation alone; without it the model loads when the first lease arrives. Real processes: a
coordinator with no run, and two samplers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.cluster import Cluster
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(180)


def test_a_preloading_sampler_has_its_model_before_any_lease(
    cluster: Cluster, tiny_model: Path
) -> None:
    cluster.start_coordinator()
    model = [f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1"]
    eager = cluster.start_node("eager", extra=[*model, "--preload=True"])
    lazy = cluster.start_node("lazy", extra=model)
    wait_until(lambda: "loaded model tiny" in eager.output(), 120, what="the eager node's model")
    wait_until(lambda: cluster.statuses() == {"eager": "alive", "lazy": "alive"}, 60,
               what="both nodes joined")  # fmt: skip
    assert cluster.api("GET", "/v1/runs")["data"] == []  # no run: no lease could have come
    assert "loaded model" not in lazy.output()
