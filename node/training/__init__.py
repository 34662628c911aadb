"""The trainer role: GRPO-family loss on LoRA weights, DiLoCo rounds, adapter versions."""
