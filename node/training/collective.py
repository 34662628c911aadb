"""The trainers' all-reduce, on hivemind, in a child process of its own.

hivemind and py-libp2p cannot share a Python process (both define the protobuf symbols
``crypto.pb.*``), so the node talks to hivemind through a pipe to a child started fresh
("spawn"); the child sets the start method back to "fork" before importing hivemind, whose
averager forks. The child joins the run's hivemind DHT (bootstrapped from the given peers),
and for each round puts the trainer's quantized pseudo-gradient into a
``DecentralizedAverager`` (matchmaking by ``prefix``; fp16 or packed 8-bit integers on the
wire, ``wire.py``) and answers with the
group's exact integer sum and size (``diloco.exact_sum``). After a round a trainer shares its
state (version, global weights, outer momentum, quantizer scales) through the averager, and a
trainer that joins later downloads it from a peer (hivemind's ``load_state_from_peers``), so it
starts the next round from the same bits as the others. A round that finds no group, or whose
all-reduce fails because a peer vanished, is retried until ``round_timeout_s``; after that the
trainer goes on alone (group size 1).

Matchmaking runs on hivemind's own timings (a leader answers a join request within 3 s, a
group forms within 5 s) with the group's target size set to the round's expected size, so a
full group starts at once and the 5 s are spent only waiting on a missing member. Tighter
timings (1 s and 2 s) failed under load: on two busy cores a leader's process did not answer
within 1 s, no group formed, each trainer went on alone and their versions conflicted.

The pipe carries our own arrays between our own two processes; nothing from a peer is
unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectiveSpec:
    initial_peers: list[str]
    """hivemind multiaddrs to join the DHT through (empty: start a new DHT)."""
    prefix: str
    """Matchmaking key: one per run."""
    size: int
    """Length of the flat tensor averaged each round."""
    target_group_size: int = 4
    min_group_size: int = 2
    matchmaking_s: float = 5.0
    request_timeout_s: float = 3.0
    """How long a peer waits for a leader's answer; below ``matchmaking_s`` (hivemind's rule)."""
    patience_s: float = 10.0
    """How long a round waits for the group it expects before it settles for fewer peers."""
    round_timeout_s: float = 30.0
    host: str = "127.0.0.1"
    wire: str = "fp16"
    """How the integers travel: ``fp16`` or ``int8`` (bit-packed, lossless; ``wire.py``)."""
    member: str = ""
    """This trainer's name in a round's group, unless the round names it (``average``)."""


@dataclass(frozen=True)
class RoundResult:
    integer_sum: np.ndarray
    group_size: int
    seconds: float
    members: tuple[str, ...] = ()
    """The group's trainers (their ``member``), sorted."""


class Collective:
    """The node side: ``start()``, then ``average(q)`` once per round (blocking; call it off
    the event loop), ``close()``."""

    def __init__(self, spec: CollectiveSpec) -> None:
        self.spec = spec
        self.visible_addrs: list[str] = []
        self._conn: Any = None
        self._proc: Any = None

    def start(self, timeout_s: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        # not a daemon: hivemind starts processes of its own; the child leaves when the pipe
        # closes, so it cannot outlive the node
        self._proc = ctx.Process(target=_serve, args=(child, self.spec, os.getpid()), daemon=False)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout_s):
            self.close()
            raise RuntimeError("the hivemind process did not start in time")
        status, value = parent.recv()
        if status != "ok":
            self.close()
            raise RuntimeError(f"the hivemind process failed to start: {value}")
        self.visible_addrs = value

    def average(
        self,
        q: np.ndarray,
        tag: str = "",
        expected: int = 1,
        member: str = "",
        timeout_s: float | None = None,
    ) -> RoundResult:
        """All-reduce ``q`` with the peers averaging the same ``tag`` (the run and version);
        wait up to ``patience_s`` for a group of ``expected`` before taking a smaller one, and
        up to ``timeout_s`` (default ``round_timeout_s``) for any group before going alone.
        ``member``: this trainer's name in the group (gathered: every member learns every
        name), ``CollectiveSpec.member`` if empty."""
        timeout_s = self.spec.round_timeout_s if timeout_s is None else timeout_s
        args = (q.astype(np.float32), tag, expected, member or self.spec.member, timeout_s)
        result: RoundResult = self._ask("average", args, timeout_s + 30)
        return result

    def sent_bytes(self) -> int:
        """Bytes this trainer's all-reduces have serialized so far (its upload). A reducer's
        replies may still be going out when its own round returns: read it once rounds are
        over and it has settled."""
        sent: int = self._ask("sent", None)
        return sent

    def share_state(self, metadata: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """What a trainer joining later downloads from this one (after each round)."""
        self._ask("share", (metadata, arrays))

    def load_state(self, timeout_s: float = 30.0) -> tuple[dict[str, Any], list[np.ndarray]] | None:
        """The state another trainer shared (the newest a peer has), or None if none answered."""
        loaded: tuple[dict[str, Any], list[np.ndarray]] | None = self._ask("load", timeout_s)
        return loaded

    def _ask(self, op: str, arg: Any, timeout_s: float | None = None) -> Any:
        self._conn.send((op, arg))
        if not self._conn.poll(timeout_s or self.spec.round_timeout_s + 30):
            raise RuntimeError("the hivemind process did not answer")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("stop", None))
            self._conn.close()
        if self._proc is not None:
            # a moment to leave the DHT politely; a peer gone is what every other peer
            # handles anyway (the 10 s this waited made every trainer's stop that long)
            self._proc.join(timeout=2)
            # the child leads a process group with hivemind's own processes (its p2pd daemon):
            # whatever of it is left — all of it, if the child was killed — goes now
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)


