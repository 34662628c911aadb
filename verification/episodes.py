"""Episodes: model turns with the environment's answers between them, as one token stream.

An episode's completion is one stream of tokens after the canonical prompt: a model turn, an
environment turn, a model turn, ... The model's turns are the tokens it sampled, never decoded and
encoded again; an environment turn is the chat template's rendering of the environment's messages
(tool results, feedback) followed by the next assistant header, tokenized on its own
(``env_turn_ids``). Producers sample on this stream, verifiers replay it and trainers train on it,
so there is no re-tokenization drift between turns: the model is trained on exactly the tokens
it saw.

``Episode`` is the environment's side of one episode, advanced a model turn at a time
(``after_model_turn``); producers run it to generate and every other peer runs the same code to
rebuild an episode from its model turns alone (``rebuild``). Model turns are told apart by the
end-of-sequence token that ends each one but the last, so the environment turns a payload carries
are redundant by design: a verifier compares them with the rebuilt ones token for token, and
trainers and scorers use the rebuilt ones only.

Model turn ``k`` of a sample is sampled with ``turn_seed(seed, k)`` from position 0; turn 0 uses
the sample's seed itself, so a single-turn sample is sampled exactly as before.

>>> turn_seed(12345, 0)
12345
>>> turn_seed(12345, 1) != turn_seed(12345, 2)
True
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.base import Environment, Example, Message, MultiTurnEnvironment, Score
from protocol.rollouts import EnvTurn, Sample

SENTINEL = "\x00bazaar-model-turn\x00"
"""Stands for the model's turn when the template renders the environment's: only the text after
it is the environment's, whatever the model wrote."""


def turn_seed(seed: int, turn: int) -> int:
    """The seed of a sample's model turn ``turn`` (turn 0: the sample's own)."""
    if turn == 0:
        return seed
    digest = hashlib.sha256(
        b"bazaar/turn-seed/v1\x00" + seed.to_bytes(8, "big") + turn.to_bytes(4, "big")
    ).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    """A model turn's text, as environments and rubrics see it (special tokens dropped)."""
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))


def env_turn_ids(tokenizer: Any, history: list[Message], reply: list[Message]) -> list[int]:
    """The tokens an environment turn inserts after the model's last turn (the last message of
    ``history``): the template's text for ``reply`` and the next assistant header, after the
    model's end-of-sequence token, tokenized alone."""
    turn = {**history[-1], "content": SENTINEL}
    text = tokenizer.apply_chat_template(
        [*history[:-1], turn, *reply], tokenize=False, add_generation_prompt=True
    )
    rest = str(text)[str(text).rindex(SENTINEL) + len(SENTINEL) :]
    eos = tokenizer.eos_token or ""
    if eos and rest.startswith(eos):  # the model sampled its end token itself
        rest = rest[len(eos) :]
    return list(tokenizer(rest, add_special_tokens=False)["input_ids"])


def split_turns(token_ids: list[int], eos_ids: set[int]) -> list[list[int]]:
    """Model-sampled tokens cut into turns: after each end-of-sequence token.

    >>> split_turns([5, 6, 0, 7, 0, 8], {0})
    [[5, 6, 0], [7, 0], [8]]
    >>> split_turns([5, 0], {0})
    [[5, 0]]
    """
    turns, current = [], []
    for t in token_ids:
        current.append(t)
        if t in eos_ids:
            turns.append(current)
            current = []
    if current or not turns:
        turns.append(current)
    return turns


