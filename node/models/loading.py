"""Loading a base model and its tokenizer: the tiny model, a local directory, a Hugging Face id,
or a GGUF file — all through transformers' own ``from_pretrained``.

No network is used at run time unless the reference is a hub id not in the local cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY = "tiny"


def resolve(ref: str, data_dir: Path) -> str:
    """``tiny`` (or empty) becomes the built tiny model's directory; anything else stays."""
    if ref in ("", TINY):
        from node.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(data_dir))
    return ref


def load_pretrained(ref: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a directory, a hub id, or a ``.gguf`` file, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ValueError(f"no GGUF file at {path}")
        kwargs["gguf_file"] = path.name
        ref = str(path.parent)
    tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype or torch.float32, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
