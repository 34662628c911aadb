"""Shared fixtures: a private data directory per test, and the repo root."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``BAZAAR_HOME`` for this test."""
    path = tmp_path / "bazaar-home"
    monkeypatch.setenv("BAZAAR_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tiny model, built once per test session (~40 s on 2 cores)."""
    from node.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("data"))
