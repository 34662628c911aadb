"""``gsm``: templated grade-school word problems with two or three steps, answered by a number.

The answer is read from ``<answer>`` tags, or else as the last integer in the completion (the
usual GSM8K convention), so a model may show its working first.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from envs.base import Environment, Rubric
from envs.parsers import Completion
from envs.rewards import final_number, last_integer

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]

Template = Callable[[random.Random], tuple[str, int]]


def _buy_give(rng: random.Random) -> tuple[str, int]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b)
    return (
        f"{who} has {a} {item}. {who} buys {b} more and then gives {c} to a friend. "
        f"How many {item} does {who} have now?",
        a + b - c,
    )


def _packs(rng: random.Random) -> tuple[str, int]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per, extra = rng.randint(2, 12), rng.randint(2, 15), rng.randint(0, 20)
    return (
        f"{who} buys {packs} packs of {item} with {per} in each pack, and already had {extra}. "
        f"How many {item} does {who} have in total?",
        packs * per + extra,
    )


def _share(rng: random.Random) -> tuple[str, int]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, kept = rng.randint(2, 9), rng.randint(2, 12), rng.randint(0, 15)
    return (
        f"{who} shares {friends * each + kept} {item} equally among {friends} friends and keeps "
        f"the {kept} left over. How many {item} does each friend get?",
        each,
    )


def _price(rng: random.Random) -> tuple[str, int]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    n, price, paid_extra = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 50)
    paid = n * price + paid_extra
    return (
        f"{item.capitalize()} cost {price} dollars each. {who} buys {n} of them and pays with "
        f"{paid} dollars. How much change does {who} get?",
        paid - n * price,
    )


def _ages(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(NAMES, 2)
    age, diff, years = rng.randint(5, 40), rng.randint(1, 30), rng.randint(1, 20)
    return (
        f"{a} is {age} years old. {b} is {diff} years older than {a}. "
        f"How old will {b} be in {years} years?",
        age + diff + years,
    )


TEMPLATES: list[Template] = [_buy_give, _packs, _share, _price, _ages]


def shows_number(completion: Completion) -> float:
    """1.0 when the completion contains any integer (zero weight)."""
    text = (
        completion
        if isinstance(completion, str)
        else " ".join(m.get("content", "") for m in completion)
    )
    return 1.0 if last_integer(text) is not None else 0.0


class WordProblems(Environment):
    env_id = "gsm"
    version = "1"
    system_prompt = "Solve the problem. Give the final number as <answer>N</answer>."

    def __init__(self) -> None:
        super().__init__(Rubric([final_number, shows_number], [1.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        template = rng.randrange(len(TEMPLATES))
        question, value = TEMPLATES[template](rng)
        return question, str(value), {"template": TEMPLATES[template].__name__.strip("_")}
