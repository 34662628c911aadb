"""The tiny model: a ~0.8M-parameter Llama with a byte-level tokenizer, built and warm-started here.

Machines without a GPU or a model hub still need a real transformer to run the whole loop, so the
project builds one: a Llama-architecture model (transformers' ``LlamaForCausalLM``) whose
tokenizer is byte-level (256 byte tokens + chat specials, with a chat template), saved in Hugging
Face format (config, safetensors, tokenizer files) and loaded back through the same code path as
any checkpoint. A short supervised phase on built-in tasks (2-digit addition and string reversal)
stops once greedy accuracy on held-out additions reaches ``target_accuracy`` — deliberately well
below perfect, so reinforcement learning has room to improve it.

The build is deterministic for a seed (same data order, same initialization, same steps) and
cached in ``<data dir>/models``; ``bazaar model tiny`` builds it with a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
META_FILE = "bazaar-tiny.json"


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    target_accuracy: float = 0.4
    """Stop the supervised phase once greedy accuracy on held-out 2-digit additions reaches this."""
    max_steps: int = 1500
    """Length of the learning-rate schedule (warmup, cosine decay); training may stop earlier."""
    warmup_steps: int = 100
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 1024
    """Context: room for tool declarations and a few turns of an episode."""
    batch_size: int = 64
    lr: float = 1e-3

    def cache_name(self) -> str:
        """``tiny-seed<seed>-<hash>``: the hash of these settings, of the code that builds the
        model (this module, the environment it warm-starts on) and of the torch and
        transformers versions, so a change to any of them builds a new model rather than
        reuse a stale one, and every user of the cache (tests, ``bazaar up``) shares one."""
        import dataclasses
        import hashlib

        import torch
        import transformers

        from envs import base
        from envs.builtin import arith, reverse

        h = hashlib.sha256(repr(dataclasses.astuple(self)).encode())
        for module in (__file__, base.__file__, arith.__file__, reverse.__file__):
            h.update(Path(module).read_bytes())
        h.update(f"{torch.__version__} {transformers.__version__}".encode())
        return f"tiny-seed{self.seed}-{h.hexdigest()[:12]}"


def build_tokenizer() -> Any:
    """A byte-level tokenizer: every byte is a token, so any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(data_dir: Path, spec: TinySpec | None = None) -> Path:
    return data_dir / "models" / (spec or TinySpec()).cache_name()


def ensure_tiny_model(
    data_dir: Path,
    spec: TinySpec | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> Path:
    """The tiny model's directory, built first if it is not cached yet."""
    spec = spec or TinySpec()
    out = tiny_model_dir(data_dir, spec)
    if (out / META_FILE).exists():
        return out
    return build_tiny_model(out, spec, progress)


def build_tiny_model(
    out: Path,
    spec: TinySpec | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> Path:
    """Build, warm-start and save the tiny model in ``out``; ``progress(step, loss, accuracy)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from envs import load_environment

    spec = spec or TinySpec()
    tok = build_tokenizer()
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
    arith, reverse = load_environment("arith", digits=2), load_environment("reverse", max_len=5)
    envs = [arith, arith, arith, reverse]
    held_out = load_environment("arith", digits=2).examples(
        seed=10_000 + spec.seed, start=0, count=128
    )
    rng = random.Random(spec.seed)
    accuracy, step, loss_value = 0.0, 0, float("nan")
    for step in range(1, spec.max_steps + 1):
        warm = min(1.0, step / spec.warmup_steps)
        for group in optim.param_groups:
            group["lr"] = spec.lr * warm * 0.5 * (1 + math.cos(math.pi * step / spec.max_steps))
        batch = [
            rng.choice(envs).example(spec.seed, rng.randrange(1 << 30))
            for _ in range(spec.batch_size)
        ]
        input_ids, labels, mask = _sft_batch(tok, [(e.prompt, e.answer) for e in batch])
        model.train()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        loss_value = loss.item()
        # accuracy climbs steeply once addition "clicks": check often, to stop near the target
        if step >= 200 and step % 25 == 0:
            accuracy = greedy_accuracy(model, tok, held_out)
            if progress:
                progress(step, loss_value, accuracy)
            if accuracy >= spec.target_accuracy:
                break
    meta = {**asdict(spec), "steps": step, "final_loss": loss_value, "accuracy": accuracy}
    return save_model(out, model, tok, META_FILE, meta)


def save_model(out: Path, model: Any, tok: Any, meta_file: str, meta: dict[str, Any]) -> Path:
    """Save a built model in ``out`` with its ``meta_file``: beside the target, then renamed into
    place, so processes sharing a model cache never see (or load) a half-written model, and
    the first finished build wins."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        dir=out.parent, prefix=f".{out.name}-", ignore_cleanup_errors=True
    ) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (Path(tmp) / meta_file).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists() and not (out / meta_file).exists():
            shutil.rmtree(out)  # an unfinished directory of an older version
        with contextlib.suppress(OSError):  # another process finished first: keep theirs
            os.rename(tmp, out)
    return out


def _sft_batch(tok: Any, pairs: list[tuple[list[dict[str, str]], str]]) -> tuple[Any, Any, Any]:
    """Right-padded ids, labels (-100 outside the answer and its end token), attention mask."""
    from verification.rollouts import prompt_ids

    rows = []
    for prompt, answer in pairs:
        p = prompt_ids(tok, prompt)
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    return pad_rows(tok, rows)


def pad_rows(tok: Any, rows: list[tuple[list[int], list[int]]]) -> tuple[Any, Any, Any]:
    """``(ids, labels)`` rows right-padded: ids, labels (-100 in the padding), attention mask."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def greedy_accuracy(model: Any, tok: Any, examples: list[Any], max_new_tokens: int = 8) -> float:
    """Share of examples whose greedy completion is exactly the answer."""
    import torch

    from node.model.batching import left_pad
    from verification.rollouts import prompt_ids

    model.eval()
    ids, mask = left_pad([prompt_ids(tok, e.prompt) for e in examples], tok.pad_token_id)
    width = ids.shape[1]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(t.strip() == e.answer for t, e in zip(texts, examples, strict=True)) / len(examples)
