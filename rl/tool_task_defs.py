"""The tool task's light parts: `BigMultiplyTask` and `tool_answer_reward` (no torch, no Ray).

`rl.tasks.make_task("bigmul")` builds the task and reward pool workers load the reward
(`rl.tool_task_defs:tool_answer_reward`) from here, so neither imports the experiment's
training code (`rl.tool_tasks`, which re-exports these names).

    task = BigMultiplyTask(seed=0, digits=4)
    task.row("train", 3)   # {"prompt": "<|im_start|>user\\n4821*9917=<|im_end|>\\n<|im_start|>assistant\\n",
                           #  "answer": "47809857", "question": "4821*9917", "tools": [...], "messages": [...]}

Products of two `digits`-digit numbers: a tiny model cannot compute them, but it can copy the
expression into a calculator call and copy the result back, so the reward (exact final answer) is
reachable only through the tool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from model.errors import ConfigError
from rl.tasks import first_integer
from rollout.tools import Calculator, tool_schema

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_prompt(question: str) -> str:
    """The ChatML prompt of one question (no system prompt: the tiny model's context is short)."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


@dataclass
class BigMultiplyTask:
    """`a*b=` with `digits`-digit operands; rows are a pure function of (seed, split, index)."""

    seed: int = 0
    digits: int = 4
    eval_fraction: float = 0.1

    def __post_init__(self):
        if not 1 <= self.digits <= 30:
            raise ConfigError(f"task.digits: must be in [1, 30], got {self.digits}")

    def row(self, split: str, index: int) -> dict[str, Any]:
        rng = random.Random(f"bigmul/{self.seed}/{split}/{index}")
        lo, hi = 10 ** (self.digits - 1), 10 ** self.digits - 1
        while True:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            held_out = (a * 7919 + b * 104729) % 1000 < int(self.eval_fraction * 1000)
            if held_out == (split == "eval"):
                break
        q = f"{a}*{b}"
        return {"prompt": chat_prompt(q + "="), "question": q, "answer": str(a * b), "id": f"{split}-{index}",
                "messages": [{"role": "user", "content": q + "="}],
                "tools": [tool_schema(Calculator())]}

    def rows(self, split: str, start: int, count: int) -> list[dict[str, Any]]:
        return [self.row(split, i) for i in range(start, start + count)]


def final_answer_text(completion: str, final_text: str | None = None) -> str:
    """The last assistant turn without tool-call blocks: `final_text` when the agent gave it, else the
    text after the last `<|im_start|>assistant\\n` of the completion (never the tool's message)."""
    text = final_text if final_text is not None else completion.rsplit(f"{IM_START}assistant\n", 1)[-1]
    parts = []
    for i, chunk in enumerate(text.split("<tool_call>")):
        if i == 0:
            parts.append(chunk)
        elif "</tool_call>" in chunk:          # drop the call, keep what follows it
            parts.append(chunk.split("</tool_call>", 1)[1])
    return " ".join(parts)


def tool_answer_reward(prompt: str, completion: str, answer: str, final_text: str | None = None,
                       **_: Any) -> float:
    """1.0 when the first integer of the final assistant turn equals the answer, else 0.0.

    A per-sample reward for `rewards.load_reward("rl.tool_task_defs:tool_answer_reward")` (also
    importable from `rl.tool_tasks`). It reads the final turn only, so copying numbers out of the
    tool call or the tool message earns nothing.
    """
    v = first_integer(final_answer_text(completion, final_text).replace(IM_END, " "))
    return 1.0 if v is not None and str(v) == str(answer).strip() else 0.0
