"""``reverse``: reverse a string of letters, ``"Reverse: abcde"`` → ``"edcba"``."""

from __future__ import annotations

import random
import string
from typing import Any

from envs.base import Environment, Rubric
from envs.parsers import AnswerParser, Completion
from envs.rewards import exact_match


def position_accuracy(completion: Completion, answer: str, parser: AnswerParser) -> float:
    """Fraction of positions holding the right letter (a learning signal, zero weight)."""
    got = parser.parse_answer(completion) or ""
    hits = sum(a == b for a, b in zip(got, answer, strict=False))
    return hits / max(len(answer), len(got), 1)


class Reverse(Environment):
    env_id = "reverse"
    version = "1"

    def __init__(self, min_len: int = 3, max_len: int = 8, alphabet: str = string.ascii_lowercase):
        if not 1 <= min_len <= max_len <= 200:
            raise ValueError(
                f"reverse: need 1 <= min_len <= max_len <= 200, got {min_len}, {max_len}"
            )
        if not alphabet:
            raise ValueError("reverse: alphabet must not be empty")
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet
        super().__init__(Rubric([exact_match, position_accuracy], [1.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        n = rng.randint(self.min_len, self.max_len)
        word = "".join(rng.choice(self.alphabet) for _ in range(n))
        return f"Reverse: {word}", word[::-1], {"length": n}
