"""The trainer's model: LoRA on the base model, and inner AdamW steps on completions with the GRPO
loss.

Version 0 of a run's adapter is the same on every trainer: LoRA's A matrices are drawn from a
generator seeded by the run id, B starts at zero (so v0 changes nothing). The weights travel as
one flat vector (``flat``, ``load_flat``: what DiLoCo's outer step works on) and are saved as a
PEFT adapter whose bytes depend on nothing but the weights (``save``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from node.training.examples import Completion
from node.training.grpo import LossStats, grpo_loss
from protocol.runs import LoraSpec, LossSpec


class LoraTrainer:
    def __init__(
        self,
        base: str,
        run_id: str,
        lora: LoraSpec | None = None,
        loss: LossSpec | None = None,
        inner_lr: float = 1e-3,
    ) -> None:
        """The run spec's ``lora`` and ``rl.loss`` sections, as they are."""
        lora, loss = lora or LoraSpec(), loss or LossSpec()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where, kwargs = base, {}
        if base.endswith(".gguf"):  # a GGUF file (smollm2 as installed), as the model process
            where, kwargs = str(Path(base).parent), {"gguf_file": Path(base).name}  # loads it
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                            target_modules=list(lora.target_modules), lora_dropout=0.0)  # fmt: skip
        self.model = get_peft_model(model, config)
        self.params = [p for _, p in sorted(self._named_lora().items())]
        seed = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "little") >> 1
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # version 0: the same on every trainer of the run
            for name, p in sorted(self._named_lora().items()):
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                else:
                    p.zero_()
        self.loss_settings = loss
        self.inner = torch.optim.AdamW(self.params, lr=inner_lr, weight_decay=0.0)
        self.sizes = [p.numel() for p in self.params]

    def _named_lora(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def load_flat(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            start = 0
            for p in self.params:
                p.copy_(flat[start : start + p.numel()].view_as(p))
                start += p.numel()

    def reset_inner(self) -> None:
        """Forget the inner optimizer's moments: every round starts AdamW afresh, so a round
        is a function of its starting weights, completions and settings alone, and anyone can
        replay it (``verification/training.py``)."""
        self.inner.state.clear()

    def inner_step(self, batch: Sequence[Completion]) -> LossStats:
        """One AdamW step on a batch of completions."""
        width = max(len(c.prompt) + len(c.tokens) for c in batch)
        pad = 0
        ids_B_W = torch.full((len(batch), width), pad, dtype=torch.long)
        mask_B_W = torch.zeros_like(ids_B_W)
        t_max = max(len(c.tokens) for c in batch)
        valid_B_T = torch.zeros(len(batch), t_max)
        behaviour_B_T = torch.zeros(len(batch), t_max)
        for i, c in enumerate(batch):
            seq = c.prompt + c.tokens
            ids_B_W[i, : len(seq)] = torch.tensor(seq)
            mask_B_W[i, : len(seq)] = 1
            valid_B_T[i, : len(c.tokens)] = 1 if c.sampled is None else torch.tensor(c.sampled)
            behaviour_B_T[i, : len(c.tokens)] = torch.tensor(c.behaviour)
        logits_B_W_V = self.model(input_ids=ids_B_W, attention_mask=mask_B_W).logits
        logp_B_W_V = torch.log_softmax(logits_B_W_V.float(), dim=-1)
        rows = []
        for i, c in enumerate(batch):  # position p predicts token p + 1
            start = len(c.prompt) - 1
            positions = torch.arange(start, start + len(c.tokens))
            token_logp = logp_B_W_V[i, positions, torch.tensor(c.tokens)]
            rows.append(torch.nn.functional.pad(token_logp, (0, t_max - len(c.tokens))))
        logp_B_T = torch.stack(rows)
        advantages_B = torch.tensor([c.advantage for c in batch])
        loss, stats = grpo_loss(logp_B_T, behaviour_B_T, valid_B_T, advantages_B,
                                self.loss_settings)  # fmt: skip
        self.inner.zero_grad()
        loss.backward()
        self.inner.step()
        return stats

    def adapter_weights(self, adapter_dir: Path) -> torch.Tensor:
        """The flat weights (in this trainer's order) of a PEFT adapter saved by ``save``."""
        from safetensors.torch import load_file

        saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
        parts = []
        for name, p in sorted(self._named_lora().items()):
            key = name.replace(".default.", ".")
            if key not in saved or saved[key].shape != p.shape:
                raise ValueError(f"adapter {adapter_dir} does not fit this model ({key})")
            parts.append(saved[key].reshape(-1).float())
        return torch.cat(parts)

    def save(self, out: Path) -> Path:
        """The current weights as a PEFT adapter directory, byte for byte the same on every
        trainer holding the same weights: peft writes ``target_modules`` from a set, whose order
        varies between processes, so the config is rewritten in a canonical form."""
        self.model.save_pretrained(str(out))
        path = out / "adapter_config.json"
        config = json.loads(path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out
