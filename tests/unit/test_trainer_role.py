"""The trainer role's dealings with a coordinator that goes away: a manifest is handed in again
while the coordinator restarts, never lost with the node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from node.config import NodeConfig
from node.roles.trainer import GROUP_WAIT_MIN_S, LONE_WAIT_S, TrainerRole, dht_moved, group_wait_s
from node.store.adapters import AdapterStore
from node.store.versions import VersionSync
from protocol.adapters import AdapterManifest, ManifestAck, ShardInfo
from protocol.p2p import TransportError
from protocol.payload_store import PayloadStore

MANIFEST = AdapterManifest(run_id="r", version=3, parent_version=2, base_model_hash=bytes(32),
                           shards=[ShardInfo(sha256=bytes(32), size=1)], total_bytes=1)  # fmt: skip


class Restarting:
    """The node's agent while its coordinator restarts: ``away`` requests find it unreachable
    (the agent's own error), then it answers."""

    def __init__(self, away: int) -> None:
        self.away, self.asked = away, 0

    async def ask(self, msg: Any, expect: Any, protocol: str) -> ManifestAck:
        self.asked += 1
        if self.asked <= self.away:
            raise TransportError("not connected to the coordinator (reconnecting)")
        return ManifestAck(outcome="recorded", version=msg.version)


def role(tmp_path: Path, agent: Restarting) -> TrainerRole:
    versions = VersionSync("tiny", AdapterStore(tmp_path / "a"), PayloadStore(tmp_path / "s"))
    r = TrainerRole(NodeConfig(reconnect_max_backoff_s=0.01), tmp_path, versions)
    r.agent = agent  # type: ignore[assignment]
    return r


def test_a_manifest_is_handed_in_again_while_the_coordinator_restarts(tmp_path: Path) -> None:
    agent = Restarting(away=3)
    ack = trio.run(role(tmp_path, agent)._submit, MANIFEST)
    assert ack is not None and ack.outcome == "recorded" and agent.asked == 4


def test_a_coordinator_that_stays_away_costs_the_round_not_the_node(tmp_path: Path) -> None:
    agent = Restarting(away=1000)
    assert trio.run(role(tmp_path, agent)._submit, MANIFEST) is None
    assert agent.asked == 8


def test_a_trainer_joins_the_dht_again_once_its_bootstrap_moved() -> None:
    """The coordinator restarted starts another DHT: a trainer left in the old one would never
    meet one that joined the new one (a chaos run's trainers conflicted round after round)."""
    old = ["/ip4/127.0.0.1/tcp/4100/p2p/QmOld"]
    new = ["/ip4/127.0.0.1/tcp/4200/p2p/QmNew"]
    assert dht_moved(old, new)
    assert not dht_moved(old, list(reversed(old)))  # the same addresses: stay
    assert not dht_moved(old, [])  # none named (the coordinator's DHT is down): stay


def test_a_trainer_left_alone_does_not_wait_for_a_group() -> None:
    assert group_wait_s(3.0, group_size=2, co_trainers=1) == GROUP_WAIT_MIN_S
    assert group_wait_s(40.0, group_size=2, co_trainers=1) == 80.0  # a slow partner is waited for
    # dealt alone while another trainer lives: long enough to meet it if it works on the round
    assert group_wait_s(3.0, group_size=1, co_trainers=1) == LONE_WAIT_S < GROUP_WAIT_MIN_S
    assert group_wait_s(3.0, group_size=1, co_trainers=0) == 0.0  # no one left to meet
