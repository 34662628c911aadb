"""The incremental detokenizer of a choice (``node.model.completions.Tracker``) says what a whole
decode says: its text is the decoded tokens cut at the first stop string, its released deltas
add up to that text and those tokens, and text that could begin a stop string is held back —
for any token sequence, multi-byte characters split across tokens and invalid bytes included,
on the tiny model's byte-level tokenizer and on SmolLM2's BPE tokenizer."""

from __future__ import annotations

import random
from functools import cache
from typing import Any

import pytest

from node.model.backends import Step
from node.model.completions import Tracker, cut_at_stop
from node.model.loading import load_tokenizer, smollm2_path
from node.model.tiny import build_tokenizer

PIECES = ["hello", " world", "é", "日本語", "🦀", " 42", "\n", "STOP", "ST", "the end", "ü", " "]
STOPS = [[], ["STOP"], ["\n\n", "end"], ["日本"], ["🦀 "]]


@cache
def tokenizer(name: str) -> Any:
    if name == "tiny":
        return build_tokenizer()
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 not installed")
    return load_tokenizer(path)


def token_runs(tok: Any, rng: random.Random) -> list[int]:
    """Tokens of random text, with now and then a token from anywhere in the vocabulary (bytes
    that do not make a character, on a byte-level tokenizer)."""
    text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 30)))
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    for _ in range(rng.randrange(3)):
        ids.insert(rng.randrange(len(ids) + 1), rng.randrange(min(tok.vocab_size, 256)))
    return ids


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_incremental_text_is_the_whole_decode(name: str) -> None:
    tok = tokenizer(name)
    rng = random.Random(7)
    for trial in range(300):
        ids, stop = token_runs(tok, rng), rng.choice(STOPS)
        tracker, deltas = Tracker(0, tok, stop, set()), []
        for t in ids:
            ended = tracker.add(Step(0, t, -0.5, []))
            if d := tracker.release(final=False):
                deltas.append(d)
            if ended:
                break
        if d := tracker.release(final=True):
            deltas.append(d)
        whole = tok.decode(ids, skip_special_tokens=True)
        want, stopped = cut_at_stop(whole, stop)
        kept = tok.decode(tracker.ids, skip_special_tokens=True)
        assert tracker.stopped == stopped, (trial, ids, stop)
        assert tracker.text == want, (trial, ids, stop)
        assert kept.startswith(want) or kept.rstrip("\ufffd") == want.rstrip("\ufffd"), trial
        assert "".join(d.text for d in deltas) == tracker.text, trial
        assert sum(len(d.tokens) for d in deltas) == len(tracker.infos), trial
        assert len(tracker.infos) == len(tracker.ids)


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    tok = tokenizer("tiny")
    tracker = Tracker(0, tok, ["STOP"], set())
    released = []
    for t in tok("abc ST", add_special_tokens=False)["input_ids"]:
        tracker.add(Step(0, t, 0.0, []))
        if d := tracker.release(final=False):
            released.append(d.text)
    assert "".join(released) == "abc "  # "ST" may be the start of "STOP"
    for t in tok("OP and more", add_special_tokens=False)["input_ids"]:
        if tracker.add(Step(0, t, 0.0, [])):
            break
    assert tracker.stopped and tracker.text == "abc "
    assert tracker.release(final=True) is None  # nothing after the stop string was released


def test_a_split_character_is_released_whole() -> None:
    tok = tokenizer("tiny")  # byte-level: "日" is three tokens
    tracker = Tracker(0, tok, [], set())
    ids = tok("日本", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6
    got = []
    for t in ids:
        tracker.add(Step(0, t, 0.0, []))
        d = tracker.release(final=False)
        got.append((d.text, len(d.tokens)) if d else None)
    assert got == [None, None, ("日", 3), None, None, ("本", 3)]
