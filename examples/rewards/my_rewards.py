"""Example user reward functions for BitMamba-RL.

Try them on the sample data before training:

    bitmamba reward-check examples/rewards/my_rewards.py:correct_and_brief --data examples/rewards/rows.jsonl
    bitmamba reward-check math examples/rewards/my_rewards.py:no_hedging --data examples/rewards/rows.jsonl

and reference them in a GRPO config:

    rewards:
      - spec: math
      - spec: examples/rewards/my_rewards.py:no_hedging
        weight: 0.1
"""

from __future__ import annotations

import re

import rewards
from rewards.builtin.math_answer import extract_answer, is_equiv


def correct_and_brief(prompt: str, completion: str, answer: str, max_words: int = 200) -> float | None:
    """1 for a correct boxed answer, minus up to 0.5 for going over `max_words` words.

    `answer` comes from the dataset row; rows without one are excluded (None).
    """
    if answer is None:
        return None
    pred = extract_answer(completion, ("boxed", "last_number"))
    score = 1.0 if pred is not None and is_equiv(pred, str(answer)) else 0.0
    words = len(completion.split())
    return score - 0.5 * min(1.0, max(0, words - max_words) / max_words)


_HEDGE = re.compile(r"\b(I think|maybe|probably|not sure)\b", re.IGNORECASE)


@rewards.batched
def no_hedging(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Batched: -1 for each completion that hedges, else 0 (called once per chunk, with lists)."""
    return [-1.0 if _HEDGE.search(c) else 0.0 for c in completions]
