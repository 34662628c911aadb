"""Serving completions with the node's model: a request in, ``n`` choices out (model process).

A ``CompletionJob`` is a chat (template messages, ``protocol/chat.py``) or a plain prompt. All
``n`` choices are generated in one batch with the same seeded sampler rollouts use; with
``seed`` set, choice ``i`` gets ``derive_seed(H(seed), i, 0)``, so the same request gives the
same answer. A ``grammar`` (``protocol/grammar.py``) masks every choice's logits before each
pick (``constrained.py``); ``top_logprobs`` asks for alternatives per token.

Each choice is followed token by token (``Tracker``): its text is the decoded tokens, cut at the
first stop string (finish reason ``stop``; the completion's tokens are those the text took, not
what was generated past it). A streamed job (``stream``) hands out ``Delta``s as tokens arrive:
text is released only once it is final — never the start of what may become a stop string, nor a
character still waiting for the rest of its bytes — with the tokens that carried it.

>>> cut_at_stop("12+3=15 and more", ["and", "more"])
('12+3=15 ', True)
>>> held_back("the answer is 4 <", ["<end>"])
1
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.model.backends import Cancelled, Sampling, Steering, Step
from node.model.errors import ContextTooLong
from verification.rollouts import prompt_ids
from verification.sampling import derive_seed


@dataclass(frozen=True)
class CompletionJob:
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    grammar: str | None = None
    """Every choice's grammar (llguidance's format), or None: free text."""
    top_logprobs: int = 0
    ignore_eos: bool = False
    stream: bool = False
    """Hand out ``Delta``s as tokens are generated (the worker streams them to the node)."""

    def with_adapter(self, adapter: str | None) -> CompletionJob:
        return dataclasses.replace(self, adapter=adapter)


@dataclass(frozen=True)
class TokenInfo:
    """A generated token as a response shows it: its text, logprob and alternatives."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str
    token_ids: list[int]
    tokens: list[TokenInfo]

    @property
    def logprobs(self) -> list[float]:
        return [t.logprob for t in self.tokens]


@dataclass(frozen=True)
class Delta:
    """Newly final text of choice ``index`` and the tokens that carried it; ``finish_reason``
    on a choice's last delta."""

    index: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None


@dataclass(frozen=True)
class CompletionResult:
    prompt_tokens: int
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


Streamed = list[Delta] | CompletionResult
"""What a streamed completion yields: its deltas, step by step, then the whole result."""


def cut_at_stop(text: str, stop: list[str], start: int = 0) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (none begins before ``start``), and whether one
    was found."""
    hits = [i for i in (text.find(s, start) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class Tracker:
    """One choice, token by token: its text, where a stop string cut it, what is released.

    The text is decoded incrementally, as vLLM's detokenizer does: each step decodes only the
    tokens since the last complete character (from one boundary further back, so a tokenizer
    that drops a leading space at the start of a decode drops it on both sides of the
    subtraction), never the whole choice again — a long answer costs linear time, not
    quadratic. A boundary is a token count at which the decoded text does not end inside a
    character (no trailing U+FFFD); text is released, and tokens are cut, only at boundaries.
    """

    def __init__(
        self, index: int, tok: Any, stop: list[str], eos_ids: set[int], ignore_eos: bool = False
    ) -> None:
        self.index, self.tok, self.stop = index, tok, stop
        self.eos_ids = set() if ignore_eos else eos_ids
        """An EOS ends the choice and is not part of it — unless the request ignores EOS: then
        it is a token like any other (no text; counted in usage, as generated)."""
        self.ids: list[int] = []
        self.infos: list[TokenInfo] = []
        self.text = ""
        self.stopped = False
        self.released_tokens = 0
        self.released_chars = 0
        self._decoded = ""  # the text of ids[: self._read]
        self._prefix = self._read = 0
        self._bounds = [0]  # token counts that end on a whole character, ascending
        self._chars = [0]  # the decoded length at each of them
        self._longest_stop = max((len(x) for x in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def _chars_at(self, k: int) -> int:
        """len(decode(ids[:k])) — known at a boundary, decoded otherwise (a cut mid-character)."""
        i = bisect.bisect_left(self._bounds, k)
        if i < len(self._bounds) and self._bounds[i] == k:
            return self._chars[i]
        return len(self._decode(self.ids[:k]))

    def add(self, step: Step) -> bool:
        """Take the row's next token; True when the choice has ended (a stop string seen)."""
        if self.stopped or step.token in self.eos_ids:  # the EOS is not part of the text
            return self.stopped
        self.ids.append(step.token)
        piece = self._decode([step.token])
        top = [(self._decode([t]), lp) for t, lp in step.top]
        self.infos.append(TokenInfo(piece, step.logprob, top))
        searched = max(0, len(self._decoded) - self._longest_stop)  # the new text is after
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if window.endswith("\ufffd"):  # inside a character: shown, not yet a boundary
            text = self._decoded + window[len(before) :]
        else:
            self._decoded += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._bounds.append(len(self.ids))
            self._chars.append(len(self._decoded))
            text = self._decoded
        self.text, self.stopped = cut_at_stop(text, self.stop, searched)
        if self.stopped:  # keep the tokens of the characters the text took
            i = bisect.bisect_left(self._chars, len(self.text))
            k = self._bounds[i] if i < len(self._bounds) else len(self.ids)
            self.ids, self.infos = self.ids[:k], self.infos[:k]
            if self.infos:  # the stop string may begin inside the last token
                last = self.text[min(self._chars_at(k - 1), len(self.text)) :]
                self.infos[-1] = dataclasses.replace(self.infos[-1], text=last)
        return self.stopped

    def release(self, final: bool) -> Delta | None:
        """The text that became final since the last release (all of it when ``final``)."""
        if final:
            end_tokens, end_chars = len(self.ids), len(self.text)
        else:
            whole = self.text[: self._chars[-1]]  # not a character still being decoded
            safe = len(whole) - held_back(whole, self.stop)
            i = bisect.bisect_right(self._chars, safe) - 1  # the last boundary within it
            while i > 0 and self._bounds[i] > len(self.ids):  # cut off by a stop string
                i -= 1
            end_tokens = max(self._bounds[i], self.released_tokens)
            end_chars = max(self._chars[i], self.released_chars)
        if end_tokens == self.released_tokens and end_chars == self.released_chars:
            return None
        delta = Delta(
            self.index,
            self.text[self.released_chars : end_chars],
            self.infos[self.released_tokens : end_tokens],
        )
        self.released_tokens, self.released_chars = end_tokens, end_chars
        return delta


