"""The PyTorch backend on the project's tiny model: exact seeded replay, batching, hot-swap."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs import load_environment
from node.model.backends import Sampling
from node.model.backends.torch_backend import TorchBackend
from node.model.tiny import TinySpec, build_tiny_model, greedy_accuracy
from tests.conftest import REPO
from tests.lora import random_adapter
from verification.rollouts import prompt_ids
from verification.sampling import derive_seed, replay_margins, sampling_logprobs

SAMPLING = Sampling(temperature=1.0, top_p=0.95, max_tokens=8)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TorchBackend:
    return TorchBackend.from_pretrained(str(tiny_model))


def _prompts(backend: TorchBackend, n: int) -> list[list[int]]:
    env = load_environment("arith", digits=2)
    return [prompt_ids(backend.tokenizer, e.prompt) for e in env.examples(1, 0, n)]


def test_batched_prefill_gives_each_pair_its_own_logits(backend: TorchBackend) -> None:
    """A verifier replays a lease in a few forward passes, each prompt prefilled once for the
    samples that continue it: every pair's logits are what one plain pass over its prompt and
    completion gives, however the pairs are grouped into batches."""
    prompts = _prompts(backend, 3)
    seeds = [derive_seed(bytes(32), i, 0) for i in range(6)]
    gens = backend.generate([p for p in prompts for _ in (0, 1)], seeds, SAMPLING)
    pairs = [(prompts[k // 2], g.token_ids) for k, g in enumerate(gens)]
    pairs += [(prompts[0] + prompts[1], gens[2].token_ids[:1]), (prompts[2], [])]

    def plain(prompt: list[int], completion: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = backend.model(input_ids=torch.tensor([prompt + completion])).logits
        return logits[0, len(prompt) - 1 : -1].float()

    alone = [plain(p, c) for p, c in pairs]
    for budget in (4096, 40, 1):  # one batch, several, one prompt each
        batched = backend.prefill_batch(pairs, max_batch_tokens=budget)
        assert [b.shape for b in batched] == [a.shape for a in alone]
        for a, b in zip(alone, batched, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_tiny_model_is_a_real_checkpoint_with_room_to_improve(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 2_000_000
    assert tok.decode(tok("any text, ünïcode ✓")["input_ids"]) == "any text, ünïcode ✓"
    meta = json.loads((tiny_model / "bazaar-tiny.json").read_text())
    held_out = load_environment("arith", digits=2).examples(seed=10_000, start=0, count=128)
    accuracy = greedy_accuracy(model, tok, held_out)
    assert accuracy == pytest.approx(meta["accuracy"])  # loads back exactly as trained
    assert 0.4 <= accuracy < 0.9  # useful, and well below perfect


def test_seeded_generation_replays_exactly_in_fp32(backend: TorchBackend) -> None:
    prompts = _prompts(backend, 8)
    seeds = [derive_seed(bytes(32), i, 0) for i in range(8)]
    gens = backend.generate(prompts, seeds, SAMPLING)
    assert all(g.finish_reason in ("stop", "length") and g.token_ids for g in gens)
    for prompt, seed, gen in zip(prompts, seeds, gens, strict=True):
        logits = backend.prefill_logits(prompt, gen.token_ids)
        tokens = torch.tensor(gen.token_ids)
        assert float(replay_margins(logits, tokens, seed, 1.0, 0.95).max()) == 0.0
        logp = sampling_logprobs(logits, 1.0, 0.95).gather(-1, tokens.view(-1, 1)).view(-1)
        assert torch.allclose(logp, torch.tensor(gen.logprobs), atol=1e-5, rtol=0)
        if gen.finish_reason == "stop":
            assert gen.token_ids[-1] == backend.tokenizer.eos_token_id
        else:
            assert len(gen.token_ids) == SAMPLING.max_tokens
    # the same seeds give the same samples; one sample alone equals it inside a batch
    assert backend.generate(prompts, seeds, SAMPLING) == gens
    solo = backend.generate(prompts[3:4], seeds[3:4], SAMPLING)[0]
    assert solo.token_ids == gens[3].token_ids  # padding changes float bits, not the tokens
    assert torch.allclose(torch.tensor(solo.logprobs), torch.tensor(gens[3].logprobs), atol=1e-5)
    # other seeds, other samples
    others = backend.generate(prompts, [s + 1 for s in seeds], SAMPLING)
    assert [g.token_ids for g in others] != [g.token_ids for g in gens]


def test_adapters_hot_swap_without_reloading_the_base(
    backend: TorchBackend, tmp_path: Path
) -> None:
    base_id = id(backend.base)
    prompts = _prompts(backend, 6)
    seeds = [derive_seed(b"\x07" * 32, i, 0) for i in range(6)]
    greedy = Sampling(temperature=0.0, max_tokens=6)
    before = backend.generate(prompts, seeds, greedy)
    for name, seed in (("a", 1), ("b", 2)):
        lora = random_adapter(backend.base.name_or_path, tmp_path / name, seed)
        backend.load_adapter(name, str(lora))
    with_a = backend.generate(prompts, seeds, greedy, adapter="a")
    with_b = backend.generate(prompts, seeds, greedy, adapter="b")
    assert [g.token_ids for g in with_a] != [g.token_ids for g in before]
    assert [g.token_ids for g in with_b] != [g.token_ids for g in with_a]
    assert backend.generate(prompts, seeds, greedy) == before  # the base, unchanged
    assert backend.generate(prompts, seeds, greedy, adapter="a") == with_a
    assert id(backend.base) == base_id
    # replay works under an adapter too
    gen = with_a[0]
    logits = backend.prefill_logits(prompts[0], gen.token_ids, adapter="a")
    assert torch.argmax(logits, -1).tolist() == gen.token_ids
    with pytest.raises(ValueError, match="not loaded"):
        backend.generate(prompts, seeds, greedy, adapter="missing")
    backend.unload_adapter("a")  # the other stays, and so does the base
    with pytest.raises(ValueError, match="not loaded"):
        backend.generate(prompts, seeds, greedy, adapter="a")
    assert backend.generate(prompts, seeds, greedy, adapter="b") == with_b
    backend.unload_adapter("b")
    assert backend.generate(prompts, seeds, greedy) == before
    assert id(backend.base) == base_id and backend.model is backend.base
    backend.load_adapter("a", str(tmp_path / "a"))  # loads again after the last one left
    assert backend.generate(prompts, seeds, greedy, adapter="a") == with_a


def test_tiny_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = TinySpec(seed=3, max_steps=30, target_accuracy=1.0)  # a short schedule, same code path
    digests = []
    for run in ("one", "two"):
        out = build_tiny_model(tmp_path / run, spec)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other = build_tiny_model(
        tmp_path / "other", TinySpec(seed=4, max_steps=30, target_accuracy=1.0)
    )
    assert hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest() != digests[0]


def test_cli_builds_with_progress(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "bazaar", "model", "tiny", "--out", str(out), "--max-steps", "30",
           "--target-accuracy", "1.0"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "built" in result.stdout and (out / "model.safetensors").exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "already built" in again.stdout
