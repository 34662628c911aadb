"""A base model's tokenizer, passed from a serving node to a gateway and checked against the
coordinator's record of it.

The gateway counts every request's tokens itself (a node's usage is never trusted), so it needs
each base model's tokenizer — and it need not be configured with one per model: it fetches the
files from a node that serves the model (``GET /v1/tokenizer`` on the serving endpoint) and
keeps them only if their ``fingerprint`` is the one the coordinator publishes for that base
model (with the serving routes), computed from the tokenizer the coordinator recounts rollouts
with (``--tokenizers.<model>``). A node that sends another tokenizer — one that would count its
outputs short — is refused, and the next node is asked.

The fingerprint covers what counting depends on, not file bytes: the Rust tokenizer's JSON
(vocabulary, merges, normalizer, pre-tokenizer, added tokens), canonicalized, and the chat
template. The same tokenizer saved by two versions of ``transformers`` still matches.

Files travel as a msgpack map of name → bytes, limited to the names a tokenizer is loaded from
(never a path) and to ``MAX_BYTES`` in all. Loading a tokenizer (``transformers``) is each
side's own: this module stays free of model libraries, as all of ``protocol`` does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
MAX_BYTES = 64 << 20


class BadBundle(ValueError):
    """Tokenizer files that cannot be taken: a name not a tokenizer file, too large, not msgpack."""


def fingerprint(tok: Any) -> str:
    """The sha256 (hex) of a loaded tokenizer's canonical JSON and chat template."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("only a fast (Rust-backed) tokenizer has a fingerprint")
    canonical = {"tokenizer": json.loads(backend.to_str()), "chat_template": tok.chat_template}
    body = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def pretrained_args(ref: str | Path) -> tuple[str, dict[str, str]]:
    """``from_pretrained``'s arguments for a model directory, a hub id or a ``.gguf`` file (read
    from its folder, named by ``gguf_file``): how every process loads a tokenizer or a model."""
    path = Path(ref)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(ref), {}


def pack(model_dir: Path) -> bytes:
    """The tokenizer files of a model directory, as the serving endpoint sends them."""
    present = [name for name in FILES if (model_dir / name).is_file()]
    files = {name: (model_dir / name).read_bytes() for name in present}
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    return msgspec.msgpack.encode(files)


def unpack(data: bytes, into: Path) -> Path:
    """Write packed tokenizer files into the directory ``into``; ``BadBundle`` if they are not
    tokenizer files alone, within ``MAX_BYTES``."""
    if len(data) > MAX_BYTES:
        raise BadBundle(f"tokenizer files of {len(data):,} bytes: more than {MAX_BYTES:,}")
    try:
        files = msgspec.msgpack.decode(data, type=dict[str, bytes])
    except msgspec.DecodeError as e:
        raise BadBundle(f"not a map of tokenizer files: {e}") from None
    if unknown := sorted(set(files) - set(FILES)):
        raise BadBundle(f"not tokenizer files: {unknown}")
    if "tokenizer.json" not in files:
        raise BadBundle("no tokenizer.json")
    into.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (into / name).write_bytes(body)
    return into


def pack_tokenizer(tok: Any) -> bytes:
    """A loaded tokenizer's files (saved as ``transformers`` saves them), packed: what a node
    sends whatever its model's format (a GGUF file's tokenizer is converted)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return pack(Path(tmp))
