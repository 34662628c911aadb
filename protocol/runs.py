"""Run messages: the coordinator tells the network which runs exist and where they stand.

``RunStatus`` goes out on gossip whenever a run changes state or policy version, so inference
nodes know which versions are current and trainers know which runs to train.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from protocol.codec import KiB, Message, Name, NonNegInt

RunState = Literal["queued", "running", "completed", "failed", "cancelled"]


class RunStatus(Message):
    """Coordinator → gossip: a run's state and current policy version."""

    TYPE: ClassVar[str] = "runs.status"
    MAX_BYTES: ClassVar[int] = 4 * KiB
    run_id: Name
    state: RunState
    policy_version: NonNegInt
    max_staleness: NonNegInt
    base_model: Annotated[str, msgspec.Meta(max_length=512)]
