"""The coordinator's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from protocol.gossip import GossipMetrics


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gossip = GossipMetrics(self.registry)
        r = self.registry
        self.nodes = Gauge("bazaar_nodes", "Known nodes, by status", ["status"], registry=r)
        self.joins = Counter("bazaar_joins", "Join requests, by result", ["result"], registry=r)
        self.requests = Counter(
            "bazaar_requests", "Requests on the membership protocol", ["type"], registry=r
        )
        self.requests_refused = Counter(
            "bazaar_requests_refused", "Refused requests, by reason", ["reason"], registry=r
        )
        self.transitions = Counter(
            "bazaar_node_transitions", "Node status changes", ["to"], registry=r
        )
        self.leases_issued = Counter("bazaar_leases_issued", "Leases handed out", registry=r)
        self.leases_expired = Counter(
            "bazaar_leases_expired", "Leases that missed their deadline", registry=r
        )
        self.receipts = Counter(
            "bazaar_receipts", "Rollout receipts, by outcome", ["outcome"], registry=r
        )
        self.rollout_tokens = Counter(
            "bazaar_rollout_tokens", "Completion tokens of counted rollouts", registry=r
        )
        self.runs = Gauge("bazaar_runs", "Runs, by state", ["state"], registry=r)
        self.verdicts = Counter(
            "bazaar_verdicts", "Verdicts received, by outcome", ["outcome"], registry=r
        )
        self.penalties = Counter(
            "bazaar_penalties", "Confirmed audit failures penalized", registry=r
        )
        self.known_answers = Counter(
            "bazaar_known_answers", "Known-answer audits scored, by result", ["result"], registry=r
        )
        self.known_answers_kept = Gauge(
            "bazaar_known_answers_kept",
            "Known answers whose payload the coordinator keeps, by answer (pass, fail)",
            ["answer"],
            registry=r,
        )
        self.verifier_strikes = Counter(
            "bazaar_verifier_strikes", "Verifier strikes, by reason", ["reason"], registry=r
        )
