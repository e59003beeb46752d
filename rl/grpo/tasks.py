"""Synthetic verifiable tasks and JSONL prompt sets for GRPO.

A task is an indexable, infinite stream of rows `{"prompt": str, "answer": str, ...}`: row `i` of a
split is a pure function of (seed, split, i), so the data position of a run is one integer and resume
is exact. The held-out split never shares a problem with the train split.

    task = make_task("arithmetic", seed=0, max_operand=20)
    task.row("train", 17)   # {"prompt": "12+7=", "answer": "19", "id": "train-17"}

Tasks: `arithmetic` (below: small sums, memorisable), `digits` (below: multi-digit addition and
subtraction written least significant digit first, held out by operand pair: the demo's task),
`bigmul` (`BigMultiplyTask` below: products that need the calculator tool, ChatML
prompts), `wordproblems` (`rl.grpo.reasoning_tasks.WordProblemTask`: multi-step word problems with a worked
scratchpad, ChatML prompts), or a JSONL file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from model.errors import ConfigError, DataError
from model.jsonl import read_jsonl
from model.seeds import product_held_out, sum_held_out, text_held_out
from rl.grpo.reasoning_tasks import WordProblemTask
from rollout.agent.calculator import Calculator
from rollout.chatml import ASSISTANT_HEADER, IM_END, TOOL_CALL_END, TOOL_CALL_START, chat_prompt
from rollout.agent.tools import tool_schema

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
        return sum_held_out(a, b, op, self.eval_fraction)

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
class DigitsTask:
    """Multi-digit `a+b` and `a-b` (a >= b) with every number written least significant digit first.

        task = DigitsTask(seed=0)
        task.row("train", 1)   # {"prompt": "3+121=", "answer": "421", "expression": "3+121=124", ...}
        task.row("train", 4)   # {"prompt": "036-3=", "answer": "726", "expression": "630-3=627", ...}

    Each operand has a digit count drawn uniformly from [min_digits, max_digits] (no leading zeros),
    then a value uniform among the numbers of that length. The reversed order is what makes the
    algorithm learnable by a small recurrent model: the answer's first digit depends only on the
    operands' first digits, and each later one on the digits at its place plus the carry (or borrow)
    the model has just produced, the order in which addition is done by hand. Written most significant
    digit first, the first digit would depend on a carry chain through all the places.

    Held out by operand pair: a problem whose hash lands in the held-out bucket (about
    `eval_fraction` of all (a, op, b)) appears only in the eval split, so with 3-digit operands
    (over a million problems) eval accuracy measures the algorithm, not recall. `eval_digits`
    (lo, hi) draws the eval split's operands from another digit range instead (e.g. longer numbers
    than the training range, to measure length generalisation); eval problems are still held out.
    Score completions with `exact_digits` (`rl.grpo.tasks:exact_digits`): the built-in `math` reward reads
    numbers, and "075" (570 reversed) would equal "75".
    """

    seed: int = 0
    min_digits: int = 1
    max_digits: int = 3
    ops: str = "+-"
    eval_fraction: float = 0.1
    eval_digits: tuple[int, int] | None = None

    def __post_init__(self):
        if not (1 <= self.min_digits <= self.max_digits <= 18):
            raise ConfigError(f"task.kwargs: need 1 <= min_digits <= max_digits <= 18, got "
                              f"min_digits {self.min_digits}, max_digits {self.max_digits}")
        if not self.ops or any(o not in "+-" for o in self.ops):
            raise ConfigError(f"task.kwargs.ops: a string of '+' and '-', got {self.ops!r}")
        if not (0.0 < self.eval_fraction < 1.0):
            raise ConfigError(f"task.kwargs.eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        if self.eval_digits is not None:
            lo_hi = tuple(self.eval_digits)
            if len(lo_hi) != 2 or not all(isinstance(d, int) for d in lo_hi) or not 1 <= lo_hi[0] <= lo_hi[1] <= 18:
                raise ConfigError(f"task.kwargs.eval_digits: [lo, hi] with 1 <= lo <= hi <= 18, got "
                                  f"{self.eval_digits!r}")
            self.eval_digits = lo_hi

    def held_out(self, a: int, op: str, b: int) -> bool:
        """Whether problem (a, op, b) belongs to the eval split (a fixed hash: independent of `seed`)."""
        return text_held_out(f"{a}{op}{b}", self.eval_fraction)

    def _operand(self, rng: random.Random, lo: int, hi: int) -> int:
        n = rng.randint(lo, hi)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)

    def row(self, split: Split, index: int) -> dict[str, Any]:
        rng = random.Random(f"digits/{self.seed}/{split}/{index}")
        lo, hi = (self.eval_digits or (self.min_digits, self.max_digits)) if split == "eval" else \
            (self.min_digits, self.max_digits)
        for _ in range(100_000):
            op = rng.choice(self.ops)
            a, b = self._operand(rng, lo, hi), self._operand(rng, lo, hi)
            if op == "-" and a < b:
                a, b = b, a
            if self.held_out(a, op, b) == (split == "eval"):
                break
        else:   # only reachable when the digit range holds (almost) no problem of this split
            raise ConfigError(f"task.kwargs: no {split} problem found with {lo}-{hi} digit operands "
                              f"and eval_fraction {self.eval_fraction}")
        ans = a + b if op == "+" else a - b
        return {"prompt": f"{rev(a)}{op}{rev(b)}=", "answer": rev(ans), "id": f"{split}-{index}",
                "expression": f"{a}{op}{b}={ans}"}

    def rows(self, split: Split, start: int, count: int) -> list[dict[str, Any]]:
        return [self.row(split, i) for i in range(start, start + count)]


def rev(n: int) -> str:
    """A non-negative integer's decimal digits, least significant first: 570 -> "075"."""
    return str(n)[::-1]


