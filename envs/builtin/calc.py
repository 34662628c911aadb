"""``calc``: arithmetic on numbers too large to guess, with a calculator tool.

The model is asked, say, ``48213 * 9127`` and given one tool, ``calculate``; the answer is out of
reach without it (one chance in a hundred million by guessing the digits). An episode: the model
calls the tool (``<tool_call>{"name": "calculate", "arguments": {"expression": "48213 * 9127"}}
</tool_call>``), reads the result, and answers with the number. Reward: the final reply's number
equals the product; metrics: whether a tool was called, and how many calls failed.

The calculator evaluates integer arithmetic (``+ - * // %``, parentheses) by walking Python's
syntax tree, not ``eval``: nothing but those operators and integer literals is accepted, and
operands are capped at 200 bits so a call cannot run long.

>>> calculate("(12 + 3) * 4")
'60'
>>> calculate("__import__('os')")
Traceback (most recent call last):
...
ValueError: only integers and + - * // % are allowed, not Call
"""

from __future__ import annotations

import ast
import operator
import random
from collections.abc import Callable
from typing import Any, ClassVar

from envs.base import Message, Rubric, ToolEnvironment
from envs.rewards import last_integer
from envs.tools import parse_tool_calls

_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}  # fmt: skip
MAX_BITS = 200


def calculate(expression: str) -> str:
    """Evaluate an integer arithmetic expression exactly.

    Args:
        expression: integers with + - * // % and parentheses, e.g. "(12 + 3) * 4"
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    return str(_eval(ast.parse(expression.strip(), mode="eval").body))


def _eval(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _eval(node.operand)
        value = -inner if isinstance(node.op, ast.USub) else inner
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    else:
        raise ValueError(f"only integers and + - * // % are allowed, not {type(node).__name__}")
    if value.bit_length() > MAX_BITS:
        raise ValueError(f"numbers beyond {MAX_BITS} bits are not supported")
    return value


class Calc(ToolEnvironment):
    env_id = "calc"
    version = "1"
    tools: ClassVar[list[Callable[..., Any]]] = [calculate]
    system_prompt = "Answer with the number alone."

    def __init__(self, digits: int = 5, max_turns: int = 3) -> None:
        if not 3 <= digits <= 12:
            raise ValueError(f"calc: digits must be 3..12, got {digits}")
        self.digits, self.max_turns = digits, max_turns
        super().__init__(Rubric([self.correct, self.used_tool, self.tool_errors], [1.0, 0.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        a = rng.randrange(10 ** (self.digits - 1), 10**self.digits)
        b = rng.randrange(10 ** (self.digits - 2), 10 ** (self.digits - 1))
        return f"{a} * {b} =", str(a * b), {"a": a, "b": b}

    @staticmethod
    def correct(completion: str | list[Message], answer: str) -> float:
        """The final reply's last integer (outside any tool call) is the product."""
        text = completion if isinstance(completion, str) else completion[-1].get("content", "")
        return float(last_integer(parse_tool_calls(text)[0]) == answer)

    @staticmethod
    def used_tool(state: dict[str, Any]) -> float:
        return float(state.get("tool_calls", 0) > 0)

    @staticmethod
    def tool_errors(state: dict[str, Any]) -> float:
        return float(state.get("tool_errors", 0))