def _serve(conn: Any, spec: CollectiveSpec, node: int) -> None:
    from protocol.service.parent import die_with  # stdlib only: no py-libp2p here

    die_with(node)  # a node killed outright takes its averager along
    os.setpgrp()  # a group of its own, with hivemind's processes, for close() to end together
    multiprocessing.set_start_method("fork", force=True)  # hivemind's averager forks
    import hivemind
    import torch

    from node.training import wire

    try:
        compression = wire.install(spec.wire)
        dht = hivemind.DHT(
            start=True, initial_peers=spec.initial_peers, host_maddrs=[f"/ip4/{spec.host}/tcp/0"]
        )

        class Averager(hivemind.averaging.DecentralizedAverager):
            shared: tuple[Any, list[Any]] = ({}, [])

            def get_current_state(self) -> tuple[Any, list[Any], None]:
                return self.shared[0], self.shared[1], None  # runs in this process

            def set_target_group_size(self, size: int) -> None:
                """The size at which a leader starts the all-reduce without waiting out the
                matchmaking time; set in the averager's process, through its pipe, as
                hivemind's own calls are."""
                done = hivemind.utils.MPFuture()
                self._outer_pipe.send(("_set_target_group_size", [size, done], {}))
                done.result(timeout=30)

            async def _set_target_group_size(self, size: int, done: Any) -> None:
                try:
                    self._matchmaking.target_group_size = size
                    done.set_result(None)
                except Exception as e:  # answered, not left for the caller's timeout
                    if not done.done():
                        done.set_exception(e)

        tensor = torch.zeros(spec.size)
        averager = Averager(
            [tensor], dht, prefix=spec.prefix, start=True, allow_state_sharing=False,
            target_group_size=spec.target_group_size, min_group_size=spec.min_group_size,
            min_matchmaking_time=spec.matchmaking_s, request_timeout=spec.request_timeout_s,
            compression=compression, allreduce_timeout=spec.round_timeout_s,
        )  # fmt: skip
        conn.send(("ok", [str(a) for a in dht.get_visible_maddrs()]))
    except Exception as e:  # reported to the node, which tries again on its next round
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    rejoin = functools.partial(_rejoin, dht, spec.initial_peers)
    try:
        while True:
            try:
                op, q = conn.recv()
            except (EOFError, OSError):
                return
            if op == "stop":
                return
            if op == "sent":
                conn.send(("ok", int(wire.SENT.value)))
            elif op == "share":
                metadata, arrays = q
                averager.shared = (metadata, [torch.from_numpy(a) for a in arrays])
                averager.allow_state_sharing = True
                conn.send(("ok", None))
            elif op == "load":
                loaded = averager.load_state_from_peers(timeout=q)
                if loaded is None:
                    conn.send(("ok", None))
                else:
                    metadata, tensors = loaded
                    conn.send(("ok", (metadata, [t.numpy().copy() for t in tensors])))
            else:
                array, tag, expected, member, timeout_s = q
                conn.send(("ok", _round(averager, torch.from_numpy(array), tag, expected, spec,
                                        member, timeout_s, rejoin)))  # fmt: skip
    finally:
        averager.shutdown()
        dht.shutdown()


