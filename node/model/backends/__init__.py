"""Model backends behind one interface: PyTorch (CPU and CUDA) and vLLM (CUDA, imported lazily).

A backend takes token-id prompts and per-sample seeds and returns, per sample, the token ids,
the logprob of each sampled token and why it stopped; it recomputes logits for a committed
completion in one prefill (what verifiers replay); and it hot-swaps LoRA adapters over one loaded
base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from node.model.errors import Cancelled
from protocol.rollouts import ComputeProfile

__all__ = ["Backend", "Cancelled", "FinishReason", "Generation", "Sampling", "Steering", "Step"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    """The sampled token's logprob under the distribution sampled from, per position."""
    finish_reason: FinishReason
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per position, the ``Steering.top_logprobs`` most likely tokens and their logprobs (under
    the distribution sampled from); empty unless asked for."""


@dataclass(frozen=True)
class Step:
    """One row's token of one decoding step, as ``Steering.on_step`` sees it."""

    row: int
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Steering:
    """What a served request adds to plain sampling (rollouts use none of it)."""

    constraints: list[Any] | None = None
    """Per row, a ``node.model.constrained.Constraint`` (its token mask before each pick) or
    None."""
    top_logprobs: int = 0
    on_step: Callable[[list[Step]], set[int]] | None = None
    """Called after every step with the rows' new tokens; returns the rows to end now (a stop
    string seen); raises ``Cancelled`` (``node.model.errors``) to end every row."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` even past the end-of-sequence token (benchmarks)."""


class Backend(Protocol):
    name: str

    @property
    def profile(self) -> ComputeProfile: ...

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Sampling,
        adapter: str | None = None,
        steering: Steering | None = None,
    ) -> list[Generation]: ...

    def prefill_logits(
        self, prompt: list[int], completion: list[int], adapter: str | None = None
    ) -> object: ...

    def prefill_batch(
        self, pairs: list[tuple[list[int], list[int]]], adapter: str | None = None
    ) -> list[object]: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...
