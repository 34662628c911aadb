"""Adapter messages: a new adapter version is announced by manifest and fetched by shards.

Trainers publish a signed ``AdapterManifest`` on gossip after each outer step; nodes fetch the
shards it lists with ``ShardRequest`` from any peer that has them and check each ``ShardData``
against the manifest's hash before use. The shards, concatenated, are one ``AdapterBundle``: the
PEFT files of the version, decoded strictly here like every other untrusted input.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from protocol.codec import (
    Hash32,
    KiB,
    Message,
    MiB,
    Name,
    NonNegInt,
    PeerIdStr,
    Text,
    decode_struct,
    encode_struct,
)
from protocol.leases import Lease
from protocol.membership import PeerRecord
from protocol.runs import TrainSettings

PartName = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[1-9A-Za-z]+:[0-9a-f]{64}$")]
"""A committed part, as a manifest names it: ``<trainer peer id>:<part hash hex>``."""


def committed_part(trainer: str, part_hash: bytes) -> str:
    return f"{trainer}:{part_hash.hex()}"


def parse_part(name: str) -> tuple[str, bytes]:
    trainer, _, digest = name.partition(":")
    return trainer, bytes.fromhex(digest)


class ShardInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sha256: Hash32
    size: NonNegInt


class AdapterManifest(Message):
    """Trainer → gossip: adapter ``version`` of ``run_id`` exists and is made of these shards."""

    TYPE: ClassVar[str] = "adapters.manifest"
    MAX_BYTES: ClassVar[int] = 64 * KiB
    run_id: Name
    version: NonNegInt
    parent_version: Annotated[int, msgspec.Meta(ge=-1)]
    """-1 for the first version, trained from the base model."""
    base_model_hash: Hash32
    shards: Annotated[list[ShardInfo], msgspec.Meta(min_length=1, max_length=4096)]
    total_bytes: NonNegInt
    group: Annotated[list[PartName], msgspec.Meta(max_length=64)] = []
    """The committed parts the version averages, ``<trainer>:<part hash hex>`` each
    (``committed_part``), sorted: the same for every member of the all-reduce, which gathered
    them; a replay checks the version against exactly those parts. Empty: the signer's
    current commitment alone."""


ManifestOutcome = Literal[
    "recorded",
    "duplicate",
    "pending",
    "conflict",
    "not_dealt",
    "uncommitted",
    "stale",
    "unknown_run",
]


class ManifestAck(Message):
    """Coordinator → trainer (adapters protocol): what became of a submitted manifest.

    ``recorded``: it is the run's new version, signed by every live trainer of the round;
    ``duplicate``: the version was made with the same manifest (this trainer of the round is now
    a holder too); ``pending``: not every trainer of the round has signed it yet (send it again);
    ``conflict``: the round's trainers signed different manifests, or a different one holds
    that version (trainers of one round must agree bit for bit); ``not_dealt``: the round is
    not this trainer's (a strike); ``uncommitted``: this trainer committed no part for the
    round before it (``RoundCommitment``); ``stale``: not the next version; ``unknown_run``."""

    TYPE: ClassVar[str] = "adapters.manifest_ack"
    MAX_BYTES: ClassVar[int] = 8 * KiB
    outcome: ManifestOutcome
    version: NonNegInt
    """The run's version after this manifest."""
    detail: Text = ""


class VersionsRequest(Message):
    """Node → coordinator (adapters protocol): the current adapter versions of the running runs
    on my base model, and who holds them; with ``run_id`` and ``version``, that one version."""

    TYPE: ClassVar[str] = "adapters.versions_request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    run_id: Name | None = None
    version: NonNegInt | None = None


class VersionInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    run_id: Name
    version: NonNegInt
    manifest: Annotated[bytes, msgspec.Meta(max_length=80 * KiB)]
    """The trainer's signed ``AdapterManifest`` frame, exactly as it was submitted."""
    holders: Annotated[list[PeerRecord], msgspec.Meta(max_length=64)]
    """Trainers that made it first (seeds), then nodes that hold it."""
    seeds: NonNegInt
    """How many of ``holders`` are trainers."""


