"""``guess``: find a hidden number in a few turns, told "higher" or "lower" after each guess.

A multi-turn game with feedback. The model answers with a number; the environment says
``higher``, ``lower`` (or, for a reply that is not a number in range, how to answer) until the
number is found or ``max_turns`` guesses are spent. Reward: 1 for finding it, less 0.1 per
extra guess (at least 0.5), so binary search beats luck; when it is not found, 0.2 times the
share of replies that were numbers in range — a first step a small model can learn, worth less
than any win.

>>> env = Guess(high=8)
>>> ex = env.example(seed=1, index=0)
>>> env.score(ex, [{"role": "assistant", "content": ex.answer}], {"turn": 1}).reward
1.0
"""

from __future__ import annotations

import random
import re
from typing import Any

from envs.base import Example, Message, MultiTurnEnvironment, Rubric

_NUMBER = re.compile(r"^\s*(\d{1,6})\s*$")


class Guess(MultiTurnEnvironment):
    env_id = "guess"
    version = "1"

    def __init__(self, high: int = 16, max_turns: int = 6) -> None:
        if not 2 <= high <= 10_000:
            raise ValueError(f"guess: high must be 2..10000, got {high}")
        if not 1 <= max_turns <= 32:
            raise ValueError(f"guess: max_turns must be 1..32, got {max_turns}")
        self.high, self.max_turns = high, max_turns
        super().__init__(Rubric([self.game, self.found, self.valid, self.guesses],
                                [1.0, 0.0, 0.0, 0.0]))  # fmt: skip

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        return f"Guess my number from 1 to {self.high}.", str(rng.randint(1, self.high)), {}

    def initial_state(self, example: Example) -> dict[str, Any]:
        return {"turn": 0, "answer": example.answer}

    def is_completed(self, messages: list[Message], state: dict[str, Any]) -> bool:
        return _guess(messages[-1]["content"]) == int(state["answer"])

    def env_response(
        self, messages: list[Message], state: dict[str, Any]
    ) -> tuple[list[Message], dict[str, Any]]:
        guess = _guess(messages[-1]["content"])
        if guess is None or not 1 <= guess <= self.high:
            hint = f"Say just a number from 1 to {self.high}."
        else:
            hint = "higher" if guess < int(state["answer"]) else "lower"
        return [{"role": "user", "content": hint}], state

    def game(self, completion: list[Message], answer: str, state: dict[str, Any]) -> float:
        """A win (``found``), else a little for answering in the game's terms (``valid``)."""
        won = self.found(completion, answer, state)
        return won if won > 0 else 0.2 * self.valid(completion)

    def found(self, completion: list[Message], answer: str, state: dict[str, Any]) -> float:
        """1 for finding the number, less 0.1 per guess after the first (at least 0.5)."""
        if not isinstance(completion, list) or not completion:
            return 0.0
        if _guess(completion[-1].get("content", "")) != int(answer):
            return 0.0
        return max(0.5, 1.0 - 0.1 * (state.get("turn", 1) - 1))

    def valid(self, completion: list[Message]) -> float:
        """The share of the model's replies that were a number from 1 to ``high``."""
        if not isinstance(completion, list):
            return 0.0
        replies = [m.get("content", "") for m in completion if m.get("role") == "assistant"]
        ok = [g for g in map(_guess, replies) if g is not None and 1 <= g <= self.high]
        return len(ok) / len(replies) if replies else 0.0

    def guesses(self, state: dict[str, Any]) -> float:
        return float(state.get("turn", 0))


def _guess(text: str) -> int | None:
    match = _NUMBER.match(text)
    return int(match.group(1)) if match else None
