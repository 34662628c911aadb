"""``countdown``: reach a target with some of the given numbers and + - * /.

The expression is checked by a small evaluator over Python's AST, never ``eval``: only integer
literals, the four operators and parentheses are allowed; arithmetic is exact (fractions);
every number used must be one of those given (each at most as often as it was given); length and
magnitudes are capped, so no answer can make scoring expensive.

>>> evaluate("(25 - 5) * 3")
Fraction(60, 1)
>>> evaluate("__import__('os').system('true')") is None
True
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction
from typing import Any

from envs.base import Environment, Rubric
from envs.parsers import AnswerParser, Completion

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**12
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


class _Invalid(Exception):
    pass


def _walk(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if not 0 <= node.value <= MAX_MAGNITUDE:
            raise _Invalid
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        left, right = _walk(node.left, used), _walk(node.right, used)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _Invalid
            value = left / right
        elif type(node.op) in _OPS:
            value = _OPS[type(node.op)](left, right)
        else:
            raise _Invalid
        if abs(value) > MAX_MAGNITUDE:
            raise _Invalid
        return value
    raise _Invalid


def evaluate(expression: str, used: list[int] | None = None) -> Fraction | None:
    """The exact value of an arithmetic expression, or None if it is not one we allow."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression, mode="eval")
        return _walk(tree, used if used is not None else [])
    except (SyntaxError, ValueError, _Invalid, RecursionError, MemoryError):
        return None


def _check(completion: Completion, info: dict[str, Any], parser: AnswerParser):
    expression = parser.parse_answer(completion)
    if expression is None:
        return None, False
    used: list[int] = []
    value = evaluate(expression, used)
    allowed = not Counter(used) - Counter(info["numbers"])
    return value, allowed


def reaches_target(completion: Completion, info: dict[str, Any], parser: AnswerParser) -> float:
    """1.0 for a valid expression over the given numbers whose value is the target."""
    value, allowed = _check(completion, info, parser)
    return 1.0 if value is not None and allowed and value == info["target"] else 0.0


def valid_expression(completion: Completion, info: dict[str, Any], parser: AnswerParser) -> float:
    """1.0 for a well-formed expression over the given numbers, right or not (zero weight)."""
    value, allowed = _check(completion, info, parser)
    return 1.0 if value is not None and allowed else 0.0


class Countdown(Environment):
    env_id = "countdown"
    version = "1"

    def __init__(self, count: int = 4, max_number: int = 25) -> None:
        if not 2 <= count <= 8:
            raise ValueError(f"countdown: count must be 2..8, got {count}")
        if not 2 <= max_number <= 1000:
            raise ValueError(f"countdown: max_number must be 2..1000, got {max_number}")
        self.count, self.max_number = count, max_number
        super().__init__(Rubric([reaches_target, valid_expression], [1.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
        # build a solvable target from a random subset, keeping every partial a positive integer
        order = rng.sample(numbers, rng.randint(2, self.count))
        value, text = order[0], str(order[0])
        for n in order[1:]:
            choices = ["+", "*"] + (["-"] if value > n else []) + (["/"] if value % n == 0 else [])
            op = rng.choice(choices)
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
            text = f"({text} {op} {n})"
        question = (
            f"Using some of the numbers {', '.join(map(str, numbers))} (each at most once) and "
            f"+ - * /, write an expression equal to {value}."
        )
        return (
            question,
            text[1:-1] if text.startswith("(") else text,
            {"numbers": numbers, "target": value},
        )
