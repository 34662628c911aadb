"""The coordinator's config (``bazaar coordinator start``), loadable from TOML."""

from __future__ import annotations

from pydantic import Field

from coordinator.admission import AdmissionConfig
from protocol.peer_limits import TransportLimits
from protocol.service.config import ConfigModel


class MembershipConfig(ConfigModel):
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60)
    """How often nodes heartbeat; sent to every node when it joins, so all agree on it."""
    suspect_after_missed: float = Field(1.5, gt=0)
    """A node is *suspect* once this many intervals pass without a heartbeat."""
    dead_after_missed: float = Field(3.0, gt=0)
    """A node is *dead* once this many intervals pass without a heartbeat."""
    peers_per_reply: int = Field(16, ge=1, le=1024)
    """How many live peers a joining node is told to dial, to keep a gossip mesh."""
    forget_after_s: float = Field(3600.0, gt=0)
    """A node dead or gone this long is forgotten (its row and its peerstore entry; its trust
    record and any ban stay): identities that joined once and vanished, as a Sybil's do, would
    otherwise pile up for the life of the coordinator."""


class LeaseConfig(ConfigModel):
    max_active_per_node: int = Field(3, ge=1, le=64)
    """Unexpired leases one node may hold at once, so no node hoards a run's examples. A node
    pipelines three: one generating, one fetched ahead, one whose receipt is on its way."""
    round_leases: int = Field(4, ge=1, le=4096)
    """Leases each trainer trains on per round: a run's next version is trained once this many
    per live trainer are counted within its staleness window."""
    max_running_runs: int = Field(4, ge=1, le=1000)
    """Runs leased and trained at once; more wait ``queued`` and start, oldest first, as
    running ones end."""
    payload_deadline_s: float = Field(120.0, gt=0, le=86400)
    """How long after its receipt a rollout's payload must reach the coordinator's own count;
    one never served loses its count (its examples are redone), with no strike."""
    manifest_wait_s: float = Field(5.0, ge=0, le=8)
    """How long a trainer's manifest waits at the coordinator for the round's other trainers
    to sign theirs before the answer is ``pending`` (under the 10 s request timeout)."""
    report_deadline_s: float = Field(300.0, gt=0, le=86400)
    """How long after a run ends its last rounds wait for their trainers' reports: then what
    they held and did not charge goes back to the key (a trainer that died never reports;
    while the run goes on, each round is closed two rounds later anyway)."""
    retry_after_s: float = Field(1.0, gt=0, le=60)
    """How long a node told "no work" (no lease, no audit, no round to train) waits before
    asking again: the latency a round pays at worst, against requests an idle node sends."""


