"""Environments: determinism, reference answers, adversarial answers, registry, harnesses."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from envs import Environment, Example, MultiTurnEnvironment, Rubric, load_environment
from envs.builtin.countdown import evaluate
from envs.registry import BUILTINS
from tests.conftest import REPO

SPECS = [
    ("arith", {}),
    ("arith", {"digits": 4, "ops": "+-*", "terms": 3}),
    ("arith", {"digits": 1, "phrasing": "question"}),
    ("reverse", {}),
    ("sort", {}),
    ("countdown", {}),
    ("gsm", {}),
]


def _dump(name: str, args: dict[str, Any], seed: int, n: int) -> list[list[Any]]:
    env = load_environment(name, **args)
    return [[e.prompt, e.answer, e.info] for e in env.examples(seed, 0, n)]


@pytest.mark.parametrize(("name", "args"), SPECS, ids=lambda x: str(x))
def test_examples_are_a_pure_function_of_id_version_seed_index(
    name: str, args: dict[str, Any]
) -> None:
    here = _dump(name, args, seed=11, n=20)
    code = (
        "import json; from tests.unit.test_envs import _dump; "
        f"print(json.dumps(_dump({name!r}, {args!r}, 11, 20)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(json.dumps(here)) == json.loads(there)  # another process, same examples
    assert here != _dump(name, args, seed=12, n=20)  # another seed, other examples
    env = load_environment(name, **args)
    assert env.example(11, 5) == env.example(11, 5)
    assert [env.example(11, i) for i in (3, 4)] == env.examples(11, 3, 2)  # index, not order


@pytest.mark.parametrize(("name", "args"), SPECS, ids=lambda x: str(x))
def test_reference_answers_score_one_and_wrong_ones_zero(name: str, args: dict[str, Any]) -> None:
    env = load_environment(name, **args)
    for ex in env.examples(seed=3, start=0, count=30):
        right = env.score(ex, f"<answer>{ex.answer}</answer>")
        assert right.reward == 1.0, (ex, right)
        assert env.score(ex, "<answer>no idea</answer>").reward == 0.0
        assert set(right.metrics) == {f.__name__ for f in env.rubric.funcs}


def test_groups_are_scored_completion_by_completion() -> None:
    env = load_environment("arith")
    ex = env.example(0, 0)
    group = [ex.answer, "nope", f"<answer>{ex.answer}</answer>", f"{ex.answer} or 0"]
    assert [s.reward for s in env.score_group(ex, group)] == [1.0, 0.0, 1.0, 0.0]


def test_a_question_is_read_for_its_final_number() -> None:
    env = load_environment("arith", digits=1, phrasing="question")
    ex = env.example(0, 0)
    a, b = ex.info["numbers"]
    assert ex.prompt[-1]["content"] == f"What is {a} + {b}?"
    said = [f"The sum of {a} and {b} is {ex.answer}.", f"{a} + {b} = {ex.answer}",
            f"It is {ex.answer}, not {int(ex.answer) + 1}.", f"{a} + {b}", ""]  # fmt: skip
    assert [s.reward for s in env.score_group(ex, said)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="phrasing"):
        load_environment("arith", phrasing="poem")


def test_canonical_name_rebuilds_the_same_environment() -> None:
    env = load_environment("arith", digits=3, ops="+*")
    assert env.name == 'arith {"digits":3,"ops":"+*"}'
    again = load_environment(env.name)
    assert again.examples(5, 0, 10) == env.examples(5, 0, 10)
    # arguments are part of the identity: other args, other examples under the same seed
    assert load_environment("arith", digits=4).example(5, 0) != load_environment("arith").example(
        5, 0
    )


@pytest.mark.parametrize(
    "completion",
    [
        "{a} or {b}",
        "<answer>{a}</answer><answer>{b}</answer>",  # two answers: credit for neither
        "<answer>{a}",  # unclosed tag
        "{a}\n{b}",
        "{a}" + " " * 20_000,  # over the parse cap
        "０１２３",  # full-width digits are not digits here
        "",
    ],
)
def test_arith_adversarial_answers_earn_nothing(completion: str) -> None:
    env = load_environment("arith")
    for ex in env.examples(1, 0, 10):
        wrong = str(int(ex.answer) + 1)
        text = completion.format(a=ex.answer, b=wrong)
        assert env.score(ex, text).reward == 0.0, text[:80]


def test_plain_and_chat_completions_are_read_alike() -> None:
    env = load_environment("arith")
    ex = env.example(1, 0)
    assert env.score(ex, f"  {ex.answer}\n").reward == 1.0
    chat = [{"role": "assistant", "content": f"<answer>{ex.answer}</answer>"}]
    assert env.score(ex, chat).reward == 1.0


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "9**9**9",  # exponentiation is not allowed (and would hang a naive eval)
        "(" * 150 + "1" + ")" * 150,  # over the length cap
        "1e300",
        "2.5 * 4",
        "-3 + 7",
        "open('/etc/passwd').read()",
        "[x for x in ()]",
        "lambda: 1",
        "1 / 0",
    ],
)
def test_countdown_evaluator_refuses_everything_but_arithmetic(expression: str) -> None:
    t0 = time.perf_counter()
    assert evaluate(expression) is None
    assert time.perf_counter() - t0 < 0.1


def test_countdown_rewards() -> None:
    env = load_environment("countdown", count=4, max_number=10)
    for ex in env.examples(2, 0, 30):
        numbers, target = ex.info["numbers"], ex.info["target"]
        assert env.score(ex, ex.answer).reward == 1.0
        # the target written as a literal uses a number not given (unless it was given)
        if target not in numbers:
            assert env.score(ex, str(target)).metrics["valid_expression"] == 0.0
        # a given number used twice more than given
        n = numbers[0]
        reuse = f"{n} + {n} + {n} + {n} + {n} - {n} * 4"
        assert env.score(ex, reuse).reward == 0.0
    assert evaluate("1 / 3 * 3") == 1  # exact arithmetic, no float rounding


def test_sort_rewards() -> None:
    env = load_environment("sort", min_count=4, max_count=4)
    ex = env.example(0, 0)
    values = ex.info["values"]
    assert env.score(ex, ", ".join(map(str, sorted(values)))).reward == 1.0
    desc = env.score(ex, " ".join(map(str, sorted(values, reverse=True))))
    assert desc.metrics["same_numbers"] == 1.0
    assert desc.reward == (1.0 if sorted(values) == sorted(values, reverse=True) else 0.0)
    extra = env.score(ex, ex.answer + " 1000")
    assert extra.reward == 0.0 and extra.metrics["same_numbers"] == 0.0


def test_gsm_reads_tags_or_the_last_integer() -> None:
    env = load_environment("gsm")
    ex = env.example(0, 0)
    a = ex.answer
    assert env.score(ex, f"First 3 + 4 = 7, so the answer is {a}.").reward == 1.0
    assert env.score(ex, f"<answer>{a}</answer>").reward == 1.0
    assert env.score(ex, f"{a} or maybe {int(a) + 1}").reward == 0.0
    assert env.score(ex, f"<answer>{a}</answer> <answer>{int(a) + 1}</answer>").reward == 0.0
    templates = {load_environment("gsm").example(0, i).info["template"] for i in range(60)}
    assert len(templates) == 5


def test_reverse_partial_credit_is_a_metric_only() -> None:
    env = load_environment("reverse", min_len=6, max_len=6)
    ex = env.example(0, 0)
    half = ex.answer[:3] + "zzz"
    score = env.score(ex, half)
    assert score.reward == 0.0 and 0.0 < score.metrics["position_accuracy"] < 1.0


def test_registry_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown environment 'nope'.*arith.*reasoning_gym"):
        load_environment("nope")
    with pytest.raises(ValueError, match="bad arguments"):
        load_environment("arith", colour="red")
    with pytest.raises(ValueError, match=r"digits must be 1\.\.12"):
        load_environment("arith", digits=0)
    with pytest.raises(ValueError, match="not JSON"):
        load_environment("arith {digits")
    with pytest.raises(ValueError, match="no task 'no_such_task'"):
        load_environment("reasoning_gym:no_such_task")


class Echo(Environment):
    """A third-party environment, installed through an entry point."""

    env_id = "echo"

    def __init__(self, word: str = "hi") -> None:
        self.word = word
        super().__init__(Rubric([lambda completion, answer: float(completion == answer)]))

    def make_example(self, rng: Any) -> tuple[str, str, dict[str, Any]]:
        return f"Say {self.word}", self.word, {}


def test_entry_point_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    point = importlib.metadata.EntryPoint(
        "echo", "tests.unit.test_envs:Echo", "bazaar.environments"
    )
    real = importlib.metadata.entry_points

    def entry_points(**kw: Any) -> Any:
        if kw.get("group") == "bazaar.environments":
            return importlib.metadata.EntryPoints([point])
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    env = load_environment("echo", word="yo")
    ex = env.example(0, 0)
    assert ex.answer == "yo" and env.score(ex, "yo").reward == 1.0
    assert env.name == 'echo {"word":"yo"}'


RG_TASKS = [
    "basic_arithmetic",
    "leg_counting",
    "letter_counting",
    "spell_backward",
    "number_sorting",
]


@pytest.mark.parametrize("task", RG_TASKS)
def test_reasoning_gym_tasks(task: str) -> None:
    env = load_environment(f"reasoning_gym:{task}")
    examples = env.examples(seed=4, start=0, count=5)
    assert len({e.prompt[-1]["content"] for e in examples}) > 1
    assert env.examples(4, 0, 5) == examples  # reproducible
    for ex in examples:
        assert env.score(ex, f"<answer>{ex.answer}</answer>").reward == 1.0
        assert env.score(ex, "<answer>definitely wrong</answer>").reward < 1.0
        assert env.score(ex, "<answer>a</answer><answer>b</answer>").reward == 0.0


class GuessNumber(MultiTurnEnvironment):
    """Guess a number from 1 to 8; the environment says higher or lower."""

    env_id = "guess"
    max_turns = 5

    def __init__(self) -> None:
        super().__init__(Rubric([self.solved, self.turns], [1.0, 0.0]))

    def make_example(self, rng: Any) -> tuple[str, str, dict[str, Any]]:
        return "Guess my number (1-8).", str(rng.randint(1, 8)), {}

    def is_completed(self, messages: list[dict[str, str]], state: dict[str, Any]) -> bool:
        return messages[-1]["content"] == state["answer"]

    def initial_state(self, example: Example) -> dict[str, Any]:
        return {"turn": 0, "answer": example.answer}

    def env_response(self, messages: list[dict[str, str]], state: dict[str, Any]):
        hint = "higher" if int(messages[-1]["content"]) < int(state["answer"]) else "lower"
        return [{"role": "user", "content": hint}], state

    def solved(self, completion: list[dict[str, str]], answer: str) -> float:
        return float(completion[-1]["content"] == answer)

    def turns(self, state: dict[str, Any]) -> float:
        return float(state["turn"])


def test_multi_turn_harness_runs_an_episode() -> None:
    env = GuessNumber()
    ex = env.example(0, 0)
    lo, hi = 1, 8

    def binary_search(messages: list[dict[str, str]]) -> str:
        nonlocal lo, hi
        if messages[-1]["content"] == "higher":
            lo = int(messages[-2]["content"]) + 1
        elif messages[-1]["content"] == "lower":
            hi = int(messages[-2]["content"]) - 1
        return str((lo + hi) // 2)

    completion, state = env.rollout(ex, binary_search)
    score = env.score(ex, completion, state)
    assert score.reward == 1.0 and 1 <= score.metrics["turns"] <= 4
    assert [m["role"] for m in completion][::2] == ["assistant"] * ((len(completion) + 1) // 2)
    stubborn, state = env.rollout(ex, lambda m: "9")  # never right: stops at max_turns
    assert state["turn"] == env.max_turns and env.score(ex, stubborn, state).reward == 0.0


def test_every_builtin_is_registered_and_documented() -> None:
    for name, cls in BUILTINS.items():
        assert cls.env_id == name and cls.__module__.startswith("envs.builtin.")
        assert sys.modules[cls.__module__].__doc__
