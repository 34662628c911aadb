"""What an environment is: examples, a harness, a rubric.

The shapes follow the classic API of the verifiers library, so environments written for it read
the same here (without depending on it):

- an **example** has a chat-message ``prompt``, an ``answer``, an ``info`` dict and a ``task``;
- a **rubric** holds weighted reward functions (and zero-weight metrics), each called by argument
  name with any of ``prompt``, ``completion``, ``answer``, ``info``, ``task``, ``parser``,
  ``state``; scoring returns the weighted ``reward`` and a ``metrics`` dict of every function;
- the **harness** is single-turn (one assistant reply) or multi-turn (``env_response`` answers
  each reply until ``is_completed``);
- **groups** are several completions of one example, scored together.

Every example is a pure function of (environment id, version, seed, index): ``rng_for`` derives
its random generator from those four values alone, so any peer can regenerate a prompt and
re-score a claimed completion without trusting the producer.

>>> from envs import load_environment
>>> env = load_environment("arith", digits=2)
>>> ex = env.example(seed=7, index=0)
>>> env.score(ex, ex.answer).reward
1.0
>>> env.score(ex, "I think it is 12345").reward
0.0
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from envs.parsers import AnswerParser

Message = dict[str, str]
"""A chat message: ``{"role": "system"|"user"|"assistant", "content": "..."}``."""

RewardFn = Callable[..., float]


def rng_for(env_id: str, version: str, seed: int, index: int) -> random.Random:
    """The generator an example is drawn from: a function of these four values only."""
    digest = hashlib.sha256(f"{env_id}\x00{version}\x00{seed}\x00{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class Example:
    """One task: the prompt to complete and what a correct completion must contain."""

    env_id: str
    version: str
    seed: int
    index: int
    prompt: list[Message]
    answer: str
    info: dict[str, Any] = field(default_factory=dict)
    task: str = ""


@dataclass(frozen=True)
class Score:
    """The weighted reward of one completion and every reward function's own value."""

    reward: float
    metrics: dict[str, float]


