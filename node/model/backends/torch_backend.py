"""The PyTorch backend: transformers + peft, on CPU or CUDA.

Generation is batched: prompts are left-padded into one batch, prefilled once, then decoded a
token at a time against the KV cache (transformers' ``DynamicCache``); every row samples with its
own seed through ``verification.sampling`` (seeded Gumbel-max), so any sample can be replayed alone.
Adapters are PEFT LoRA adapters loaded by name next to the one base model; switching between
them (or back to the base) does not reload anything.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from node.model.backends import Generation, Sampling
from node.model.batching import left_pad
from verification.sampling import sample


class TorchBackend:
    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.base = model
        self.model = model  # becomes a PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.device = device
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos or tokenizer.eos_token_id])
        self.adapters: set[str] = set()

    @classmethod
    def from_pretrained(cls, ref: str, device: str = "cpu", dtype: Any = None) -> TorchBackend:
        from node.model.loading import load_pretrained

        model, tokenizer = load_pretrained(ref, dtype=dtype, device=device)
        return cls(model, tokenizer, device)

    # -- adapters -----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter under ``name``; the base weights stay as they are."""
        from peft import PeftModel

        if name in self.adapters:
            self.model.delete_adapter(name)
            self.adapters.discard(name)
        if not self.adapters and not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter (its memory is freed; the base is untouched)."""
        if name not in self.adapters:
            return
        if self.adapters == {name}:  # the last one: take the LoRA layers out of the base again
            self.model = self.base = self.model.unload()
        else:
            self.model.delete_adapter(name)
        self.adapters.discard(name)

    def _select(self, adapter: str | None) -> Any:
        """The module to run: the active adapter, or the base with adapters disabled."""
        if adapter is None:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        if adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters)})")
        self.model.set_adapter(adapter)
        return nullcontext()

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Sampling,
        adapter: str | None = None,
    ) -> list[Generation]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        ids_B_W, mask_B_W = left_pad(prompts, self.tokenizer.pad_token_id)
        ids_B_W, mask_B_W = ids_B_W.to(self.device), mask_B_W.to(self.device)
        pos_B_W = (mask_B_W.cumsum(-1) - 1).clamp(min=0)
        seeds_B = torch.tensor(seeds, dtype=torch.int64)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        with self._select(adapter):
            out = self.model(
                input_ids=ids_B_W, attention_mask=mask_B_W, position_ids=pos_B_W, use_cache=True
            )
            past, logits_B_V, pos_B = out.past_key_values, out.logits[:, -1, :], pos_B_W[:, -1]
            for step in range(sampling.max_tokens):
                step_B = torch.full((len(prompts),), step, dtype=torch.int64)
                tok_B, logp_B = sample(
                    logits_B_V.cpu(), seeds_B, step_B, sampling.temperature, sampling.top_p
                )
                # one conversion per step: indexing tensors element by element costs more
                # than the small model's forward pass at large batches
                for i, (tok, logp) in enumerate(zip(tok_B.tolist(), logp_B.tolist(), strict=True)):
                    if reasons[i] is None:
                        tokens[i].append(tok)
                        logprobs[i].append(logp)
                        if tok in self.eos_ids and not sampling.ignore_eos:
                            reasons[i] = "stop"
                if all(r is not None for r in reasons) or step == sampling.max_tokens - 1:
                    break
                next_B_1 = tok_B.view(-1, 1).to(self.device)
                mask_B_W = torch.cat([mask_B_W, torch.ones_like(next_B_1)], dim=1)
                pos_B = pos_B + 1
                out = self.model(
                    input_ids=next_B_1,
                    attention_mask=mask_B_W,
                    position_ids=pos_B.view(-1, 1),
                    past_key_values=past,
                    use_cache=True,
                )
                past, logits_B_V = out.past_key_values, out.logits[:, -1, :]
        return [
            Generation(t, lp, "stop" if r == "stop" else "length")
            for t, lp, r in zip(tokens, logprobs, reasons, strict=True)
        ]

    @torch.no_grad()
    def prefill_logits(
        self, prompt: list[int], completion: list[int], adapter: str | None = None
    ) -> torch.Tensor:
        """Logits ``[T, V]`` that produced each completion token, from one forward pass."""
        ids_1_L = torch.tensor([prompt + completion], device=self.device)
        with self._select(adapter):
            logits_1_L_V = self.model(input_ids=ids_1_L).logits
        return logits_1_L_V[0, len(prompt) - 1 : -1].float().cpu()
