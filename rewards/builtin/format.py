"""Built-in ``format``: ``<think>...</think>`` reasoning followed by a non-empty answer.

Full credit (`reward`) when the completion is exactly: optional whitespace, ``<think>``, non-empty
reasoning, ``</think>``, a non-empty answer (with ``answer_tag="answer"``: ``<answer>...</answer>``
and nothing after it). With ``partial=True`` a malformed completion earns an equal share of
``reward`` for each of the checks that pass (3 checks, 4 with ``answer_tag``): one opening think
tag at the start; one closing think tag after non-empty reasoning; a non-empty answer after it;
(with ``answer_tag``) the answer is exactly one answer block. All checks pass only for the full
format, so partial credit stays below `reward`; without ``partial`` a malformed completion gets 0.
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
        self.answer_open = f"<{answer_tag}>" if answer_tag else None
        self.answer_close = f"</{answer_tag}>" if answer_tag else None

    def _full(self, completion: str) -> bool:
        """Plain string checks (linear time; no regex backtracking on long completions)."""
        rest = completion
        if not self.think_in_prompt:
            rest = rest.lstrip()
            if not rest.startswith(self.open):
                return False
            rest = rest[len(self.open):]
        if self.open in rest or rest.count(self.close) != 1:
            return False
        reasoning, after = rest.split(self.close)
        after = after.strip()
        if not reasoning.strip() or not after:
            return False
        if self.answer_tag is None:
            return True
        ao, ac = self.answer_open, self.answer_close
        if not (after.startswith(ao) and after.endswith(ac)):
            return False
        inner = after[len(ao):-len(ac)]
        return bool(inner.strip()) and ao not in inner and ac not in inner

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        if self._full(completion):
            return self.reward
        if not self.partial:
            return 0.0
        parts = 4 if self.answer_tag else 3
        score = 0
        n_open, n_close = completion.count(self.open), completion.count(self.close)
        if self.think_in_prompt:
            score += n_open == 0
        else:
            score += n_open == 1 and completion.lstrip().startswith(self.open)
        head, _, after = completion.partition(self.close)
        reasoning = head.split(self.open, 1)[-1]
        score += n_close == 1 and bool(reasoning.strip())
        after = after.strip() if n_close else ""
        score += bool(after)
        if self.answer_tag:
            ao, ac = self.answer_open, self.answer_close
            inner = after[len(ao):-len(ac)] if after.startswith(ao) and after.endswith(ac) else ""
            score += bool(inner.strip()) and ao not in inner and ac not in inner
        return self.reward * score / parts