def request_seeds(job: CompletionJob) -> list[int]:
    if job.seed is None:
        return [secrets.randbits(63) for _ in range(job.n)]
    key = hashlib.sha256(f"bazaar/request-seed/{job.seed}".encode()).digest()
    return [derive_seed(key, i, 0) for i in range(job.n)]


def run_completion(
    backend: Any,
    job: CompletionJob,
    send: Callable[[list[Delta]], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    grammars: Any = None,
) -> CompletionResult:
    """Generate ``job``'s choices; with ``send``, each step's released ``Delta``s go to it as
    they become final. ``cancelled()`` true ends the generation (``Cancelled``). ``grammars``: the
    model's ``constrained.Grammars``, needed when the job has a grammar."""
    tok = backend.tokenizer
    if job.messages is not None:
        ids = prompt_ids(tok, job.messages)
    else:
        ids = list(tok(job.prompt or "", add_special_tokens=False)["input_ids"])
    limit = int(getattr(backend.base.config, "max_position_embeddings", 1 << 30))
    if len(ids) + job.max_tokens > limit:
        raise ContextTooLong(
            f"the prompt is {len(ids)} tokens and max_tokens is {job.max_tokens}: more than "
            f"the model's context of {limit} tokens"
        )
    trackers = [Tracker(i, tok, job.stop, backend.eos_ids, job.ignore_eos) for i in range(job.n)]

    def on_step(steps: list[Step]) -> set[int]:
        if cancelled is not None and cancelled():
            raise Cancelled(f"cancelled after {len(trackers[0].infos) + 1} tokens a choice")
        ended = {s.row for s in steps if trackers[s.row].add(s)}
        if send is not None:
            deltas = [d for s in steps if (d := trackers[s.row].release(final=False))]
            if deltas:
                send(deltas)
        return ended

    constraints = None
    if job.grammar is not None:
        constraints = [grammars.row(job.grammar) for _ in range(job.n)]
    steering = Steering(constraints, job.top_logprobs, on_step)
    sampling = Sampling(
        temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens,
        ignore_eos=job.ignore_eos,
    )  # fmt: skip
    generations = backend.generate([ids] * job.n, request_seeds(job), sampling, job.adapter,
                                   steering)  # fmt: skip
    choices, last = [], []
    for t, g in zip(trackers, generations, strict=True):
        reason = "stop" if t.stopped or g.finish_reason == "stop" else "length"
        choices.append(Choice(t.text, reason, t.ids, t.infos))
        rest = t.release(final=True)
        last.append(Delta(t.index, rest.text if rest else "", rest.tokens if rest else [], reason))
    if send is not None:
        send(last)
    return CompletionResult(len(ids), choices)
