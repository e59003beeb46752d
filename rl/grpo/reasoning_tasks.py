"""Multi-step arithmetic word problems with a worked scratchpad: the GPU reasoning recipe's task.

    task = WordProblemTask(seed=0, min_ops=2, max_ops=4, eval_ops=(4, 4))
    row = task.row("train", 3)
    row["question"]   # 'Ann has 23 shells. Ann buys 5 bags of 7 shells. Ann gives 12 shells to Ben.
                      #  How many shells does Ann have now?'
    row["solution"]   # '5*7=35\\n23+35=58\\n58-12=46\\nanswer: 46'
    row["answer"]     # '46'
    row["prompt"]     # the question as a ChatML user turn + the assistant header (what GRPO samples from)

A problem is a named person with a starting count of one kind of item, then 1-N sentences, each one
operation on the count: finds/gets more (`+`), gives away/loses (`-`), buys packs of c (a product, then
`+`: two scratchpad lines), splits into d equal piles and keeps one (`/`, exact), ends up with k times
as many (`*`). Every intermediate count stays in [0, max_value]. The worked solution writes one line
`a<op>b=c` per arithmetic operation and ends with `answer: N`, which the built-in `math` reward reads.

Solving one takes reading which operation each sentence means, carrying the running count from line to
line, and two-to-three-digit arithmetic written most significant digit first. Held out two ways:
- by problem: a question whose hash (independent of `seed`) lands in the held-out bucket (about
  `eval_fraction` of all questions) appears only in the eval split;
- by difficulty: `eval_ops` (lo, hi) draws the eval split's operation count from its own range (e.g.
  only 4-operation problems when training data has 1-3, or GRPO trains on 2-4).

Row `i` of a split is a pure function of (seed, split, i, the options), like every task of `rl.grpo.tasks`.
`sft_record(row)` is the row as a `bitmamba sft` conversation (`messages`: user question, assistant
solution); `write_sft_corpus` writes a JSONL corpus of them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from model.errors import ConfigError
from model.seeds import text_held_out
from rollout.chatml import chat_prompt

Split = Literal["train", "eval"]

NAMES = ("Ann", "Ben", "Cai", "Dora", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lea", "Max", "Noa",
         "Omar", "Pia", "Rex", "Sol", "Tess", "Uma", "Vic", "Wen", "Yara", "Zed")
ITEMS = ("apples", "shells", "stamps", "coins", "cards", "beads", "marbles", "pens", "eggs", "books",
         "stones", "buttons")
PACKS = ("bags", "boxes", "packs", "jars", "crates")
QUESTION = "How many {item} does {name} have now?"


@dataclass
class Step:
    """One sentence of a problem and its scratchpad lines; `value` is the count after it."""

    sentence: str
    lines: list[str]
    value: int


@dataclass
class Problem:
    question: str
    lines: list[str]      # scratchpad, one arithmetic operation per line
    answer: int
    n_ops: int            # sentences after the first (the operation count the options speak of)

    @property
    def solution(self) -> str:
        return "\n".join(self.lines + [f"answer: {self.answer}"])


def _gain(rng: random.Random, x: int, name: str, other: str, item: str, top: int) -> Step | None:
    a = rng.randint(2, min(99, top - x)) if top - x >= 2 else 0
    if not a:
        return None
    text = rng.choice((f"{name} finds {a} more {item}.", f"{other} gives {name} {a} {item}.",
                       f"{name} gets {a} more {item}."))
    return Step(text, [f"{x}+{a}={x + a}"], x + a)


def _lose(rng: random.Random, x: int, name: str, other: str, item: str, top: int) -> Step | None:
    if x < 2:
        return None
    a = rng.randint(1, min(99, x - 1))
    text = rng.choice((f"{name} gives {a} {item} to {other}.", f"{name} loses {a} {item}.",
                       f"{name} sells {a} {item}."))
    return Step(text, [f"{x}-{a}={x - a}"], x - a)


def _buy(rng: random.Random, x: int, name: str, other: str, item: str, top: int) -> Step | None:
    b, c = rng.randint(2, 9), rng.randint(2, 12)
    if x + b * c > top:
        return None
    p = b * c
    return Step(f"{name} buys {b} {rng.choice(PACKS)} of {c} {item}.", [f"{b}*{c}={p}", f"{x}+{p}={x + p}"], x + p)


def _split(rng: random.Random, x: int, name: str, other: str, item: str, top: int) -> Step | None:
    ds = [d for d in range(2, 10) if x % d == 0 and x // d >= 1]
    if not ds:
        return None
    d = rng.choice(ds)
    return Step(f"{name} splits the {item} into {d} equal piles and keeps one pile.", [f"{x}/{d}={x // d}"], x // d)


def _times(rng: random.Random, x: int, name: str, other: str, item: str, top: int) -> Step | None:
    ks = [k for k in range(2, 6) if x * k <= top]
    if not ks or x < 2:
        return None
    k = rng.choice(ks)
    return Step(f"{name} ends up with {k} times as many {item}.", [f"{x}*{k}={x * k}"], x * k)


OPERATIONS: tuple[Callable[..., Step | None], ...] = (_gain, _lose, _buy, _split, _times)


@dataclass
class WordProblemTask:
    """Arithmetic word problems of `min_ops`..`max_ops` operations (eval: `eval_ops`), counts <= `max_value`.

    Row fields: `prompt` (ChatML user turn + assistant header when `chat`, else `question`), `answer`
    (decimal), `question`, `solution` (the worked scratchpad), `ops` (operation count), `id`.
    """

    seed: int = 0
    min_ops: int = 1
    max_ops: int = 3
    eval_ops: tuple[int, int] | None = None
    max_value: int = 999
    eval_fraction: float = 0.1
    chat: bool = True

    def __post_init__(self):
        if not (1 <= self.min_ops <= self.max_ops <= 8):
            raise ConfigError(f"task.kwargs: need 1 <= min_ops <= max_ops <= 8, got min_ops {self.min_ops}, "
                              f"max_ops {self.max_ops}")
        if self.eval_ops is not None:
            lo_hi = tuple(self.eval_ops)
            if len(lo_hi) != 2 or not all(isinstance(n, int) for n in lo_hi) or not 1 <= lo_hi[0] <= lo_hi[1] <= 8:
                raise ConfigError(f"task.kwargs.eval_ops: [lo, hi] with 1 <= lo <= hi <= 8, got {self.eval_ops!r}")
            self.eval_ops = lo_hi
        if not 100 <= self.max_value <= 1_000_000:
            raise ConfigError(f"task.kwargs.max_value: must be in [100, 1000000], got {self.max_value}")
        if not (0.0 < self.eval_fraction < 1.0):
            raise ConfigError(f"task.kwargs.eval_fraction: must be in (0, 1), got {self.eval_fraction}")

    def held_out(self, question: str) -> bool:
        """Whether a question belongs to the eval split (a fixed hash of its text: independent of `seed`)."""
        return text_held_out(question, self.eval_fraction)

    def problem(self, rng: random.Random, n_ops: int) -> Problem:
        """One problem of exactly `n_ops` operations drawn from `rng`."""
        name, other = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        x = rng.randint(5, 99)
        sentences, lines = [f"{name} has {x} {item}."], []
        while len(sentences) <= n_ops:
            step = rng.choice(OPERATIONS)(rng, x, name, other, item, self.max_value)
            if step is None:
                continue
            sentences.append(step.sentence)
            lines += step.lines
            x = step.value
        sentences.append(QUESTION.format(item=item, name=name))
        return Problem(" ".join(sentences), lines, x, n_ops)

    def row(self, split: Split, index: int) -> dict[str, Any]:
        rng = random.Random(f"wordproblems/{self.seed}/{split}/{index}")
        lo, hi = (self.eval_ops or (self.min_ops, self.max_ops)) if split == "eval" else (self.min_ops, self.max_ops)
        for _ in range(10_000):
            p = self.problem(rng, rng.randint(lo, hi))
            if self.held_out(p.question) == (split == "eval"):
                break
        else:   # only reachable with an eval_fraction so small that no draw lands in the bucket
            raise ConfigError(f"task.kwargs: no {split} problem found in 10000 draws (eval_fraction "
                              f"{self.eval_fraction})")
        prompt = chat_prompt(p.question) if self.chat else p.question
        return {"prompt": prompt, "answer": str(p.answer), "id": f"{split}-{index}", "question": p.question,
                "solution": p.solution, "ops": p.n_ops}

    def rows(self, split: Split, start: int, count: int) -> list[dict[str, Any]]:
        return [self.row(split, i) for i in range(start, start + count)]


def sft_record(row: dict[str, Any]) -> dict[str, Any]:
    """A task row as a `bitmamba sft` record: the question, then the worked solution as the assistant turn."""
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": row["solution"]}],
            "answer": row["answer"], "ops": row["ops"]}


def write_sft_corpus(path: str | Path, task: WordProblemTask, count: int, start: int = 0) -> Path:
    """Write train rows `start`..`start+count-1` of `task` as SFT conversations (JSONL, one per line)."""
    if count < 1:
        raise ConfigError(f"corpus size: must be >= 1, got {count}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(start, start + count):
            f.write(json.dumps(sft_record(task.row("train", i))) + "\n")
    tmp.replace(path)
    return path
