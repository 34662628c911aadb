"""``bazaar node start`` without --coordinator finds a local coordinator through the data dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.main import coordinator_addrs
from protocol.errors import ConfigError


def test_flag_wins_then_the_local_coordinator_file(tmp_path: Path) -> None:
    addr = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDqKLJN9JUJNg2HgVqrSCYR6AYm8LK57Tpgt6d2riQevu"
    (tmp_path / "coordinator.json").write_text(json.dumps({"multiaddrs": [addr, addr + "x"]}))
    assert coordinator_addrs(NodeConfig(), tmp_path) == [addr, addr + "x"]
    assert coordinator_addrs(NodeConfig(coordinator="/ip4/1.2.3.4/tcp/1/p2p/x"), tmp_path) == [
        "/ip4/1.2.3.4/tcp/1/p2p/x"
    ]


def test_no_coordinator_anywhere_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass --coordinator"):
        coordinator_addrs(NodeConfig(), tmp_path)
    (tmp_path / "coordinator.json").write_text("not json")
    with pytest.raises(ConfigError, match="pass --coordinator"):
        coordinator_addrs(NodeConfig(), tmp_path)
