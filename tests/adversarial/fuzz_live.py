"""Byte-level fuzzing of a live process, every layer its peers' bytes reach.

``fuzz(target, pid, inputs_per_layer, seed)`` sends seeded inputs (``attacks.inputs``: random,
mutated valid frames, truncated and oversized ones) at each layer a Bazaar process serves — raw
TCP, multistream-select, the Noise handshake and its payload, yamux frames, and on fresh
streams gossipsub, identify push, ping and each of our ``/bazaar/`` protocols the process
serves — a few at a time. After each layer's batch the process must still answer an honest
newcomer (it joins the coordinator) and its resident memory must stay within ``RSS_BOUND_MB``
of what it was before the fuzzing began; ``FuzzReport`` says what was sent and what held.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from tests.adversarial import attacks as A
from tests.adversarial.inputs import inputs

RSS_BOUND_MB = 50.0
"""Most a fuzzed process may grow over its resident size before the fuzzing."""
LINGER_S = 0.05
CONCURRENCY = 4

Send = Callable[[str, bytes], Awaitable[A.Outcome]]


def _stream(protocol: str) -> Send:
    return lambda target, data: A.raw_protocol_stream(target, protocol, data, LINGER_S)


LAYERS: dict[str, tuple[str, Send]] = {
    # layer name: (input generator, how an input is sent)
    "tcp": ("tcp", lambda t, d: A.raw_tcp(t, d, LINGER_S)),
    "multistream": ("multistream", lambda t, d: A.multistream_garbage(t, d, LINGER_S)),
    "noise": ("noise", lambda t, d: A.security_garbage(t, "/noise", d, LINGER_S)),
    "noise-payload": ("noise-payload", lambda t, d: A.noise_payload(t, d, LINGER_S)),
    "yamux": ("yamux", lambda t, d: A.muxer_frames(t, [d], linger_s=LINGER_S)),
    "gossipsub": ("meshsub", _stream(A.MESHSUB[1])),
    "identify-push": ("identify-push", _stream(A.IDENTIFY_PUSH)),
    "ping": ("ping", _stream(A.PING)),
}


@dataclass
class FuzzReport:
    inputs: dict[str, int] = field(default_factory=dict)
    """Inputs sent, by layer (``bazaar:<protocol>`` for ours)."""
    rss_before_mb: float = 0.0
    rss_max_mb: float = 0.0
    failures: list[str] = field(default_factory=list)
    """What did not hold, after which layer."""
    seconds: float = 0.0


async def fuzz(
    target: str,
    pid: int,
    coordinator: str,
    bazaar_protocols: list[str],
    inputs_per_layer: int,
    seed: int,
) -> FuzzReport:
    """Fuzz the process ``pid`` listening at ``target``; ``coordinator`` is whom an honest
    newcomer joins to check the process still serves (the coordinator itself, or the
    coordinator of the fuzzed node, which must stay a member)."""
    rng = random.Random(seed)
    report = FuzzReport(rss_before_mb=A.rss_mb(pid))
    report.rss_max_mb = report.rss_before_mb
    started = time.monotonic()
    layers = dict(LAYERS)
    for protocol in bazaar_protocols:
        layers[f"bazaar:{protocol}"] = ("bazaar", _stream(protocol))
    for layer, (generator, send) in layers.items():
        source = inputs(generator, rng)
        batch = [next(source) for _ in range(inputs_per_layer)]
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def one(data: bytes, send: Send = send, limiter: trio.CapacityLimiter = limiter):
            async with limiter:
                with trio.move_on_after(15):
                    await send(target, data)

        async with trio.open_nursery() as nursery:
            for data in batch:
                nursery.start_soon(one, data)
        report.inputs[layer] = len(batch)
        rss = A.rss_mb(pid)
        report.rss_max_mb = max(report.rss_max_mb, rss)
        if rss - report.rss_before_mb > RSS_BOUND_MB:
            report.failures.append(f"after {layer}: {rss:.0f} MB resident")
        if not await A.still_serves(coordinator):
            report.failures.append(f"after {layer}: an honest newcomer could not join")
    report.seconds = time.monotonic() - started
    return report
