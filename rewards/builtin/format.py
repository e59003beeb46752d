"""Built-in ``format``: ``<think>...</think>`` reasoning followed by a non-empty answer.

Full credit (`reward`) when the completion is exactly: optional whitespace, ``<think>``, non-empty
reasoning, ``</think>``, a non-empty answer (with ``answer_tag="answer"``: ``<answer>...</answer>``
and nothing after it). With ``partial=True`` a malformed completion earns an equal share of
``reward`` for each of the checks that pass (3 checks, 4 with ``answer_tag``):
one opening think tag, one closing think tag after it, a non-empty answer after the closing tag,
and (with ``answer_tag``) one well-formed answer block; otherwise 0.
``think_in_prompt=True`` is for chat templates whose prompt already ends with ``<think>``: the
completion then starts inside the reasoning and must not open the tag again.
"""

from __future__ import annotations

import re


class FormatReward:
    def __init__(self, think_tag: str = "think", answer_tag: str | None = None, reward: float = 1.0,
                 partial: bool = False, think_in_prompt: bool = False):
        if not re.fullmatch(r"[A-Za-z_][\w-]*", think_tag):
            raise ValueError(f"think_tag must be a tag name, got {think_tag!r}")
        if answer_tag is not None and not re.fullmatch(r"[A-Za-z_][\w-]*", answer_tag):
            raise ValueError(f"answer_tag must be a tag name or None, got {answer_tag!r}")
        self.open, self.close = f"<{think_tag}>", f"</{think_tag}>"
        self.answer_tag = answer_tag
        self.reward, self.partial, self.think_in_prompt = reward, partial, think_in_prompt
        o, c = re.escape(self.open), re.escape(self.close)
        head = r"\s*" if think_in_prompt else rf"\s*{o}"
        if answer_tag:
            ao, ac = re.escape(f"<{answer_tag}>"), re.escape(f"</{answer_tag}>")
            tail = rf"\s*{ao}(?:(?!{ac}).)*\S(?:(?!{ac}).)*{ac}\s*"
        else:
            tail = r"\s*\S.*"
        self.full = re.compile(rf"{head}(?:(?!{o}|{c}).)*\S(?:(?!{o}|{c}).)*{c}{tail}", re.DOTALL)

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        if self.full.fullmatch(completion):
            return self.reward
        if not self.partial:
            return 0.0
        parts = 4 if self.answer_tag else 3
        score = 0
        n_open, n_close = completion.count(self.open), completion.count(self.close)
        if (n_open == 0) if self.think_in_prompt else (n_open == 1):
            score += 1
        if n_close == 1 and completion.find(self.close) > completion.find(self.open):
            score += 1
        after = completion.rsplit(self.close, 1)[1] if n_close else ""
        if after.strip():
            score += 1
        if self.answer_tag:
            ao, ac = f"<{self.answer_tag}>", f"</{self.answer_tag}>"
            if after.count(ao) == 1 and after.count(ac) == 1 and after.find(ao) < after.find(ac):
                score += 1
        return self.reward * score / parts