class VersionsReply(Message):
    TYPE: ClassVar[str] = "adapters.versions"
    MAX_BYTES: ClassVar[int] = 4 * MiB
    versions: Annotated[list[VersionInfo], msgspec.Meta(max_length=32)]
    deployed: Annotated[list[VersionInfo], msgspec.Meta(max_length=32)] = []
    """The deployed version of each run on the base model (``bazaar run deploy``): what
    serving nodes answer as model ``<run>``."""
    current: Annotated[dict[Name, NonNegInt], msgspec.Meta(max_length=1024)] = {}
    """Each run's current version: a node holding a newer one drops it (a rollback withdrew
    it, ``coordinator/replays.py``)."""


class TrainRequest(Message):
    """Trainer → coordinator (adapters protocol): a round to train, on my base model."""

    TYPE: ClassVar[str] = "adapters.train_request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class RolloutRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A counted rollout to train on: the lease (prompts, seeds) and where its payload is."""

    lease: Lease
    producer: PeerIdStr
    producer_addrs: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]],
                              msgspec.Meta(max_length=16)]  # fmt: skip
    payload_hash: Hash32


class TrainAssignment(Message):
    """Coordinator → trainer: train the run's next version (``next_version``) from version
    ``version`` on these rollouts (this trainer's share: ``rank`` of ``group_size`` trainers),
    averaging through the DHT peers."""

    TYPE: ClassVar[str] = "adapters.train_assignment"
    MAX_BYTES: ClassVar[int] = 8 * MiB
    run_id: Name
    version: NonNegInt
    """The version the rollouts were sampled at; the round makes ``version + 1``."""
    rollouts: Annotated[list[RolloutRef], msgspec.Meta(min_length=1, max_length=4096)]
    rank: NonNegInt
    group_size: Annotated[int, msgspec.Meta(ge=1, le=64)]
    hivemind_peers: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]],
                              msgspec.Meta(max_length=16)]  # fmt: skip
    settings: TrainSettings = msgspec.field(default_factory=TrainSettings)
    next_version: NonNegInt = 0
    """The version the round makes (0: ``version + 1``; after a rollback the numbers of the
    versions withdrawn are not used again)."""
    parent: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """The version ``version`` was trained from (-1: ``version - 1``): the quantizer's scales
    derive from that step."""
    co_trainers: Annotated[list[PeerRecord], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=list
    )
    """The round's other trainers: before signing, a trainer fetches the parts they committed
    to from them and checks that the all-reduce added up exactly those."""

    def makes(self) -> int:
        return self.next_version or self.version + 1

    def parent_of_start(self) -> int:
        return self.parent if self.parent >= 0 else self.version - 1


class RoundCommitment(Message):
    """Trainer → coordinator (adapters protocol), after its inner steps and before the
    all-reduce: the hash of its signed ``TrainingPart`` of the round from ``version``, which
    it keeps serving (payload protocol) for replays. A manifest counts only from a trainer
    that committed; a resend replaces it while the round has made no version."""

    TYPE: ClassVar[str] = "adapters.commitment"
    MAX_BYTES: ClassVar[int] = 512 * KiB
    run_id: Name
    version: NonNegInt
    part_hash: Hash32
    lease_ids: Annotated[list[Name], msgspec.Meta(max_length=4096)] = []
    """The dealt rollouts the part was trained on, in the order they were trained: a replay
    trains on the same."""


class CommitmentAck(Message):
    TYPE: ClassVar[str] = "adapters.commitment_ack"
    MAX_BYTES: ClassVar[int] = 4 * KiB
    accepted: bool
    detail: Text = ""


class TrainingPart(Message):
    """A trainer's quantized pseudo-gradient of one round (signed, content-addressed): the
    integers it put into the all-reduce, one signed byte each, in the trainer's weight order."""

    TYPE: ClassVar[str] = "adapters.training_part"
    MAX_BYTES: ClassVar[int] = 32 * MiB
    run_id: Name
    version: NonNegInt
    """The round's starting version."""
    levels: Annotated[int, msgspec.Meta(ge=1, le=127)]
    part: Annotated[bytes, msgspec.Meta(max_length=32 * MiB - 4 * KiB)]


