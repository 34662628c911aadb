"""A base model's tokenizer as a node sends it and a gateway checks it (``protocol/tokenizers``)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from node.model.loading import load_tokenizer as load
from node.model.tiny import build_tokenizer
from protocol.tokenizers import MAX_BYTES, BadBundle, fingerprint, pack, unpack


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(out)
    return out


def test_the_fingerprint_survives_packing_and_reloading(saved: Path, tmp_path: Path) -> None:
    original = load(saved)
    again = load(unpack(pack(saved), tmp_path / "unpacked"))
    assert fingerprint(again) == fingerprint(original)
    assert len(fingerprint(original)) == 64
    # what counting depends on is what the fingerprint covers: one added token, or another
    # chat template, is another tokenizer
    more = load(saved)
    more.add_tokens(["12"])
    assert fingerprint(more) != fingerprint(original)
    other = load(saved)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert fingerprint(other) != fingerprint(original)


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"../tokenizer.json": b"{}"}, "not tokenizer files"),
        ({"tokenizer.json": b"{}", "model.safetensors": b"x"}, "not tokenizer files"),
        ({"tokenizer_config.json": b"{}"}, "no tokenizer.json"),
    ],
)
def test_files_that_are_not_a_tokenizer_are_refused(
    files: dict[str, bytes], why: str, tmp_path: Path
) -> None:
    with pytest.raises(BadBundle, match=why):
        unpack(msgspec.msgpack.encode(files), tmp_path / "in")
    assert not (tmp_path / "in").exists() and not (tmp_path / "tokenizer.json").exists()


def test_garbage_and_oversized_bundles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadBundle, match="not a map"):
        unpack(b"\xc1 not msgpack", tmp_path / "in")
    with pytest.raises(BadBundle, match="more than"):
        unpack(b"\x00" * (MAX_BYTES + 1), tmp_path / "in")
