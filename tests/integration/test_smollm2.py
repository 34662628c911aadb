"""A real instruct model through the same path as any checkpoint: SmolLM2-135M from GGUF."""

from __future__ import annotations

import pytest
import torch

from node.model.backends import Sampling
from node.model.backends.torch_backend import TorchBackend
from node.model.loading import SMOLLM2, resolve, smollm2_path
from verification.rollouts import prompt_ids
from verification.sampling import derive_seed, replay_margins, sampling_logprobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        smollm2_path() is None, reason="SmolLM2 GGUF not installed: run scripts/setup-smollm2"
    ),
]


def test_smollm2_gguf_generates_and_replays(tmp_path: object) -> None:
    backend = TorchBackend.from_pretrained(resolve(SMOLLM2, tmp_path))  # type: ignore[arg-type]
    assert backend.base.config.model_type == "llama"
    tok = backend.tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
    prompt = prompt_ids(tok, messages)
    greedy = backend.generate([prompt], [0], Sampling(temperature=0.0, max_tokens=16))[0]
    assert "5" in tok.decode(greedy.token_ids)
    seeds = [derive_seed(b"\x05" * 32, i, 0) for i in range(3)]
    sampled = backend.generate([prompt] * 3, seeds, Sampling(temperature=0.8, max_tokens=24))
    for seed, gen in zip(seeds, sampled, strict=True):
        logits = backend.prefill_logits(prompt, gen.token_ids)
        tokens = torch.tensor(gen.token_ids)
        assert float(replay_margins(logits, tokens, seed, 0.8, 1.0).max()) == 0.0
        logp = sampling_logprobs(logits, 0.8, 1.0).gather(-1, tokens.view(-1, 1)).view(-1)
        assert torch.allclose(logp, torch.tensor(gen.logprobs), atol=1e-4)