@dataclass
class Episode:
    """One episode's environment side: messages so far, the environment's state, whether over."""

    env: MultiTurnEnvironment
    example: Example
    tokenizer: Any
    messages: list[Message]
    state: dict[str, Any]
    done: bool = False
    env_turns: list[list[int]] = field(default_factory=list)

    @classmethod
    def start(cls, env: MultiTurnEnvironment, example: Example, tokenizer: Any) -> Episode:
        return cls(env, example, tokenizer, copy.deepcopy(example.prompt),
                   env.initial_state(example))  # fmt: skip

    def after_model_turn(self, token_ids: list[int], finished: bool) -> list[int] | None:
        """Take the model's turn (``finished``: it ended with its end-of-sequence token); the
        environment's turn to insert next, or None when the episode is over: the environment
        says so, the turn budget is spent, or the model's turn ran out of tokens."""
        if self.done:
            raise ValueError("the episode is over: no model turn follows")
        self.messages.append({"role": "assistant", "content": decode(self.tokenizer, token_ids)})
        self.state["turn"] = self.state.get("turn", 0) + 1
        env = self.env
        if (
            not finished
            or self.state["turn"] >= env.max_turns
            or env.is_completed(self.messages, self.state)
        ):
            self.done = True
            return None
        reply, self.state = env.env_response(self.messages, self.state)
        ids = env_turn_ids(self.tokenizer, self.messages, reply)
        self.messages.extend(reply)
        self.env_turns.append(ids)
        return ids

    def completion(self) -> list[Message]:
        """The messages after the prompt: what a rubric scores."""
        return self.messages[len(self.example.prompt) :]

    def score(self) -> Score:
        return self.env.score(self.example, self.completion(), self.state)


class EpisodeMismatch(ValueError):
    """Model turns that no episode of this environment could hold (a turn after it ended)."""


@dataclass(frozen=True)
class Rebuilt:
    """An episode rebuilt from a sample's model turns: what any peer derives, trusting no
    claimed environment turn."""

    turns: list[list[int]]
    """The model's turns."""
    stream: list[int]
    """Every completion token in order, the model's and the environment's."""
    sampled: list[bool]
    """Per stream token: sampled by the model (True) or inserted by the environment."""
    env_turns: list[EnvTurn]
    """The environment turns, as a payload carries them."""
    completion: str | list[Message]
    """What the rubric scores: the text of a single turn, an episode's messages."""
    state: dict[str, Any]

    def score(self, env: Environment, example: Example) -> Score:
        return env.score(example, self.completion, self.state)


def rebuild(
    env: Environment, example: Example, tokenizer: Any, token_ids: list[int], eos_ids: set[int]
) -> Rebuilt:
    """The episode ``token_ids`` (a sample's model-sampled tokens) make in ``env``;
    ``EpisodeMismatch`` if a model turn follows the end of the episode, or the sample stops
    where the episode goes on. A single-turn environment's episode is its one turn."""
    ids = list(token_ids)
    if not isinstance(env, MultiTurnEnvironment):
        return Rebuilt([ids], ids, [True] * len(ids), [], decode(tokenizer, ids), {})
    turns = split_turns(ids, eos_ids)
    episode = Episode.start(env, example, tokenizer)
    stream: list[int] = []
    sampled: list[bool] = []
    carried: list[EnvTurn] = []
    for k, turn in enumerate(turns):
        if episode.done:
            raise EpisodeMismatch(f"model turn {k + 1} follows the end of the episode")
        stream += turn
        sampled += [True] * len(turn)
        inserted = episode.after_model_turn(turn, bool(turn) and turn[-1] in eos_ids)
        if inserted is not None and k < len(turns) - 1:
            carried.append(EnvTurn(after=sum(sampled), token_ids=_pack(inserted)))
            stream += inserted
            sampled += [False] * len(inserted)
    if not episode.done:
        raise EpisodeMismatch(
            f"the sample stops after model turn {len(turns)}, where the environment answers "
            "and the episode goes on"
        )
    return Rebuilt(turns, stream, sampled, carried, episode.completion(), episode.state)


def _pack(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def env_turn_tokens(turn: EnvTurn) -> list[int]:
    return np.frombuffer(turn.token_ids, dtype="<u4").tolist()


def stream_of(sample: Sample, model_ids: list[int]) -> tuple[list[int], list[bool]]:
    """The stream a sample claims: its model tokens with its own environment turns between."""
    stream: list[int] = []
    sampled: list[bool] = []
    at = 0
    for turn in sample.env_turns:
        stream += model_ids[at : turn.after]
        sampled += [True] * (turn.after - at)
        inserted = env_turn_tokens(turn)
        stream += inserted
        sampled += [False] * len(inserted)
        at = turn.after
    stream += model_ids[at:]
    sampled += [True] * (len(model_ids) - at)
    return stream, sampled
