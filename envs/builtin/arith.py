"""``arith``: multi-digit arithmetic, ``"37 + 48 ="`` → ``"85"``.

Two phrasings. ``bare`` (the default, for the tiny model, which completes text): the prompt is
the sum alone and the whole answer must be the number. ``question`` (for chat models, which
answer in sentences): ``"What is 37 + 48?"``, read as gsm reads word problems (the tagged
answer, or else the last integer), so the task is the sum, said plainly enough to be read.
"""

from __future__ import annotations

import random
from typing import Any

from envs.base import Environment, Rubric
from envs.rewards import digit_accuracy, exact_match, final_number, is_integer

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Arith(Environment):
    env_id = "arith"
    version = "1"

    def __init__(
        self, digits: int = 2, ops: str = "+", terms: int = 2, phrasing: str = "bare"
    ) -> None:
        if not 1 <= digits <= 12:
            raise ValueError(f"arith: digits must be 1..12, got {digits}")
        if not ops or set(ops) - set(OPS):
            raise ValueError(
                f"arith: ops must be a non-empty string of {''.join(OPS)}, got {ops!r}"
            )
        if not 2 <= terms <= 6:
            raise ValueError(f"arith: terms must be 2..6, got {terms}")
        if phrasing not in ("bare", "question"):
            raise ValueError(f"arith: phrasing must be 'bare' or 'question', got {phrasing!r}")
        self.digits, self.ops, self.terms, self.phrasing = digits, ops, terms, phrasing
        if phrasing == "question":
            super().__init__(Rubric([final_number, is_integer], [1.0, 0.0]))
        else:
            super().__init__(Rubric([exact_match, is_integer, digit_accuracy], [1.0, 0.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        numbers = [rng.randrange(10**self.digits) for _ in range(self.terms)]
        ops = [rng.choice(self.ops) for _ in range(self.terms - 1)]
        # evaluated left to right; the text brackets a sum before a product so it says the same
        value, text, summed = numbers[0], str(numbers[0]), False
        for op, n in zip(ops, numbers[1:], strict=True):
            value = OPS[op](value, n)
            text = f"({text}) {op} {n}" if op == "*" and summed else f"{text} {op} {n}"
            summed = summed or op != "*"
        question = f"What is {text}?" if self.phrasing == "question" else f"{text} ="
        return question, str(value), {"numbers": numbers, "ops": ops}
