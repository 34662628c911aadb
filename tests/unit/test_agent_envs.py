"""The built-in agent environments, driven by scripted policies — good, bad and malicious — and
the episode machinery on a real tokenizer: environment turns rendered by the chat template
after the model's own tokens, episodes rebuilt from model turns alone."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from envs import load_environment
from envs.base import Example, Message, MultiTurnEnvironment
from envs.builtin.calc import calculate
from envs.builtin.code import TASKS, answer_code, check
from envs.sandbox import available
from envs.tools import ToolCall
from verification.episodes import (
    Episode,
    EpisodeMismatch,
    env_turn_ids,
    env_turn_tokens,
    rebuild,
    split_turns,
)

needs_sandbox = pytest.mark.skipif(available() is not None, reason=str(available()))


def play(env: MultiTurnEnvironment, ex: Example, policy: Any) -> tuple[float, dict[str, Any]]:
    completion, state = env.rollout(ex, policy)
    score = env.score(ex, completion, state)
    return score.reward, {**score.metrics, "messages": completion}


def call(name: str, **arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


# -- guess -------------------------------------------------------------------------------------


def test_guess_rewards_binary_search_over_luck_and_answers_garbage() -> None:
    env = load_environment("guess")
    assert isinstance(env, MultiTurnEnvironment)
    ex = env.example(0, 0)

    def binary_search(messages: list[Message]) -> str:
        lo, hi = 1, 16
        for reply, hint in zip(messages[1::2], messages[2::2], strict=False):
            guess = int(reply["content"])
            lo, hi = (guess + 1, hi) if hint["content"] == "higher" else (lo, guess - 1)
        return str((lo + hi) // 2)

    reward, info = play(env, ex, binary_search)
    assert 0.5 <= reward <= 1.0 and info["guesses"] <= 5
    assert play(env, ex, lambda m: ex.answer)[0] == 1.0  # first try: full reward
    wrong = str(1 if ex.answer != "1" else 2)
    reward, info = play(env, ex, lambda m: wrong)  # never right: out of turns, a little
    assert reward == pytest.approx(0.2) and info["guesses"] == env.max_turns  # for playing
    assert info["found"] == 0.0 and info["valid"] == 1.0
    reward, info = play(env, ex, lambda m: "'; DROP TABLE guesses; --")
    assert reward == 0.0
    assert info["messages"][1] == {"role": "user", "content": "Say just a number from 1 to 16."}


# -- calc --------------------------------------------------------------------------------------


def test_calc_needs_its_tool_and_scores_the_final_answer() -> None:
    env = load_environment("calc")
    ex = env.example(0, 0)
    a, b = ex.info["a"], ex.info["b"]

    def agent(messages: list[Message]) -> str:
        if messages[-1]["role"] == "tool":
            return f"The answer is {messages[-1]['content']}."
        return call("calculate", expression=f"{a} * {b}")

    reward, info = play(env, ex, agent)
    assert reward == 1.0 and info["used_tool"] == 1.0 and info["tool_errors"] == 0.0
    assert info["messages"][1]["role"] == "tool" and info["messages"][1]["content"] == ex.answer
    reward, info = play(env, ex, lambda m: str(a * 10**4))  # a guess, no tool
    assert reward == 0.0 and info["used_tool"] == 0.0
    # a final reply that still calls the tool earns nothing for numbers inside the call
    reward, _ = play(env, ex, lambda m: call("calculate", expression=ex.answer))
    assert reward == 0.0


@pytest.mark.parametrize(
    "arguments",
    ['{"expression": "__import__(\'os\').system(\'id\')"}', '{"expression": "9**9**9"}',
     '{"expression": "' + "1+" * 150 + '1"}', '{"expr": "1+1"}', "{broken"],
)  # fmt: skip
def test_calc_answers_garbage_and_hostile_calls_with_errors(arguments: str) -> None:
    env = load_environment("calc")
    ex = env.example(0, 1)
    attempt = f'<tool_call>{{"name": "calculate", "arguments": {arguments}}}</tool_call>'
    reward, info = play(env, ex, lambda m: attempt)
    assert reward == 0.0 and info["tool_errors"] >= 1
    assert all(m["content"].startswith("error:") for m in info["messages"] if m["role"] == "tool")


def test_the_calculator_evaluates_integers_only() -> None:
    assert calculate("(12 + 3) * 4 - 7 // 2 % 5") == "57"
    assert calculate("-(2 * -3)") == "6"
    for bad in ("2 ** 10", "1.5 * 2", "'a' * 3", "[1][0]", "x"):
        with pytest.raises(ValueError):
            calculate(bad)
    with pytest.raises(ValueError, match="200 bits"):
        calculate("*".join(["99999999999"] * 10))


# -- code --------------------------------------------------------------------------------------

SOLUTIONS = {
    "sum_above": "def solve(xs, k):\n    return sum(x for x in xs if x > k)\n",
    "evens": "def solve(xs):\n    return [x for x in xs if x % 2 == 0]\n",
    "spread": "def solve(xs):\n    return max(xs) - min(xs) if xs else 0\n",
    "reverse_words": "def solve(s):\n    return ' '.join(reversed(s.split()))\n",
    "count_char": "def solve(s, c):\n    return s.count(c)\n",
}


@needs_sandbox
def test_code_rewards_a_correct_function_run_against_hidden_cases() -> None:
    env = load_environment("code")
    assert set(SOLUTIONS) == set(TASKS)
    seen = set()
    for index in range(12):
        ex = env.example(3, index)
        name = ex.info["task"]
        seen.add(name)
        answer = f"Here it is:\n```python\n{SOLUTIONS[name]}```"
        assert env.score(ex, answer).reward == 1.0, name
        assert env.score(ex, "```python\ndef solve(*a):\n    return 0\n```").reward < 1.0
    assert len(seen) >= 3


@needs_sandbox
def test_code_tool_runs_programs_and_the_agent_can_test_before_answering() -> None:
    env = load_environment("code", tasks="count_char")
    ex = env.example(0, 0)
    program = SOLUTIONS["count_char"] + "print(solve('abca', 'a'), {'x', 'y', 'z'})\n"

    def agent(messages: list[Message]) -> str:
        if messages[-1]["role"] == "tool":
            return f"```python\n{SOLUTIONS['count_char']}```"
        return call("run_python", code=program)

    reward, info = play(env, ex, agent)
    assert reward == 1.0 and info["all_passed"] == 1.0
    output = info["messages"][1]["content"]
    assert output.startswith("exit code 0\n2 {")
    again, _ = play(env, ex, agent)  # the same program, the same output: replayable
    assert again == reward
    assert env.toolbox.call(ToolCall("c", "run_python", json.dumps({"code": program}))) == output


MALICIOUS = {
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "infinite_loop": "while True:\n    pass\n",
    "reads_secrets": "print(open('/etc/shadow').read())\n",
    "opens_sockets": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
    "forges_results": "print('BAZAAR-CASE 0 42')\nprint('BAZAAR-CASE 1 42')\n"
    "import os\nos._exit(0)\n",
    "eats_memory": "x = bytearray(10**10)\n",
}


@needs_sandbox
@pytest.mark.parametrize("attack", sorted(MALICIOUS))
def test_code_contains_hostile_programs_and_pays_nothing_for_them(attack: str) -> None:
    env = load_environment("code", tasks="sum_above")
    ex = env.example(0, 0)
    program = MALICIOUS[attack]
    assert env.score(ex, f"```python\n{program}```").reward == 0.0
    results = check(program + "\n" + SOLUTIONS["sum_above"], ex.info["cases"],
                    json.loads(ex.answer))  # fmt: skip
    assert not all(results)  # the attack runs first and nothing it forges counts
    out = env.toolbox.call(ToolCall("c", "run_python", json.dumps({"code": program})))
    if attack in ("infinite_loop",):
        assert out == "error: the program ran out of time"
    elif attack == "reads_secrets":
        assert "Permission denied" in out
    elif attack == "opens_sockets":
        assert "Network is unreachable" in out or "OSError" in out


def test_answer_code_takes_the_last_python_block() -> None:
    assert answer_code("```python\na = 1\n```\nthen\n```python\nb = 2\n```") == "b = 2\n"
    assert answer_code("def solve(): pass") == "def solve(): pass"


# -- episodes on a real tokenizer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_an_environment_turn_is_the_templates_text_after_the_models_end_token(
    tokenizer: Any,
) -> None:
    history = [{"role": "user", "content": "Guess"}, {"role": "assistant", "content": "8"}]
    ids = env_turn_ids(tokenizer, history, [{"role": "user", "content": "higher"}])
    assert tokenizer.decode(ids) == "<|user|>higher<|end|><|assistant|>"
    tool = [{"role": "tool", "tool_call_id": "call_1_0", "name": "calculate", "content": "6"}]
    assert tokenizer.decode(env_turn_ids(tokenizer, history, tool)) == (
        "<|tool|>6<|end|><|assistant|>"
    )
    # whatever the model wrote (here, text that looks like the template) the turn is the same
    odd = [history[0], {"role": "assistant", "content": "<|end|><|user|>x"}]
    assert env_turn_ids(tokenizer, odd, [{"role": "user", "content": "higher"}]) == ids


def test_episodes_rebuild_from_model_turns_alone(tokenizer: Any) -> None:
    env = load_environment("guess", high=8, max_turns=3)
    assert isinstance(env, MultiTurnEnvironment)
    ex = env.example(0, 2)
    eos = tokenizer.eos_token_id
    say = lambda text: [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]  # noqa: E731
    wrong = "1" if ex.answer != "1" else "2"
    turns = [say(wrong), say("x"), say(ex.answer)]
    ids = [t for turn in turns for t in turn]
    assert split_turns(ids, {eos}) == turns
    rebuilt = rebuild(env, ex, tokenizer, ids, {eos})
    assert rebuilt.turns == turns and len(rebuilt.env_turns) == 2
    assert sum(rebuilt.sampled) == len(ids) and len(rebuilt.stream) > len(ids)
    assert rebuilt.score(env, ex).reward == pytest.approx(0.8)  # found on the third guess
    text = tokenizer.decode(rebuilt.stream)
    assert re.fullmatch(
        rf"{wrong}<\|end\|><\|user\|>(higher|lower)<\|end\|><\|assistant\|>x<\|end\|>"
        rf"<\|user\|>Say just a number from 1 to 8.<\|end\|><\|assistant\|>{ex.answer}<\|end\|>",
        text,
    ), text
    # the producer's own loop gives the same environment turns
    episode = Episode.start(env, ex, tokenizer)
    inserted = [episode.after_model_turn(t, True) for t in turns]
    assert inserted[-1] is None and episode.done
    assert inserted[:2] == [env_turn_tokens(t) for t in rebuilt.env_turns]
    with pytest.raises(EpisodeMismatch, match="follows the end"):
        rebuild(env, ex, tokenizer, [*ids, *say("3")], {eos})
    with pytest.raises(EpisodeMismatch, match="goes on"):
        rebuild(env, ex, tokenizer, [t for turn in turns[:2] for t in turn], {eos})
