"""Reward functions shared by the built-in environments, called by argument name."""

from __future__ import annotations

import re

from envs.parsers import AnswerParser, Completion

_INT = re.compile(r"^[+-]?\d{1,30}$")
_LAST_INT = re.compile(r"[+-]?\d{1,30}")


def exact_match(completion: Completion, answer: str, parser: AnswerParser) -> float:
    """1.0 when the parsed answer equals the reference exactly (after stripping)."""
    return 1.0 if parser.parse_answer(completion) == answer else 0.0


def parsed(completion: Completion, parser: AnswerParser) -> float:
    """1.0 when an answer could be parsed at all (a format metric)."""
    return parser.format_reward(completion)


def is_integer(completion: Completion, parser: AnswerParser) -> float:
    """1.0 when the answer is a plain integer."""
    got = parser.parse_answer(completion)
    return 1.0 if got is not None and _INT.match(got) else 0.0


def digit_accuracy(completion: Completion, answer: str, parser: AnswerParser) -> float:
    """Fraction of the reference's digits matched, aligned from the right (a learning signal)."""
    got = parser.parse_answer(completion) or ""
    if not _INT.match(got):
        return 0.0
    want, have = answer.lstrip("+"), got.lstrip("+")
    width = max(len(want), len(have))
    hits = sum(a == b for a, b in zip(want.rjust(width), have.rjust(width), strict=True))
    return hits / width


def last_integer(text: str) -> str | None:
    """The last integer in free text (how word-problem answers are read without tags)."""
    found = _LAST_INT.findall(text.replace(",", ""))
    return found[-1].lstrip("+") if found else None


def final_number(completion: Completion, answer: str, parser: AnswerParser) -> float:
    """1.0 when the tagged answer, or else the last integer in the text, equals the answer (how
    a model that shows its working is read)."""
    text = parser.text_of(completion)
    got = parser.parse_answer(completion) if "<answer>" in text else last_integer(text)
    return 1.0 if got is not None and got.strip() == answer else 0.0
