"""The node's grammar mask (``node/model/constrained.py``, applied by the torch backend) is
llguidance's, computed faster: the same tokens allowed at every step of a constrained
generation."""

from __future__ import annotations

from pathlib import Path

import llguidance.torch
import torch
from transformers import AutoTokenizer

from node.model.backends.torch_backend import TorchBackend
from node.model.constrained import Grammars
from protocol.grammar import schema_grammar, tool_call_grammar


def test_the_mask_is_llguidances_at_every_step(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    vocab = len(tokenizer)
    grammars = Grammars(tokenizer, vocab, {int(tokenizer.eos_token_id)})
    params = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tool = {"type": "function", "function": {"name": "add", "parameters": params}}
    for grammar in (schema_grammar({"type": "array", "items": {"type": "integer"}}),
                    tool_call_grammar([tool], parallel=True)):  # fmt: skip
        ours, theirs = grammars.row(grammar), grammars.row(grammar)
        generator = torch.Generator().manual_seed(0)
        for _ in range(60):
            logits = torch.randn(vocab, generator=generator)
            masked = TorchBackend._masked(logits.unsqueeze(0), [ours], [None])[0]
            llguidance.torch.fill_next_token_bitmask(theirs.matcher, theirs.bitmask, 0)
            reference = logits.clone().unsqueeze(0)
            llguidance.torch.apply_token_bitmask_inplace(reference, theirs.bitmask)
            assert torch.equal(masked, reference[0])
            assert torch.isinf(masked).any()  # the grammar forbids something at every step
            token = int(masked.argmax())
            ours.advance(token)
            theirs.advance(token)
            if ours.done:
                break
