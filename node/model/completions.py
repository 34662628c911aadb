"""Serving completions with the node's model: a request in, ``n`` choices out (model process).

A ``CompletionJob`` is a chat (messages, rendered with the model's chat template) or a plain
prompt. All ``n`` choices are generated in one batch with the same seeded sampler rollouts use;
with ``seed`` set, choice ``i`` gets ``derive_seed(H(seed), i, 0)``, so the same request gives the
same answer. Stop strings cut the text at their first occurrence (finish reason ``stop``), and
the completion's token count is the tokens that text took, not what was generated past it.

>>> cut_at_stop("12+3=15 and more", ["and", "more"])
('12+3=15 ', True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from node.model.backends import Sampling
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

    def with_adapter(self, adapter: str | None) -> CompletionJob:
        return dataclasses.replace(self, adapter=adapter)


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float]
    tokens: list[str]
    """Each token's text, for ``logprobs`` in the response."""


@dataclass(frozen=True)
class CompletionResult:
    prompt_tokens: int
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def run_completion(backend: Any, job: CompletionJob) -> CompletionResult:
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
    if job.seed is None:
        seeds = [secrets.randbits(63) for _ in range(job.n)]
    else:
        key = hashlib.sha256(f"bazaar/request-seed/{job.seed}".encode()).digest()
        seeds = [derive_seed(key, i, 0) for i in range(job.n)]
    sampling = Sampling(temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens)
    choices = []
    for g in backend.generate([ids] * job.n, seeds, sampling, job.adapter):
        token_ids, logprobs = list(g.token_ids), list(g.logprobs)
        if token_ids and token_ids[-1] in backend.eos_ids:  # the EOS is not part of the text
            token_ids, logprobs = token_ids[:-1], logprobs[:-1]
        text = tok.decode(token_ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, job.stop)
        if stopped:  # keep the tokens the text took
            k = next(
                (k for k in range(len(token_ids) + 1)
                 if len(tok.decode(token_ids[:k], skip_special_tokens=True)) >= len(text)),
                len(token_ids),
            )  # fmt: skip
            token_ids, logprobs = token_ids[:k], logprobs[:k]
        reason = "stop" if stopped or g.finish_reason == "stop" else "length"
        pieces = [tok.decode([t], skip_special_tokens=True) for t in token_ids]
        if stopped and pieces:  # the stop string may begin inside the last token
            pieces[-1] = text[len("".join(pieces[:-1])) :]
        choices.append(Choice(text, reason, token_ids, logprobs, pieces))
    return CompletionResult(len(ids), choices)