def _rejoin(dht: Any, maddrs: list[str]) -> None:
    """Ping the DHT's bootstrap peers back into this node's routing table. hivemind drops a
    peer from it at the first request the peer does not answer in time (a busy machine is
    enough), and a trainer whose table has emptied never meets its group again: every round
    "could not find a group", each trainer goes on alone, and their manifests conflict,
    round after round. An incoming ping puts this node back into theirs too."""
    if not maddrs:
        return

    async def ping(_: Any, node: Any) -> None:
        from hivemind.p2p import PeerID
        from multiaddr import Multiaddr

        peers = {PeerID.from_base58(Multiaddr(m)["p2p"]) for m in maddrs}
        await asyncio.wait_for(
            asyncio.gather(*(node.protocol.call_ping(p) for p in peers), return_exceptions=True),
            timeout=5,
        )

    with contextlib.suppress(Exception):  # a round without the ping still tries, as before
        dht.run_coroutine(ping)


def _round(
    averager: Any,
    q: Any,
    tag: str,
    expected: int,
    spec: Any,
    member: str,
    timeout_s: float,
    rejoin: Callable[[], None],
) -> RoundResult:
    """One round's all-reduce. Peers meet under a key derived from the round's tag; each member
    also gathers its tag (run and version), the group size its round expects, and whether
    it is still patient; every member sees the same gathered data and takes the same decision:
    the result counts if all tags match and the group is as big as expected or someone's
    patience is over. Otherwise everyone tries again."""
    from node.training.diloco import exact_sum

    started = time.monotonic()
    deadline = started + timeout_s
    patient_until = started + spec.patience_s
    # matchmaking under a key of the round's own (hivemind's group bits), so peers of other
    # rounds are not even met; hivemind changes the bits after a group, so set them each time
    digest = hashlib.sha256(tag.encode()).digest()
    bits = format(int.from_bytes(digest[:2], "big"), "016b") if tag else ""
    # a round that expects a group starts as soon as it is whole; one that expects no one in
    # particular takes whoever comes within the matchmaking time, up to the spec's target
    whole = expected >= spec.min_group_size
    try:
        averager.set_target_group_size(expected if whole else spec.target_group_size)
    except Exception as e:  # the round still runs, waiting out the matchmaking time
        log.warning("could not set the group's target size (%s)", e)
    # hivemind refuses at once a step whose matchmaking time does not fit in its timeout: with
    # less time left than that, trying again only spins until the deadline
    while deadline - time.monotonic() > spec.matchmaking_s + 0.5:
        rejoin()
        averager.set_group_bits(bits)
        with averager.get_tensors() as (tensor,):
            tensor.copy_(q)
        gather = {"tag": tag, "expected": expected, "patient": time.monotonic() < patient_until,
                  "member": member}  # fmt: skip
        try:
            group = averager.step(gather=gather, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as e:  # hivemind raises AllreduceException for "no group found"
            log.info("averaging round failed (%s); trying again until the deadline", e)
            group = None
        if not group:  # a failed round (no group, a peer lost mid-way): try again
            continue
        seen = list(group.values())
        same = all(isinstance(g, dict) and g.get("tag") == tag for g in seen)
        enough = len(seen) >= min(int(g.get("expected", 1)) for g in seen) if same else False
        if same and (enough or not all(g.get("patient") for g in seen)):
            with averager.get_tensors() as (tensor,):
                averaged = tensor.clone()
            k = len(group)
            members = tuple(sorted(str(g.get("member", "")) for g in seen))
            return RoundResult(exact_sum(averaged, k).numpy(), k, time.monotonic() - started,
                               members)  # fmt: skip
        log.info("group of %d refused (tags match: %s); trying again", len(seen), same)
    return RoundResult(q.numpy().copy(), 1, time.monotonic() - started, (member,))
