"""``code``: write a small Python function; the reward runs it against unit tests in the sandbox.

Each example asks for a function ``solve`` (the sum of a list's numbers above a bound, the words
of a string reversed, ...: ``TASKS``) with inputs drawn from the example's seed. The model may
call one tool, ``run_python``, to try code out (its output, or the error, comes back as a ``tool``
message), then answers with the function in a ```` ```python ```` block.

Reward: the share of the example's hidden test cases that the answer's ``solve`` gets right, run
in ``envs.sandbox`` (no network, its own uid, CPU and memory limits, killed after). The sandboxed
program prints ``solve``'s result for each case's arguments only; the expected values never enter
the sandbox and are compared here, so an answer that prints or forges results earns nothing it did
not compute. Outputs are reproducible (hashing seeded, ``random`` seeded, time limits by CPU
seconds), as a verifier replaying a tool call needs; a program that reads the clock is not.

>>> env = Code()
>>> ex = env.example(seed=0, index=0)
>>> ex.info["task"] in TASKS
True
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from envs.base import Message, Rubric, ToolEnvironment
from envs.sandbox import Limits, SandboxUnavailable
from envs.sandbox import run_python as sandboxed

LIMITS = Limits(wall_s=5.0, cpu_s=2, memory_bytes=256 << 20, max_output_bytes=16 << 10)
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)
_CASE = re.compile(r"^BAZAAR-CASE (\d+) (.*)$", re.MULTILINE)
PRELUDE = "import random as _random\n_random.seed(0)\n"
"""Run before any program: ``random`` gives the same numbers on every peer."""


@dataclass(frozen=True)
class Task:
    prompt: str
    """What ``solve`` does, as the model is told ("returns ...")."""
    signature: str
    reference: Callable[..., Any]
    cases: Callable[[random.Random], list[tuple[Any, ...]]]


def _int_lists(rng: random.Random) -> list[tuple[Any, ...]]:
    return [([rng.randint(-20, 20) for _ in range(rng.randint(0, 8))],) for _ in range(6)]


def _bounded(rng: random.Random) -> list[tuple[Any, ...]]:
    return [(xs, rng.randint(-5, 5)) for (xs,) in _int_lists(rng)]


def _words(rng: random.Random) -> list[tuple[Any, ...]]:
    vocab = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
    return [(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 5))),) for _ in range(6)]


def _char_counts(rng: random.Random) -> list[tuple[Any, ...]]:
    return [("".join(rng.choice("abc") for _ in range(rng.randint(0, 10))), rng.choice("abc"))
            for _ in range(6)]  # fmt: skip


TASKS: dict[str, Task] = {
    "sum_above": Task("returns the sum of the numbers in xs that are greater than k",
                      "solve(xs, k)", lambda xs, k: sum(x for x in xs if x > k), _bounded),
    "evens": Task("returns the even numbers of xs, in order", "solve(xs)",
                  lambda xs: [x for x in xs if x % 2 == 0], _int_lists),
    "spread": Task("returns the largest number of xs minus the smallest (0 for an empty list)",
                   "solve(xs)", lambda xs: max(xs) - min(xs) if xs else 0, _int_lists),
    "reverse_words": Task("returns the words of s in reverse order, joined by single spaces",
                          "solve(s)", lambda s: " ".join(reversed(s.split())), _words),
    "count_char": Task("returns how many times the character c occurs in s", "solve(s, c)",
                       lambda s, c: s.count(c), _char_counts),
}  # fmt: skip


def run_python(code: str) -> str:
    """Run a Python program in a sandbox and show what it printed.

    Args:
        code: the program; print what you want to see
    """
    try:
        result = sandboxed(PRELUDE + code, limits=LIMITS)
    except SandboxUnavailable as e:
        return f"error: no sandbox here ({e})"
    if result.timed_out or result.exit_code in (-9, -24):  # wall clock, CPU (SIGKILL, SIGXCPU)
        return "error: the program ran out of time"
    out = f"exit code {result.exit_code}\n{result.stdout[-1500:]}"
    if result.stderr:
        out += f"\nstderr:\n{result.stderr[-600:]}"
    return out


def answer_code(completion: str | list[Message]) -> str:
    """The program of the final reply: its last ```` ```python ```` block, else the whole reply."""
    text = completion if isinstance(completion, str) else completion[-1].get("content", "")
    blocks = _FENCE.findall(text)
    return str(blocks[-1] if blocks else text)


def check(code: str, cases: list[tuple[Any, ...]], expected: list[Any]) -> list[bool]:
    """Which cases ``code``'s ``solve`` gets right, run in the sandbox (all False if it cannot
    run: no sandbox, a syntax error, a crash before the cases, out of time)."""
    harness = (
        PRELUDE + code + "\n\nimport json as _json\n"
        f"for _i, _args in enumerate(_json.loads({json.dumps(json.dumps(cases))})):\n"
        "    try:\n"
        "        print('BAZAAR-CASE', _i, _json.dumps(solve(*_args)), flush=True)\n"
        "    except BaseException:\n"
        "        print('BAZAAR-CASE', _i, 'null', flush=True)\n"
    )
    try:
        result = sandboxed(harness, limits=LIMITS)
    except SandboxUnavailable:
        return [False] * len(cases)
    got: dict[int, Any] = {}
    for index, value in _CASE.findall(result.stdout):
        try:
            got[int(index)] = json.loads(value)
        except ValueError:
            continue
    return [i in got and got[i] == want for i, want in enumerate(expected)]


class Code(ToolEnvironment):
    env_id = "code"
    version = "1"
    tools: ClassVar[list[Callable[..., Any]]] = [run_python]
    system_prompt = (
        "Answer with the function in a ```python block. You may run code with the tool first."
    )

    def __init__(self, tasks: str = "", max_turns: int = 3) -> None:
        names = [t for t in tasks.split(",") if t] or list(TASKS)
        unknown = set(names) - set(TASKS)
        if unknown:
            raise ValueError(f"code: unknown tasks {sorted(unknown)} (tasks: {', '.join(TASKS)})")
        self.task_names, self.max_turns = names, max_turns
        super().__init__(Rubric([self.passed, self.all_passed], [1.0, 0.0]))

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        name = rng.choice(self.task_names)
        task = TASKS[name]
        cases = task.cases(rng)
        expected = [task.reference(*c) for c in cases]
        question = f"Write a Python function {task.signature} that {task.prompt}."
        return question, json.dumps(expected), {"task": name, "cases": cases}

    def passed(self, completion: str | list[Message], answer: str, info: dict[str, Any],
               state: dict[str, Any]) -> float:  # fmt: skip
        """Share of the hidden cases right (computed once per episode, kept in its state)."""
        if "passed" not in state:
            results = check(answer_code(completion), info["cases"], json.loads(answer))
            state["passed"] = sum(results) / len(results) if results else 0.0
        return float(state["passed"])

    @staticmethod
    def all_passed(state: dict[str, Any]) -> float:
        return float(state.get("passed", 0.0) == 1.0)
