"""The gate every gossip frame passes: verify, refuse replays, check the type, count, log.

Both the coordinator and the nodes install ``GossipGate.accept`` as the topic validator of
``P2PHost.subscribe``, so a forged, replayed, malformed or off-topic frame is dropped at the first
honest hop and never relayed. Every refusal is counted by reason in Prometheus and logged at most
once per (peer, reason) per minute; nothing a peer sends can raise out of ``accept``.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter

from protocol.codec import Message
from protocol.envelope import Envelope, ReplayGuard, open_envelope
from protocol.errors import ProtocolError
from protocol.peer_limits import RateLimit

log = logging.getLogger(__name__)


class GossipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "bazaar_gossip_accepted",
            "Gossip frames accepted, by message type",
            ["type"],
            registry=registry,
        )
        self.rejected = Counter(
            "bazaar_gossip_rejected",
            "Gossip frames dropped, by reason",
            ["reason"],
            registry=registry,
        )
        self.bytes = Counter(
            "bazaar_gossip_bytes", "Bytes of gossip frames accepted", ["type"], registry=registry
        )


class GossipGate:
    """Opens frames for one topic that may carry only ``allowed`` message types."""

    def __init__(
        self,
        topic: str,
        allowed: tuple[type[Message], ...],
        metrics: GossipMetrics,
        guard: ReplayGuard | None = None,
    ) -> None:
        self.topic = topic
        self.allowed = allowed
        self.metrics = metrics
        self.guard = guard or ReplayGuard()
        self._log_limit = RateLimit(60.0)

    def accept(self, forwarder: str, data: bytes) -> Envelope | None:
        try:
            env = open_envelope(data, self.guard)
            if not isinstance(env.message, self.allowed):
                raise _WrongTopic(f"{env.message.TYPE} does not belong on {self.topic}")
        except ProtocolError as e:
            self.refuse(forwarder, e.reason, str(e))
            return None
        self.metrics.accepted.labels(env.message.TYPE).inc()
        self.metrics.bytes.labels(env.message.TYPE).inc(len(data))
        return env

    def refuse(self, peer: str, reason: str, detail: str) -> None:
        """Count and (rate-limited) log a refused frame; also for refusals made after opening."""
        self.metrics.rejected.labels(reason).inc()
        if self._log_limit.allow((peer, reason)):
            log.warning(
                "dropped gossip from %s: %s",
                peer,
                detail,
                extra={"peer": peer, "reason": reason, "topic": self.topic},
            )


class _WrongTopic(ProtocolError):
    reason = "wrong_topic"
