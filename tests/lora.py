"""Random (non-zero) LoRA adapters for the tiny model, in PEFT format: each seed a different one."""

from __future__ import annotations

from pathlib import Path


def random_adapter(base: Path | str, out: Path, seed: int) -> Path:
    """Save a LoRA adapter of ``base`` with random A and B (so it changes outputs) to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(fresh, config).save_pretrained(out)
    return out