def leading_digits(completion: str) -> str:
    """The completion's leading run of digits after leading spaces ("" when it starts otherwise)."""
    text = completion.lstrip()
    j = 0
    while j < len(text) and text[j].isdigit():
        j += 1
    return text[:j]


def exact_digits(prompt: str, completion: str, answer: str, **_: Any) -> float:
    """1.0 when the completion's leading run of digits (after leading spaces) is exactly `answer`.

    The `digits` task's checker (reward spec `rl.grpo.tasks:exact_digits`): digit strings are compared as
    strings, so a dropped or extra digit (also a zero) is wrong, and text after the digits is ignored.
    """
    got = leading_digits(completion)
    return 1.0 if got and got == str(answer).strip() else 0.0


def digit_credit(prompt: str, completion: str, answer: str, **_: Any) -> float:
    """`exact_digits` with partial credit: 1.0 for the exact answer, else 0.5 x the share of places
    (least significant first) whose digit is right, over the longer of answer and completion.

    A denser training signal than pass/fail: a group whose samples are all wrong still ranks the one
    that got two of three places right above the one that got none. Only an exact answer reaches 1.0,
    so `eval_correct_threshold: 1.0` still counts exact answers only.
    """
    ans, got = str(answer).strip(), leading_digits(completion)
    if got == ans:
        return 1.0
    right = sum(1 for a, g in zip(ans, got) if a == g)
    return 0.5 * right / max(len(ans), len(got), 1)


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
        self._train = read_jsonl(self.path, {self.prompt_key: str}, allow_empty=False)
        self._eval = read_jsonl(self.eval_path, {self.prompt_key: str}, allow_empty=False) if self.eval_path else []

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
    if name == "digits":
        try:
            return DigitsTask(seed=seed, **kwargs)
        except TypeError as e:
            raise ConfigError(f"task.kwargs: {e}") from None
    if name == "bigmul":      # needs the calculator tool (docs/tools.md)
        try:
            return BigMultiplyTask(seed=seed, **kwargs)
        except TypeError as e:
            raise ConfigError(f"task.kwargs: {e}") from None
    if name == "wordproblems":  # multi-step word problems with a worked scratchpad (rl/grpo/reasoning_tasks.py)
        try:
            return WordProblemTask(seed=seed, **kwargs)
        except TypeError as e:
            raise ConfigError(f"task.kwargs: {e}") from None
    raise ConfigError(f"task.name: unknown task {name!r} (known: arithmetic, digits, bigmul, wordproblems; "
                      "or give task.path)")


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


# ------------------------------------------------------------------ bigmul: products through the calculator
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
            if product_held_out(a, b, self.eval_fraction) == (split == "eval"):
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
    text = final_text if final_text is not None else completion.rsplit(ASSISTANT_HEADER, 1)[-1]
    parts = []
    for i, chunk in enumerate(text.split(TOOL_CALL_START)):
        if i == 0:
            parts.append(chunk)
        elif TOOL_CALL_END in chunk:          # drop the call, keep what follows it
            parts.append(chunk.split(TOOL_CALL_END, 1)[1])
    return " ".join(parts)


def tool_answer_reward(prompt: str, completion: str, answer: str, final_text: str | None = None,
                       **_: Any) -> float:
    """1.0 when the first integer of the final assistant turn equals the answer, else 0.0.

    A per-sample reward for `rewards.load_reward("rl.grpo.tasks:tool_answer_reward")`. It reads the final turn only, so copying numbers out of the
    tool call or the tool message earns nothing.
    """
    v = first_integer(final_answer_text(completion, final_text).replace(IM_END, " "))
    return 1.0 if v is not None and str(v) == str(answer).strip() else 0.0