class Rubric:
    """Weighted reward functions; zero-weight functions are reported as metrics only."""

    def __init__(
        self,
        funcs: Sequence[RewardFn],
        weights: Sequence[float] | None = None,
        parser: AnswerParser | None = None,
    ) -> None:
        weights = list(weights) if weights is not None else [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(f"{len(funcs)} reward functions but {len(weights)} weights")
        self.funcs = list(funcs)
        self.weights = weights
        self.parser = parser or AnswerParser()
        self._params = [set(inspect.signature(f).parameters) for f in self.funcs]

    def score(
        self,
        example: Example,
        completion: str | list[Message],
        state: dict[str, Any] | None = None,
    ) -> Score:
        args = {
            "prompt": example.prompt,
            "completion": completion,
            "answer": example.answer,
            "info": example.info,
            "task": example.task,
            "parser": self.parser,
            "state": state if state is not None else {},
        }
        metrics: dict[str, float] = {}
        reward = 0.0
        for func, weight, params in zip(self.funcs, self.weights, self._params, strict=True):
            value = float(func(**{k: v for k, v in args.items() if k in params}))
            metrics[func.__name__] = value
            reward += weight * value
        return Score(reward, metrics)


class Environment(ABC):
    """A dataset of examples, a harness and a rubric. Subclasses define ``make_example``."""

    env_id: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    harness: ClassVar[Literal["single_turn", "multi_turn"]] = "single_turn"
    system_prompt: ClassVar[str] = ""

    def __init__(self, rubric: Rubric, name: str | None = None) -> None:
        self.rubric = rubric
        self.name = name or self.env_id
        """The id with its arguments, as a run names it (e.g. ``reasoning_gym:leg_counting``)."""

    @abstractmethod
    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        """``(question, answer, info)`` drawn from ``rng`` alone."""

    def example(self, seed: int, index: int) -> Example:
        question, answer, info = self.make_example(rng_for(self.name, self.version, seed, index))
        prompt: list[Message] = []
        if self.system_prompt:
            prompt.append({"role": "system", "content": self.system_prompt})
        prompt.append({"role": "user", "content": question})
        return Example(self.name, self.version, seed, index, prompt, answer, info, self.name)

    def examples(self, seed: int, start: int, count: int) -> list[Example]:
        return [self.example(seed, i) for i in range(start, start + count)]

    def score(
        self,
        example: Example,
        completion: str | list[Message],
        state: dict[str, Any] | None = None,
    ) -> Score:
        return self.rubric.score(example, completion, state)

    def score_group(
        self, example: Example, completions: Sequence[str | list[Message]]
    ) -> list[Score]:
        """Score several completions of one example (a GRPO group)."""
        return [self.score(example, c) for c in completions]


class MultiTurnEnvironment(Environment):
    """An environment that answers each assistant reply until the episode is complete.

    ``rollout`` drives a whole episode with any ``generate(messages) -> str``; the node's model
    backend is one such function, a scripted test policy another.
    """

    harness: ClassVar[Literal["single_turn", "multi_turn"]] = "multi_turn"
    max_turns: int = 4

    def initial_state(self, example: Example) -> dict[str, Any]:
        return {"turn": 0}

    @abstractmethod
    def is_completed(self, messages: list[Message], state: dict[str, Any]) -> bool:
        """True when the episode is over after the last assistant message."""

    @abstractmethod
    def env_response(
        self, messages: list[Message], state: dict[str, Any]
    ) -> tuple[list[Message], dict[str, Any]]:
        """The environment's reply to the last assistant message, and the new state."""

    def rollout(
        self, example: Example, generate: Callable[[list[Message]], str]
    ) -> tuple[list[Message], dict[str, Any]]:
        """Run one episode; returns the completion messages (after the prompt) and the state."""
        messages = list(example.prompt)
        state = self.initial_state(example)
        while True:
            messages.append({"role": "assistant", "content": generate(messages)})
            state["turn"] += 1
            if state["turn"] >= self.max_turns or self.is_completed(messages, state):
                break
            reply, state = self.env_response(messages, state)
            messages.extend(reply)
        return messages[len(example.prompt) :], state


class ToolEnvironment(MultiTurnEnvironment):
    """A multi-turn environment whose turns are tool calls.

    The tools (``tools``: typed, documented functions) are declared in the system prompt in
    OpenAI's format (``envs.tools``); each reply's ``<tool_call>`` blocks are run and answered
    with ``tool`` messages — a bad call with an ``error:`` message — until the model replies
    without a call (its answer) or ``max_turns`` is spent. The rubric sees every message."""

    tools: ClassVar[Sequence[Callable[..., Any]]] = ()

    def __init__(self, rubric: Rubric, name: str | None = None) -> None:
        from envs.tools import Toolbox, tools_prompt

        super().__init__(rubric, name)
        self.toolbox = Toolbox(self.tools)
        self.tools_prompt = tools_prompt(self.toolbox.schemas())

    def example(self, seed: int, index: int) -> Example:
        ex = super().example(seed, index)
        system = "\n\n".join(p for p in (self.tools_prompt, self.system_prompt) if p)
        user = [m for m in ex.prompt if m["role"] != "system"]
        return dataclasses.replace(ex, prompt=[{"role": "system", "content": system}, *user])

    def is_completed(self, messages: list[Message], state: dict[str, Any]) -> bool:
        from envs.tools import parse_tool_calls

        return not parse_tool_calls(messages[-1]["content"])[1]

    def env_response(
        self, messages: list[Message], state: dict[str, Any]
    ) -> tuple[list[Message], dict[str, Any]]:
        from envs.tools import answer_calls, parse_tool_calls

        _, calls = parse_tool_calls(messages[-1]["content"], turn=state["turn"])
        state["tool_calls"] = state.get("tool_calls", 0) + len(calls)
        replies = answer_calls(self.toolbox, calls)
        state["tool_errors"] = state.get("tool_errors", 0) + sum(
            r["content"].startswith("error:") for r in replies
        )
        return replies, state
