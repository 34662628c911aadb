"""Fixtures of the attack tests: a local network of real processes to attack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator and nodes as processes (started by the test), stopped after it."""
    c = Cluster(tmp_path, interval_s=1.0)
    yield c
    c.stop_all()
