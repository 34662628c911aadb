"""Adapter versions on disk and on the wire: PEFT format (``PeftModel.from_pretrained`` loads
what a node stores and gives the node's outputs), content-addressed shards that reassemble to
the same files, and a tampered, missing or malformed shard refused with its hash named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from node.model.backends.torch_backend import TorchBackend
from node.store.adapters import AdapterStore, assemble, cut, read_files
from protocol.adapters import AdapterManifest, ShardInfo
from protocol.errors import DecodeError, HashMismatch
from tests.lora import random_adapter


def _manifest(infos: list[ShardInfo], base: Path) -> AdapterManifest:
    base_hash = hashlib.sha256((base / "model.safetensors").read_bytes()).digest()
    return AdapterManifest(run_id="demo", version=1, parent_version=0, base_model_hash=base_hash,
                           shards=infos, total_bytes=sum(i.size for i in infos))  # fmt: skip


def test_shards_reassemble_and_bad_ones_are_named(tiny_model: Path, tmp_path: Path) -> None:
    files = read_files(random_adapter(tiny_model, tmp_path / "lora", seed=1))
    infos, shards = cut(files, shard_bytes=4096)
    assert len(infos) > 3 and all(i.size <= 4096 for i in infos)
    manifest = _manifest(infos, tiny_model)
    by_hash = {i.sha256: s for i, s in zip(infos, shards, strict=True)}
    assert assemble(manifest, by_hash) == files
    tampered = bytearray(shards[2])
    tampered[100] ^= 1
    with pytest.raises(HashMismatch, match=infos[2].sha256.hex()[:16]):
        assemble(manifest, {**by_hash, infos[2].sha256: bytes(tampered)})
    with pytest.raises(KeyError):
        assemble(manifest, {h: s for h, s in by_hash.items() if h != infos[0].sha256})
    junk = [b"\x00" * 4096]  # consistent hashes, but not a bundle
    junk_infos = [ShardInfo(hashlib.sha256(junk[0]).digest(), len(junk[0]))]
    with pytest.raises(DecodeError, match="adapter bundle"):
        assemble(_manifest(junk_infos, tiny_model), {junk_infos[0].sha256: junk[0]})


def test_a_stored_version_is_peft_format_and_matches_the_node(
    tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = read_files(random_adapter(tiny_model, tmp_path / "lora", seed=2))
    infos, shards = cut(files)
    by_hash = {i.sha256: s for i, s in zip(infos, shards, strict=True)}
    assembled = assemble(_manifest(infos, tiny_model), by_hash)
    path = AdapterStore(tmp_path / "adapters").add("demo", 1, assembled)
    node = TorchBackend.from_pretrained(str(tiny_model))
    node.load_adapter("demo@1", str(path))
    prompt, completion = [5, 6, 7, 8], [9, 10, 11]
    ours = node.prefill_logits(prompt, completion, adapter="demo@1")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + completion])).logits[0]
    theirs = logits[len(prompt) - 1 : -1]  # the positions that predict the completion
    assert torch.allclose(torch.as_tensor(ours), theirs, atol=1e-5)
    base = node.prefill_logits(prompt, completion)
    assert not torch.allclose(torch.as_tensor(base), theirs, atol=1e-3)  # the adapter matters
