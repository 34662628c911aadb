"""The vLLM backend (CUDA nodes): the same interface and the same sampler as the PyTorch backend.

vLLM is imported only when this backend is built, so machines without it (every CPU machine)
never import it; building it there raises ``BackendUnavailable`` with the fix.

Sampling stays ours, so a verifier replays a vLLM node's rollouts exactly as a PyTorch node's: a
per-request logits processor runs ``verification.sampling.sample`` (seeded Gumbel-max over the full
vocabulary at position = tokens generated so far, with the request's temperature and top-p) on
the raw logits, keeps only the token it picks, and vLLM decodes greedily. The processor records
the sampled token's logprob under the tempered, truncated distribution — the behaviour policy —
which is why the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one GPU).

LoRA adapters hot-swap per request (``LoRARequest``) over the one loaded base model.
``prefill_logits`` asks for full-vocabulary prompt logprobs: log-softmax shifts each position's
logits by a constant, which changes neither the Gumbel-max pick nor top-p, so replay margins are
the same as from logits.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from node.model.backends import FinishReason, Generation, Sampling, Steering
from protocol.rollouts import ComputeProfile
from verification.sampling import sample


class BackendUnavailable(RuntimeError):
    """The backend's library or hardware is missing on this machine; the message says what."""


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise BackendUnavailable(
            f"the vLLM backend needs vLLM on a CUDA machine: pip install 'bazaar[vllm]' ({e})"
        ) from None
    return vllm


class VLLMBackend:
    name = "vllm"

    def __init__(self, ref: str, dtype: str = "auto", max_loras: int = 4, **engine_args: Any):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the sampler records here
        vllm = _require_vllm()
        self._logprobs: dict[str, dict[int, float]] = {}
        self._lock = threading.Lock()
        processor = _seeded_gumbel_processor(self._logprobs)
        self.llm = vllm.LLM(
            model=ref,
            dtype=dtype,
            enable_lora=True,
            max_loras=max_loras,
            logits_processors=[processor],
            **engine_args,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.device = "cuda"
        self.adapters: dict[str, tuple[int, str]] = {}
        self._next_id = 0

    @property
    def profile(self) -> ComputeProfile:
        """How this backend computes: what a verifier's thresholds for its work depend on."""
        from node.model.backends.torch_backend import DTYPES

        dtype = DTYPES.get(self.llm.llm_engine.model_config.dtype, "bf16")
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        return ComputeProfile(backend=self.name, dtype=dtype, device=f"cuda:{name}")

    def load_adapter(self, name: str, path: str) -> None:
        """Register a PEFT adapter; vLLM loads it on first use, beside the base weights."""
        self._next_id += 1  # vLLM caches adapters by id: never reuse one
        self.adapters[name] = (self._next_id, path)

    def unload_adapter(self, name: str) -> None:
        int_id, _ = self.adapters.pop(name)
        self.llm.llm_engine.remove_lora(int_id)

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters)})")
        from vllm.lora.request import LoRARequest

        int_id, path = self.adapters[adapter]
        return LoRARequest(adapter, int_id, path)

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Sampling,
        adapter: str | None = None,
        steering: Steering | None = None,
    ) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        if steering is not None and steering != Steering():
            raise ValueError(
                "grammars, top logprobs and token streaming are served by the torch backend"
                " only (start the node with --backend torch)"
            )
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        keys = [f"{id(self)}-{i}-{seed}" for i, seed in enumerate(seeds)]
        params = [
            SamplingParams(
                temperature=0.0,  # the processor has already picked the token
                max_tokens=sampling.max_tokens,
                ignore_eos=sampling.ignore_eos,
                extra_args={
                    "bazaar_key": key,
                    "bazaar_seed": seed,
                    "bazaar_temperature": sampling.temperature,
                    "bazaar_top_p": sampling.top_p,
                },
            )
            for key, seed in zip(keys, seeds, strict=True)
        ]
        with self._lock:  # one batch at a time: the logprob table is keyed per call
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts],
                params,
                lora_request=self._lora(adapter),
                use_tqdm=False,
            )
            recorded = [self._logprobs.pop(key, {}) for key in keys]
        result = []
        for out, by_position in zip(outputs, recorded, strict=True):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            reason: FinishReason = "stop" if completion.finish_reason == "stop" else "length"
            result.append(Generation(ids, [by_position[t] for t in range(len(ids))], reason))
        return result

    def prefill_logits(
        self, prompt: list[int], completion: list[int], adapter: str | None = None
    ) -> torch.Tensor:
        """Log-probabilities ``[T, V]`` over the whole vocabulary at each completion token."""
        return self.prefill_batch([(prompt, completion)], adapter)[0]

    def prefill_batch(
        self, pairs: list[tuple[list[int], list[int]]], adapter: str | None = None
    ) -> list[torch.Tensor]:
        """``prefill_logits`` of many (prompt, completion) pairs, in one engine call."""
        from vllm import SamplingParams, TokensPrompt

        vocab = len(self.tokenizer)
        params = SamplingParams(max_tokens=1, prompt_logprobs=-1, temperature=0.0)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p + c) for p, c in pairs],
            params,
            lora_request=self._lora(adapter),
            use_tqdm=False,
        )
        result = []
        for (prompt, completion), out in zip(pairs, outs, strict=True):
            logits_T_V = torch.full((len(completion), vocab), float("-inf"))
            for t, row in enumerate(out.prompt_logprobs[len(prompt) :]):
                for token_id, lp in row.items():
                    logits_T_V[t, token_id] = lp.logprob
            result.append(logits_T_V)
        return result


def _seeded_gumbel_processor(logprobs: dict[str, dict[int, float]]) -> Any:
    """A vLLM batch-level logits processor class that applies our seeded sampler per request."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class SeededGumbel(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False

        def req_logits_processor(self, params: Any) -> Any:
            args = params.extra_args or {}
            if "bazaar_seed" not in args:
                return None
            key, seed = args["bazaar_key"], torch.tensor([args["bazaar_seed"]])
            temperature, top_p = args["bazaar_temperature"], args["bazaar_top_p"]
            record: dict[int, float] = {}  # by position: a recomputed step overwrites itself
            logprobs[key] = record

            def pick(output_ids: list[int], logits_V: torch.Tensor) -> torch.Tensor:
                step = torch.tensor([len(output_ids)])
                token_1, logp_1 = sample(
                    logits_V.float().view(1, -1).cpu(), seed, step, temperature, top_p
                )
                token = int(token_1[0])
                record[len(output_ids)] = float(logp_1[0])
                keep = logits_V[token].clone()
                logits_V.fill_(float("-inf"))
                logits_V[token] = keep
                return logits_V

            return pick

        new_req_logits_processor = req_logits_processor  # the hook's name in other releases

    return SeededGumbel
