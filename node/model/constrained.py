"""Constrained decoding in the node's sampler: a grammar (``protocol/grammar.py``) turned into a
token mask per step by llguidance, applied to the logits before the seeded pick.

``Grammars(tokenizer, vocab, eos_ids)`` holds the tokenizer's llguidance view (built once per
model: it walks the vocabulary); ``grammars.row(grammar)`` starts one row's ``Constraint``.
Before each pick the backend asks each row's constraint which tokens it ``allowed`` and sets the
others' logits to -inf (so the logprob reported is that of the distribution sampled from); after
it, ``advance`` feeds the picked token to the matcher. When the grammar is complete only
the end-of-sequence token is allowed, so the row ends there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Grammars:
    def __init__(self, tokenizer: Any, vocab: int, eos_ids: set[int]) -> None:
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids)[0]
        )
        self.vocab = vocab

    def row(self, grammar: str) -> Constraint:
        return Constraint(self, grammar)


class Constraint:
    """One row's grammar state."""

    def __init__(self, grammars: Grammars, grammar: str) -> None:
        import llguidance
        import llguidance.torch

        self.matcher = llguidance.LLMatcher(grammars.tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, grammars.vocab)

    def allowed(self, vocab: int) -> torch.Tensor:
        """Which of the ``vocab`` tokens the grammar allows next (bools)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # the bitmask's 32-bit words, least significant bit first: unpacked here, because
        # llguidance's apply_token_bitmask_inplace costs ~2.5 ms a row on CPU (a generic torch
        # path), and this ~10 µs
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")
        return torch.from_numpy(bits[:vocab].astype(bool))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped())
