"""The coordinator's membership rules on a controlled clock."""

from __future__ import annotations

from coordinator.config import MembershipConfig
from coordinator.membership import Membership, Transition
from protocol.membership import Heartbeat, JoinRequest
from tests.examples import CAPS

CFG = MembershipConfig(heartbeat_interval_s=2.0, suspect_after_missed=1.5, dead_after_missed=3.0)
HB = Heartbeat(seq=1, uptime_s=1.0)


def join(
    m: Membership, peer: str, now: float, instance: str = "instance-a", version: str = "1.0.0"
):
    req = JoinRequest(
        name=peer, instance_id=instance, protocol_version=version,
        listen_addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], capabilities=CAPS,
    )  # fmt: skip
    return m.join(peer, req, instance, now)


def test_alive_suspect_dead_and_revival() -> None:
    m = Membership(CFG)
    reply, t = join(m, "a", now=100.0)
    assert (
        reply.accepted and reply.heartbeat_interval_s == 2.0 and t == Transition("a", None, "alive")
    )
    assert m.sweep(102.9) == []
    assert m.sweep(103.1) == [Transition("a", "alive", "suspect")]
    assert m.sweep(105.9) == []
    assert m.sweep(106.1) == [Transition("a", "suspect", "dead")]
    assert m.heartbeat("a", HB, 107.0) == Transition("a", "dead", "alive")
    assert m.nodes["a"].heartbeats == 1


def test_goodbye_leaves_at_once_and_heartbeats_do_not_revive() -> None:
    m = Membership(CFG)
    join(m, "a", 0.0)
    assert m.goodbye("a") == Transition("a", "alive", "left")
    assert m.goodbye("a") is None
    assert m.heartbeat("a", HB, 1.0) is False
    assert m.sweep(100.0) == []
    reply, t = join(m, "a", 101.0, instance="instance-b")  # a new process may join again
    assert reply.accepted and t == Transition("a", "left", "alive")


def test_unknown_sender() -> None:
    assert Membership(CFG).heartbeat("ghost", HB, 0.0) is False


def test_duplicate_identity_is_refused_while_the_first_lives() -> None:
    m = Membership(CFG)
    join(m, "a", 0.0, instance="first-process")
    reply, t = join(m, "a", 1.0, instance="second-process")
    assert not reply.accepted and t is None
    assert reply.reason.startswith("duplicate_identity") and "same key file" in reply.reason
    same, _ = join(m, "a", 1.5, instance="first-process")  # the same process rejoining
    assert same.accepted
    m.sweep(20.0)
    late, _ = join(m, "a", 20.0, instance="second-process")  # the first one is dead now
    assert late.accepted and m.nodes["a"].instance_id == "second-process"


def test_a_node_restarted_after_a_crash_is_told_when_to_join_again() -> None:
    """Killed and started again: its previous instance is overdue (3 s of silence) but not yet
    declared dead (6 s). The refusal says how long until it is, and then the join passes. A
    twin, joining while the identity beats on time, is refused for good."""
    m = Membership(CFG)
    join(m, "a", 0.0, instance="before-crash")
    reply, _ = join(m, "a", 4.0, instance="after-crash")
    assert not reply.accepted and reply.retry_after_s == 6.0 - 4.0 + 0.5
    again, t = join(m, "a", 4.0 + reply.retry_after_s, instance="after-crash")
    assert again.accepted and t == Transition("a", "alive", "alive")
    assert m.nodes["a"].instance_id == "after-crash"
    m.heartbeat("a", HB, 10.0)
    twin, _ = join(m, "a", 11.0, instance="twin")
    assert not twin.accepted and twin.retry_after_s == 0.0


def test_other_major_version_is_refused_naming_both() -> None:
    reply, t = join(Membership(CFG), "a", 0.0, version="2.1.0")
    assert not reply.accepted and t is None
    assert (
        "version_mismatch" in reply.reason and "2.1.0" in reply.reason and "1.0.0" in reply.reason
    )


def test_restart_grants_a_full_window_and_keeps_history() -> None:
    first = Membership(CFG)
    join(first, "a", 0.0)
    first.heartbeat("a", HB, 1.0)
    rows = [n.to_row() for n in first.nodes.values()]
    restarted = Membership(CFG)
    restarted.restore(rows, now=50.0)  # long after the last beat
    assert restarted.nodes["a"].heartbeats == 1 and restarted.nodes["a"].first_seen == 0.0
    assert restarted.sweep(52.0) == []  # not dead on arrival
    assert restarted.sweep(56.5) == [Transition("a", "alive", "dead")]


def test_joiners_are_offered_live_peers_only() -> None:
    m = Membership(CFG)
    for p in "abc":
        join(m, p, 0.0)
    m.goodbye("b")
    reply, _ = join(m, "d", 1.0)
    assert sorted(r.peer_id for r in reply.peers) == ["a", "c"]


def test_announce_updates_a_known_node_only() -> None:
    from protocol.membership import Announce

    m = Membership(CFG)
    join(m, "a", 0.0)
    new_addr = "/ip4/127.0.0.1/tcp/9/p2p/a"
    msg = Announce(name="a", listen_addrs=[new_addr], capabilities=CAPS)
    assert m.announce("a", msg) and m.nodes["a"].addrs == [new_addr]
    assert not m.announce("ghost", msg) and "ghost" not in m.nodes


def test_nodes_dead_or_gone_long_enough_are_forgotten() -> None:
    m = Membership(MembershipConfig(heartbeat_interval_s=2.0, forget_after_s=60.0))
    for peer in ("alive", "dead", "left"):
        join(m, peer, 0.0)
    m.goodbye("left")
    m.heartbeat("alive", HB, 59.0)
    m.sweep(10.0)
    assert m.forget(59.0) == []  # gone, but not long enough
    m.heartbeat("alive", HB, 61.0)
    assert sorted(m.forget(61.0)) == ["dead", "left"]
    assert list(m.nodes) == ["alive"]
    _, t = join(m, "dead", 62.0)  # a forgotten node may join again, as new
    assert t == Transition("dead", None, "alive")
