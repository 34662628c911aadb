"""``sort``: sort integers ascending, ``"Sort: 5 3 9"`` → ``"3 5 9"``."""

from __future__ import annotations

import random
import re
from typing import Any

from envs.base import Environment, Rubric
from envs.parsers import AnswerParser, Completion

_LIST = re.compile(r"^-?\d+(?:[ ,]+-?\d+)*$")


def _numbers(completion: Completion, parser: AnswerParser) -> list[int] | None:
    got = parser.parse_answer(completion)
    if got is None or not _LIST.match(got):
        return None
    return [int(x) for x in re.split(r"[ ,]+", got)]


def sorted_exactly(completion: Completion, answer: str, parser: AnswerParser) -> float:
    """1.0 when the answer lists exactly the reference numbers in ascending order."""
    got = _numbers(completion, parser)
    return 1.0 if got is not None and got == [int(x) for x in answer.split()] else 0.0


def same_numbers(completion: Completion, answer: str, parser: AnswerParser) -> float:
    """1.0 when the answer holds the right numbers, in any order (zero weight)."""
    got = _numbers(completion, parser)
    return 1.0 if got is not None and sorted(got) == [int(x) for x in answer.split()] else 0.0


class Sort(Environment):
    env_id = "sort"
    version = "1"

    def __init__(self, min_count: int = 3, max_count: int = 6, max_value: int = 99) -> None:
        if not 2 <= min_count <= max_count <= 100:
            raise ValueError(
                f"sort: need 2 <= min_count <= max_count <= 100, got {min_count}, {max_count}"
            )
        if max_value < 1:
            raise ValueError(f"sort: max_value must be >= 1, got {max_value}")
        self.min_count, self.max_count, self.max_value = min_count, max_count, max_value
        super().__init__(Rubric([sorted_exactly, same_numbers], [1.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        values = [
            rng.randint(0, self.max_value)
            for _ in range(rng.randint(self.min_count, self.max_count))
        ]
        question = "Sort: " + " ".join(map(str, values))
        return question, " ".join(map(str, sorted(values))), {"values": values}
