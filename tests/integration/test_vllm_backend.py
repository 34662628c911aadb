"""The vLLM backend: imported only when used, a clear error where it cannot run, and (on a CUDA
machine with vLLM) rollouts a PyTorch verifier replays with the same seeded sampler."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs import load_environment
from node.model.backends import Sampling
from tests.conftest import REPO
from verification.sampling import derive_seed, replay_margins

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_nothing_imports_vllm_until_the_backend_is_built() -> None:
    code = (
        "import sys\n"
        "import node.model.backends.vllm_backend, node.roles.inference, node.model.rollouts\n"
        "assert 'vllm' not in sys.modules, 'vllm was imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.skipif(HAS_VLLM, reason="checks the error shown where vLLM is not installed")
def test_building_it_without_vllm_says_how_to_get_it() -> None:
    from node.model.backends.vllm_backend import BackendUnavailable, VLLMBackend

    with pytest.raises(BackendUnavailable, match=r"pip install 'bazaar\[vllm\]'"):
        VLLMBackend("unused")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM or not torch.cuda.is_available(), reason="needs vLLM and CUDA")
def test_vllm_rollouts_replay_under_the_torch_backend(tiny_model: Path) -> None:
    from node.model.backends.torch_backend import TorchBackend
    from node.model.backends.vllm_backend import VLLMBackend
    from verification.rollouts import prompt_ids

    ours = VLLMBackend(str(tiny_model), dtype="float32", gpu_memory_utilization=0.3)
    verifier = TorchBackend.from_pretrained(str(tiny_model), device="cuda")
    env = load_environment("arith", digits=2)
    prompts = [prompt_ids(ours.tokenizer, e.prompt) for e in env.examples(3, 0, 8)]
    seeds = [derive_seed(b"\x01" * 32, i, 0) for i in range(len(prompts))]
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=16)
    for prompt, seed, gen in zip(
        prompts, seeds, ours.generate(prompts, seeds, sampling), strict=True
    ):
        logits = verifier.prefill_logits(prompt, gen.token_ids)
        margins = replay_margins(logits, torch.tensor(gen.token_ids), seed, 1.0, 0.95)
        assert float(margins.max()) < 1e-3  # fp32 on both sides: the same picks
        assert len(gen.logprobs) == len(gen.token_ids)
