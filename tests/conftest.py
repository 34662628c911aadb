"""Shared fixtures: a private data directory per test, a local network of processes, the repo
root."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator and nodes as processes (started by the test), stopped after it."""
    from tests.integration.cluster import Cluster

    c = Cluster(tmp_path, interval_s=1.0)
    yield c
    c.stop_all()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``BAZAAR_HOME`` for this test."""
    path = tmp_path / "bazaar-home"
    monkeypatch.setenv("BAZAAR_HOME", str(path))
    return path


TINY_MODEL = pytest.StashKey[Path]()
TINY_AGENT_MODEL = pytest.StashKey[Path]()


@pytest.hookimpl(trylast=True)  # after ``-m`` and ``-k`` deselect: build only what runs
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Build the tiny model (~40 s on 2 cores, more on a shared CPU) after collection and
    before the first test, when any selected test uses it: never inside a test's timeout. It is
    cached where ``bazaar up`` keeps it (``$BAZAAR_HOME/models``, named by a hash of its code and
    settings), so later sessions and the demo reuse it."""
    uses = [set(getattr(item, "fixturenames", ())) for item in items]
    agent = any("tiny_agent_model" in names for names in uses)
    if agent or any("tiny_model" in names for names in uses):
        from node.model.tiny import ensure_tiny_model
        from protocol.service.config import data_dir

        config.stash[TINY_MODEL] = ensure_tiny_model(data_dir())
    if agent:  # the slow tier's: ~15 min more on 2 cores
        from node.model.tiny_agent import ensure_tiny_agent_model

        config.stash[TINY_AGENT_MODEL] = ensure_tiny_agent_model(config.stash[TINY_MODEL])


@pytest.fixture(scope="session")
def tiny_model(pytestconfig: pytest.Config) -> Path:
    """The project's tiny model, built once per test session before the first test."""
    return pytestconfig.stash[TINY_MODEL]


@pytest.fixture(scope="session")
def tiny_agent_model(pytestconfig: pytest.Config) -> Path:
    """The tiny model warm-started on tool calls (``node/model/tiny_agent.py``), built before
    the first test when a selected test uses it."""
    return pytestconfig.stash[TINY_AGENT_MODEL]