class AuditConfig(ConfigModel):
    """How rollouts are audited and verifiers checked (the rules: ``coordinator/audits.py``).

    The rates are set so that cheating never pays. A producer earns trust with
    ``trusted_after`` clean audits in a row (every one of its receipts is audited until then),
    and is audited at ``floor_rate`` after. A trusted producer that cheats on every lease is
    caught after 1/``floor_rate`` leases on average, and a confirmed failure forfeits *every*
    unaudited receipt of its within ``quarantine_window_s`` (a day: longer than the whole run
    of cheats), refunded to the payers: its expected gain from cheating is zero whatever the
    floor, while it loses its trust (back to ``trusted_after`` audited leases of honest work), a
    strike, and after ``max_strikes`` everything. The floor then only bounds the harm to the
    model (with runs training only on audited or trusted rollouts, ``verification.trusted_only``,
    about 1/``floor_rate`` bad rollouts of a newly cheating trusted producer may train before it
    is caught and its work redone) and sets the cost: the defaults keep the whole audit cost of
    an honest network in its steady state under 5 % of the producers' compute, counting a check
    as costly as the generation it checks (it is less: one prefill replays what took a decode
    step per token): ``floor_rate × (1 + double_check_rate) / (1 − known_answer_rate)`` = 0.04 ×
    1.05 / 0.9 ≈ 4.7 % (``steady_state_cost``; measured by ``scripts/bench_trust.py``)."""

    floor_rate: float = Field(0.04, ge=0, le=1)
    """Share of a trusted producer's receipts that are audited."""
    trusted_after: int = Field(10, ge=0, le=10_000)
    """Clean audits in a row before a producer drops from auditing every receipt to the floor
    rate; a failure starts the count again."""
    max_wait_s: float = Field(5.0, ge=0, le=8)
    """Longest a verifier's request for work is held waiting for an audit to open (its
    ``wait_s``), under the transport's 10 s request timeout."""
    deadline_s: float = Field(60.0, gt=0, le=3600)
    """A verifier must answer within this time, or the audit goes to another verifier."""
    exact_hold_s: float = Field(30.0, ge=0, le=3600)
    """An audit of a payload made on a device class some verifier generates on exactly (its
    ``AuditRequest.device``) waits for such a verifier while one asked within this time: in
    low precision only it can replay a suspicious lease bit for bit, where the calibrated
    thresholds let subtle cheats through (``verification.checks``). 0: no waiting."""
    max_strikes: int = Field(3, ge=1, le=1000)
    """Confirmed failures after which a producer is banned."""
    quarantine_window_s: float = Field(86400.0, gt=0)
    """On a confirmed failure, the producer's unaudited receipts of this long before are
    quarantined (never trained on, their examples redone) and their credits forfeited back to
    the payers; on a
    wrong known answer, the verifier's credits for checks of this long before are forfeited."""
    double_check_rate: float = Field(0.05, ge=0, le=1)
    """Share of first passes sent to a second verifier as well: two passes make a known-honest
    payload, the reference a verifier that fails everything is caught with (and a pass that a
    second verifier fails is settled by majority). 5 % of audits costs 0.2 % of compute and
    keeps a fresh supply of references: a few per hundred audits."""
    known_answer_rate: float = Field(0.1, ge=0, lt=1)
    """Share of a trusted verifier's audits that are known answers (payloads whose verdict is
    settled), sent blind in place of a real audit it could take. With known cheats about half
    of them, a verifier that passes everything meets one every ~20 audits and is banned within
    ~60 (``max_verifier_strikes``), losing its pay at each; the cost is 1/0.9 of the real
    checks, ~0.5 % of compute."""
    verifier_trusted_after: int = Field(3, ge=0, le=10_000)
    """Known answers a new verifier must answer right before it gets real audits: until then
    every audit it could take is a known answer (when one it was never handed exists). One
    that passes, or fails, everything answers about half of them wrong (known cheats and
    known-honest payloads are drawn at even odds): struck before its word decides any audit,
    and as often as not banned before it gets one."""
    max_verifier_strikes: int = Field(3, ge=1, le=1000)
    """Strikes (a wrong known answer, or ``minority_per_strike`` outvoted verdicts) after which
    a verifier is banned from all work."""
    minority_per_strike: int = Field(3, ge=1, le=1000)
    """Verdicts outvoted by the majority of a decided audit that make one verifier strike."""
    max_references: int = Field(256, ge=1, le=100_000)
    """Known-answer payloads kept of each kind (honest, cheat), the newest; their frames are
    pinned in the coordinator's payload store, so its size cap never evicts them."""

    def steady_state_cost(self, floor: float | None = None) -> float:
        """Checks made per rollout produced by trusted honest producers (each check costing at
        most what the rollout cost): first looks, double-checks, and known answers."""
        rate = self.floor_rate if floor is None else floor
        return rate * (1 + self.double_check_rate) / (1 - self.known_answer_rate)


