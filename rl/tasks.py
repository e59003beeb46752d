"""Synthetic verifiable tasks and JSONL prompt sets for GRPO.

A task is an indexable, infinite stream of rows `{"prompt": str, "answer": str, ...}`: row `i` of a
split is a pure function of (seed, split, i), so the data position of a run is one integer and resume
is exact. The held-out split never shares a problem with the train split.

    task = make_task("arithmetic", seed=0, max_operand=20)
    task.row("train", 17)   # {"prompt": "12+7=", "answer": "19", "id": "train-17"}

Tasks: `arithmetic` (below), `bigmul` (`rl.tool_task_defs.BigMultiplyTask`: products that need the
calculator tool, ChatML prompts), or a JSONL file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model.errors import ConfigError, DataError

Split = Literal["train", "eval"]


@dataclass
class ArithmeticTask:
    """`a+b=` (and optionally `a-b=` with a >= b) with integer operands in [0, max_operand].

    The answer is the decimal result; a completion is correct when its first number equals it (the
    built-in `math` reward, or `arithmetic_reward` below). Problems whose hash lands in the held-out
    bucket (about `eval_fraction` of them) only appear in the eval split.
    """

    seed: int = 0
    max_operand: int = 20
    ops: str = "+"
    eval_fraction: float = 0.1

    def __post_init__(self):
        if self.max_operand < 1:
            raise ConfigError(f"task.kwargs.max_operand: must be >= 1, got {self.max_operand}")
        if not self.ops or any(o not in "+-" for o in self.ops):
            raise ConfigError(f"task.kwargs.ops: a string of '+' and '-', got {self.ops!r}")
        if not (0.0 < self.eval_fraction < 1.0):
            raise ConfigError(f"task.kwargs.eval_fraction: must be in (0, 1), got {self.eval_fraction}")

    def _held_out(self, a: int, b: int, op: str) -> bool:
        h = (a * 1_000_003 + b * 7919 + ord(op) * 31 + 12345) % 1000
        return h < int(self.eval_fraction * 1000)

    def row(self, split: Split, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}/{split}/{index}")
        while True:
            op = rng.choice(self.ops)
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if op == "-" and a < b:
                a, b = b, a
            if self._held_out(a, b, op) == (split == "eval"):
                break
        ans = a + b if op == "+" else a - b
        return {"prompt": f"{a}{op}{b}=", "answer": str(ans), "id": f"{split}-{index}"}

    def rows(self, split: Split, start: int, count: int) -> list[dict[str, Any]]:
        return [self.row(split, i) for i in range(start, start + count)]


@dataclass
class JsonlTask:
    """Prompts from JSONL files (one object per line holding `prompt_key` plus reward fields).

    The train split cycles through the file in order (row i = line i mod n); eval reads `eval_path`
    (or, without it, no eval rows).
    """

    path: str
    eval_path: str | None = None
    prompt_key: str = "prompt"

    def __post_init__(self):
        self._train = _read_jsonl(self.path, self.prompt_key)
        self._eval = _read_jsonl(self.eval_path, self.prompt_key) if self.eval_path else []

    def row(self, split: Split, index: int) -> dict[str, Any]:
        data = self._train if split == "train" else self._eval
        if not data:
            raise DataError(f"task has no {split} rows")
        r = dict(data[index % len(data)])
        r.setdefault("id", f"{split}-{index}")
        r["prompt"] = r[self.prompt_key]
        return r

    def rows(self, split: Split, start: int, count: int) -> list[dict[str, Any]]:
        return [self.row(split, i) for i in range(start, start + count)]


def _read_jsonl(path: str, prompt_key: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset not found: {p}")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(prompt_key), str):
                raise DataError(f"{p}:{n}: expected an object with a string {prompt_key!r}")
            out.append(obj)
    if not out:
        raise DataError(f"{p}: empty dataset")
    return out


def make_task(name: str | None = None, path: str | None = None, *, seed: int = 0,
              eval_path: str | None = None, prompt_key: str = "prompt", **kwargs: Any):
    """Build a task from the config's `task` section."""
    if path is not None:
        if kwargs:
            raise ConfigError(f"task.kwargs {sorted(kwargs)} only apply to synthetic tasks")
        return JsonlTask(path, eval_path, prompt_key)
    if name == "arithmetic":
        try:
            return ArithmeticTask(seed=seed, **kwargs)
        except TypeError as e:
            raise ConfigError(f"task.kwargs: {e}") from None
    if name == "bigmul":      # needs the calculator tool (docs/tools.md); imported here: rl.tool_task_defs uses rl.tasks
        from rl.tool_task_defs import BigMultiplyTask
        try:
            return BigMultiplyTask(seed=seed, **kwargs)
        except TypeError as e:
            raise ConfigError(f"task.kwargs: {e}") from None
    raise ConfigError(f"task.name: unknown task {name!r} (known: arithmetic, bigmul; or give task.path)")


def first_integer(text: str) -> int | None:
    """The first (optionally negative) integer in `text`, or None."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isdigit() or (text[i] == "-" and i + 1 < n and text[i + 1].isdigit()):
            j = i + 1
            while j < n and text[j].isdigit():
                j += 1
            return int(text[i:j])
        i += 1
    return None


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion's first integer equals the answer, else 0.0 (TRL-style batch signature)."""
    out = []
    for c, a in zip(completions, answer):
        v = first_integer(c)
        out.append(1.0 if v is not None and str(v) == str(a).strip() else 0.0)
    return out
