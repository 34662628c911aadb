"""Finding the answer in a completion.

A completion may be plain text (a small model answering directly) or chat messages (the last
assistant message counts). If the text contains ``<answer>...</answer>`` tags, exactly one must be
present and its content is the answer: a completion that offers two answers gets credit for
neither. Without tags the whole text, stripped, is the answer.

>>> AnswerParser().parse_answer("Let me think... <answer> 42 </answer>")
'42'
>>> AnswerParser().parse_answer("<answer>41</answer> or <answer>42</answer>") is None
True
>>> AnswerParser().parse_answer([{"role": "assistant", "content": "17"}])
'17'
"""

from __future__ import annotations

import re

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
Completion = str | list[dict[str, str]]
"""Plain text, or chat messages of which the last assistant message counts."""

MAX_ANSWER_CHARS = 10_000
"""Longer completions are not parsed (a reward must not cost more than the generation)."""


class AnswerParser:
    def text_of(self, completion: Completion) -> str:
        if isinstance(completion, str):
            return completion
        for msg in reversed(completion):
            if msg.get("role") == "assistant":
                return msg.get("content", "")
        return ""

    def parse_answer(self, completion: Completion) -> str | None:
        text = self.text_of(completion)
        if len(text) > MAX_ANSWER_CHARS:
            return None
        tags = _TAG.findall(text)
        if len(tags) > 1:
            return None
        if tags:
            return str(tags[0]).strip()
        if "<answer>" in text or "</answer>" in text:
            return None  # an unclosed or stray tag is malformed, not an answer
        return text.strip()

    def format_reward(self, completion: Completion) -> float:
        """1.0 when an answer could be parsed at all."""
        return 1.0 if self.parse_answer(completion) else 0.0