class ReplayConfig(ConfigModel):
    """How trainers' rounds are replay-audited (the rules: ``coordinator/replays.py``).

    A replay costs a verifier about what the round cost its trainer (the same inner steps on
    the same completions, rebuilt from the payloads: measured 0.9–1.2×), so the rate is the
    cost: ``rate`` of a trusted trainer's rounds in a group and ``lone_rate`` of a lone
    trainer's, both under the 10 % goal. Cheating never pays at any rate above zero: a failed
    replay bans the trainer, rolls the run back to before its first round no replay passed
    (every version it touched since is withdrawn) and forfeits its pay for those rounds to the
    run's payer — all it gained. The rate bounds the harm instead: a newly cheating trusted
    trainer moves the served model for 1/rate rounds on average before the rollback. A lone
    trainer's part is the whole step (in a group of k it is a k-th), so its rounds are
    replayed more often. New trainers are replayed every round until ``trusted_after``
    replays passed. Measured by ``scripts/bench_replay.py`` (``replay_cost_fraction_*``)."""

    rate: float = Field(0.05, ge=0, le=1)
    """Share of a trusted trainer's rounds in a group that are replayed."""
    lone_rate: float = Field(0.08, ge=0, le=1)
    """Share of a trusted trainer's rounds that it trained alone that are replayed."""
    trusted_after: int = Field(2, ge=0, le=10_000)
    """Replays a new trainer must pass before its rounds are sampled at the rates above."""
    deadline_s: float = Field(300.0, gt=0, le=86_400)
    """A verifier must answer a replay within this time, or it goes to another verifier."""


class CoordinatorConfig(ConfigModel):
    listen: str = "/ip4/0.0.0.0/tcp/4001"
    """py-libp2p listen multiaddr (``/ip4/HOST/tcp/PORT``; port 0 picks a free one)."""
    http: str = "127.0.0.1:8700"
    """HOST:PORT of the REST API (``/health``, ``/metrics``, ``/v1/...``); port 0 picks one."""
    db: str = ""
    """SQLAlchemy database URL; empty means SQLite (WAL) at ``<data dir>/coordinator.db``.
    ``postgresql://user:pass@host/db`` for PostgreSQL."""
    accounts_db: str = ""
    """Database URL of the API keys runs are submitted with and billed to (the gateway's);
    empty means SQLite at ``<data dir>/gateway.db``, the local gateway's."""
    tokenizers: dict[str, str] = {}
    """Base model → tokenizer path: with it the coordinator recomputes the rewards of every
    rollout it recounts, which ``stop.target_reward`` needs (``--tokenizers.tiny=PATH``)."""
    payloads_max_bytes: int = Field(1 << 30, gt=0)
    """Disk the coordinator's copies of rollout payloads may take (the oldest leave first):
    the ledger's evidence and the known-answer audits' payloads."""
    payloads_retention_s: float = Field(7 * 86400.0, gt=0)
    """How long a payload copy is kept; the ledger reconciles what is still kept."""
    open_runs: bool = False
    """Accept runs without an API key (billed to no one): a closed test network."""
    serving_token_ttl_s: float = Field(300.0, gt=0, le=86_400)
    """How long a serving token (what an admitted gateway shows a serving node) is valid; one
    is issued again at half-life. A revoked gateway's access ends within this time (plus the
    nodes' clock skew allowance), and a gateway cut off from the coordinator this long can no
    longer reach nodes."""
    membership: MembershipConfig = MembershipConfig()
    """Liveness rules."""
    leases: LeaseConfig = LeaseConfig()
    """How rollout work is handed out."""
    audits: AuditConfig = AuditConfig()
    """How rollouts are audited and cheaters penalized."""
    replays: ReplayConfig = ReplayConfig()
    """How trainers' rounds are replayed and lying trainers penalized."""
    admission: AdmissionConfig = AdmissionConfig()
    """How fast peers and addresses may join and ask for leases; newcomers' lease caps."""
    transport: TransportLimits = TransportLimits()
    """What one peer may hold of this process: deadlines, stream and byte budgets."""
    log_json: bool = False
    """Log JSON lines instead of human-readable lines."""
