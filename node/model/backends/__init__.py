"""Model backends behind one interface: PyTorch (CPU and CUDA) and vLLM (CUDA, imported lazily).

A backend takes token-id prompts and per-sample seeds and returns, per sample, the token ids,
the logprob of each sampled token and why it stopped; it recomputes logits for a committed
completion in one prefill (what verifiers replay); and it hot-swaps LoRA adapters over one loaded
base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from protocol.rollouts import ComputeProfile

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    """The sampled token's logprob under the distribution sampled from, per position."""
    finish_reason: FinishReason


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
    ) -> list[Generation]: ...

    def prefill_logits(
        self, prompt: list[int], completion: list[int], adapter: str | None = None
    ) -> object: ...

    def prefill_batch(
        self, pairs: list[tuple[list[int], list[int]]], adapter: str | None = None
    ) -> list[object]: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...
