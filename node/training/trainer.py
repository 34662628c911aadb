"""A trainer's model: LoRA on the base model, inner AdamW steps on rollouts with the GRPO loss,
and one DiLoCo round (pseudo-gradient → collective → outer step) that leaves every trainer of
the group with the same adapter bytes.

Rollouts become training examples here: the prompt is rebuilt from the lease (never taken from
the producer), rewards are recomputed with the environment (``verification.rollouts``), and each
completion keeps the logprobs its producer committed, the behaviour policy of the importance
ratio. Version 0 of a run's adapter is the same on every trainer: LoRA's A matrices are drawn
from a generator seeded by the run id, B starts at zero (so v0 changes nothing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.training.diloco import OuterOptimizer, Quantizer, levels_for
from node.training.grpo import LossSettings, LossStats, group_advantages, grpo_loss
from protocol.adapters import TrainSettings
from protocol.leases import Lease
from protocol.rollouts import RolloutPayload
from verification.rollouts import lease_examples, prompt_ids, sample_tokens, score_rollouts


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Completion:
    prompt: list[int]
    tokens: list[int]
    behaviour: list[float]
    advantage: float
    reward: float


def training_examples(
    env: Any,
    tokenizer: Any,
    lease: Lease,
    payload: RolloutPayload,
    std_normalize: bool = False,
    scores: Any = None,
) -> list[Completion]:
    """A leased payload as training completions (groups without reward spread left out);
    ``scores`` (``score_rollouts``'s) if already computed."""
    scores = scores if scores is not None else score_rollouts(env, tokenizer, lease, payload)
    rewards_G_S = torch.tensor([[s.reward for s in group] for group in scores])
    adv_G_S, keep_G = group_advantages(rewards_G_S, std_normalize)
    out = []
    for g, example in enumerate(lease_examples(env, lease)):
        if not keep_G[g]:
            continue
        prompt = prompt_ids(tokenizer, example.prompt)
        for s in range(lease.group_size):
            sample = payload.samples[g * lease.group_size + s]
            ids, logprobs = sample_tokens(sample)
            out.append(Completion(prompt, ids.tolist(), logprobs.tolist(),
                                  float(adv_G_S[g, s]), float(rewards_G_S[g, s])))  # fmt: skip
    return out


class LoraTrainer:
    def __init__(
        self,
        base: str,
        run_id: str,
        lora: LoraSettings | None = None,
        loss: LossSettings | None = None,
        inner_lr: float = 1e-3,
    ) -> None:
        lora, loss = lora or LoraSettings(), loss or LossSettings()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
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
            valid_B_T[i, : len(c.tokens)] = 1
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


def trainer_parts(
    base: str, run_id: str, s: TrainSettings
) -> tuple[LoraTrainer, Quantizer, OuterOptimizer]:
    """A run's trainer as its settings say (LoRA, loss, inner lr), the quantizer of its
    pseudo-gradients (levels for groups of up to 8; AdamW moves a weight about lr a step at
    most, so H steps bound it by lr·H) and its outer optimizer."""
    lora = LoraSettings(s.lora_rank, s.lora_alpha, tuple(s.target_modules))
    loss = LossSettings(
        std_normalize=s.std_normalize, clip_eps=s.clip_eps or float("inf"),
        mask_low=s.mask_low, mask_high=s.mask_high, normalize=s.normalize,
        constant=s.constant, kl_coef=s.kl_coef,
    )  # fmt: skip
    trainer = LoraTrainer(base, run_id, lora=lora, loss=loss, inner_lr=s.inner_lr)
    levels = levels_for(8, s.wire)
    quantizer = Quantizer(trainer.sizes, levels, s.inner_lr * s.inner_steps / levels)
    outer = OuterOptimizer(s.outer_lr, s.outer_momentum, nesterov=s.outer_momentum > 0)
    return trainer, quantizer, outer


def inner_batches(examples: Sequence[Completion], h: int) -> list[Sequence[Completion]]:
    """A round's completions cut into ``h`` equal batches, one per inner step (the remainder
    left out; fewer batches when there are fewer completions than steps, none without any)."""
    size = max(1, len(examples) // h)
    return [b for b in (examples[i * size : (i + 1) * size] for i in range(h)) if b]


def diloco_round(
    trainer: LoraTrainer,
    batches: Sequence[Sequence[Completion]],
    quantizer: Quantizer,
    outer: OuterOptimizer,
    average: Callable[[np.ndarray], tuple[np.ndarray, int]],
) -> tuple[torch.Tensor, list[LossStats], int]:
    """H = ``len(batches)`` inner steps from the global weights, then the group's averaged
    pseudo-gradient and the outer step; returns ``(new global weights, inner stats, group
    size)`` with the new weights loaded."""
    global_w = trainer.flat()
    stats = [trainer.inner_step(b) for b in batches]
    pseudo_grad = global_w - trainer.flat()
    q = quantizer.encode(pseudo_grad)
    integer_sum, k = average(q.numpy())
    mean = quantizer.decode_mean(torch.from_numpy(np.asarray(integer_sum)), k)
    new_w = outer.step(global_w, mean)
    quantizer.rescale((global_w - new_w) / outer.lr)
    trainer.load_flat(new_w)
    return new_w, stats, k


def export_state(
    version: int, trainer: LoraTrainer, quantizer: Quantizer, outer: OuterOptimizer
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """What a trainer joining later needs to continue from the same bits: the version, the
    quantizer's scales (metadata); the global weights and the outer momentum (tensors)."""
    weights = trainer.flat()
    momentum = outer.buffer if outer.buffer is not None else torch.zeros_like(weights)
    return {"version": version, "scales": list(quantizer.scales)}, [
        weights.numpy(),
        momentum.numpy(),
    ]


def import_state(
    state: tuple[dict[str, Any], list[np.ndarray]],
    trainer: LoraTrainer,
    quantizer: Quantizer,
    outer: OuterOptimizer,
) -> int:
    """Load another trainer's ``export_state``; returns its version."""
    metadata, (weights, momentum) = state
    trainer.load_flat(torch.from_numpy(np.array(weights)))
    outer.buffer = torch.from_numpy(np.array(momentum)) if outer.momentum else None
    quantizer.scales = [float(s) for s in metadata["scales"]]
    return int(metadata["version"])