class NoTraining(Message):
    """Coordinator → trainer: no round is ready; ask again after ``retry_after_s``."""

    TYPE: ClassVar[str] = "adapters.no_training"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0


class Deployed(Message):
    """Coordinator → gossip (adapters topic): ``version`` of ``run_id`` is now served as model
    ``<run>``; serving nodes sync at once."""

    TYPE: ClassVar[str] = "adapters.deployed"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    run_id: Name
    version: NonNegInt


class VersionRewards(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Rewards of a round's completions sampled at one adapter version."""

    version: NonNegInt
    samples: NonNegInt
    reward_sum: float
    reward_sq_sum: Annotated[float, msgspec.Meta(ge=0)]


class TurnText(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One turn of an episode as text: the model's (tool calls included) or the environment's
    (tool results, feedback, as the chat template rendered them)."""

    by: Literal["model", "environment"]
    text: Text


class SampleText(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One completion as text, for people to read (``bazaar run rollouts``, the dashboard)."""

    version: NonNegInt
    prompt: Text
    completion: Text
    reward: float
    turns: Annotated[list[TurnText], msgspec.Meta(max_length=64)] = []
    """An episode's turns in order (empty: a single-turn completion)."""


class LeaseCount(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The completion tokens a consumer counted in one rollout's payload."""

    lease_id: Name
    tokens: NonNegInt


class RoundReport(Message):
    """Trainer → coordinator (adapters protocol), after a round: the rewards (recomputed with the
    environment) of the completions it trained on, by the version they were sampled at, its
    own count of every payload it fetched (signed evidence the ledger reconciles against), and
    a few completions as text. The manifest cannot carry these: it must be identical on every
    trainer of the round, and each trains on its own share. What the round trained is not the
    trainer's to say: the coordinator bills what it dealt."""

    TYPE: ClassVar[str] = "adapters.round_report"
    MAX_BYTES: ClassVar[int] = 1 * MiB
    run_id: Name
    version: NonNegInt
    """The round's version (it made ``version + 1``)."""
    rewards: Annotated[list[VersionRewards], msgspec.Meta(max_length=64)]
    samples: Annotated[list[SampleText], msgspec.Meta(max_length=64)]
    counts: Annotated[list[LeaseCount], msgspec.Meta(max_length=4096)] = []


class ReportAck(Message):
    TYPE: ClassVar[str] = "adapters.report_ack"
    MAX_BYTES: ClassVar[int] = 8 * KiB
    recorded: bool
    detail: Text = ""


class ShardRequest(Message):
    """Node → peer (shards protocol): send me the shard with this hash."""

    TYPE: ClassVar[str] = "adapters.shard_request"
    MAX_BYTES: ClassVar[int] = 1 * KiB
    sha256: Hash32


class ShardData(Message):
    """Peer → node: one shard's bytes; the receiver checks them against the manifest."""

    TYPE: ClassVar[str] = "adapters.shard"
    MAX_BYTES: ClassVar[int] = 9 * MiB
    sha256: Hash32
    data: Annotated[bytes, msgspec.Meta(max_length=8 * MiB)]


class AdapterBundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An adapter version's PEFT files, as its shards carry them."""

    config_json: Annotated[bytes, msgspec.Meta(max_length=64 * KiB)]
    """``adapter_config.json``."""
    weights: Annotated[bytes, msgspec.Meta(max_length=4096 * 8 * MiB)]
    """``adapter_model.safetensors``."""

    def encode(self) -> bytes:
        return encode_struct(self)

    @classmethod
    def decode(cls, data: bytes) -> AdapterBundle:
        """Strict; ``DecodeError`` for anything but a bundle."""
        bundle: AdapterBundle = decode_struct(data, cls, "adapter bundle")
        return bundle
