"""Generate the embedded tiny corpus (deterministic): `python data/tiny/generate.py`.

Files (JSON lines, next to this script):
  prose.jsonl   {"text": ...}       short templated stories / facts (pretraining source "prose")
  arith.jsonl   {"text": ...}       arithmetic worked examples (pretraining source "arith")
  sft.jsonl     {"messages": [...]} chats: arithmetic with reasoning, calculator tool calls, JSON output
  polish.jsonl  {"messages": [...]} tool calling and structured output only (the SFT polish stage)

Everything is synthetic and small (a few hundred KB) so CPU tests train on it in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nora"]
ANIMALS = ["cat", "dog", "fox", "owl", "bird", "horse", "mouse", "rabbit", "goat", "duck"]
PLACES = ["the park", "the river", "the garden", "the market", "the school", "the forest", "the hill", "the lake"]
THINGS = ["an apple", "a ball", "a book", "a kite", "a hat", "a red box", "a small boat", "a map", "a lamp"]
ADJ = ["happy", "tired", "quick", "quiet", "brave", "curious", "hungry", "sleepy", "kind", "clever"]
VERBS = ["saw", "found", "liked", "carried", "painted", "lost", "bought", "gave away", "fixed", "opened"]
TIMES = ["In the morning", "At noon", "In the evening", "On Monday", "One day", "Later", "After lunch"]
FACTS = [
    "Water boils at 100 degrees at sea level.", "A week has seven days.", "The sun rises in the east.",
    "A triangle has three sides.", "Ice is frozen water.", "Bees make honey.", "A year has twelve months.",
    "Plants need light to grow.", "The moon goes around the earth.", "A square has four equal sides.",
]


def story(r: random.Random) -> str:
    n1, n2 = r.sample(NAMES, 2)
    a = r.choice(ANIMALS)
    s = [f"{r.choice(TIMES)}, {n1} went to {r.choice(PLACES)} with a {r.choice(ADJ)} {a}."]
    for _ in range(r.randint(2, 6)):
        who = r.choice([n1, n2, f"the {a}"])
        s.append(f"{who[0].upper() + who[1:]} {r.choice(VERBS)} {r.choice(THINGS)} near {r.choice(PLACES)}.")
    if r.random() < 0.5:
        s.append(r.choice(FACTS))
    s.append(f"Then {n1} and {n2} went home. The {a} was {r.choice(ADJ)}.")
    return " ".join(s)


def arith_doc(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(3, 8)):
        a, b = r.randint(0, 99), r.randint(0, 99)
        op = r.choice(["+", "-", "*"])
        v = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {v}")
    return "\n".join(lines)


def _arith_q(r: random.Random) -> tuple[str, str, int]:
    a, b = r.randint(2, 99), r.randint(2, 99)
    op = r.choice(["+", "-", "*"])
    v = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b}", {"+": "plus", "-": "minus", "*": "times"}[op], v


def chat_arith(r: random.Random) -> dict:
    expr, word, v = _arith_q(r)
    a, _, b = expr.split()
    return {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"What is {expr}?"},
        {"role": "assistant", "reasoning": f"{a} {word} {b} is {v}.", "content": f"The answer is {v}."},
    ]}


def chat_tool(r: random.Random) -> dict:
    a, b = r.randint(100, 9999), r.randint(10, 999)
    v = a * b
    return {"messages": [
        {"role": "system", "content": "You can call the calculator tool."},
        {"role": "user", "content": f"Compute {a} * {b}."},
        {"role": "assistant", "reasoning": "This is a big product, I will use the calculator.",
         "content": "", "tool_calls": [{"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}]},
        {"role": "tool", "content": str(v)},
        {"role": "assistant", "content": f"The result is {v}."},
    ]}


def chat_json(r: random.Random) -> dict:
    n = r.choice(NAMES)
    a = r.choice(ANIMALS)
    age = r.randint(2, 15)
    return {"messages": [
        {"role": "user", "content": f"Return JSON with the name {n}, the pet {a} and the age {age}."},
        {"role": "assistant", "content": json.dumps({"name": n, "pet": a, "age": age})},
    ]}


def chat_story(r: random.Random) -> dict:
    n = r.choice(NAMES)
    a = r.choice(ANIMALS)
    return {"messages": [
        {"role": "user", "content": f"Tell me a short story about {n} and a {a}."},
        {"role": "assistant", "reasoning": f"A short story with {n} and a {a}.",
         "content": f"{n} went to {r.choice(PLACES)} with a {r.choice(ADJ)} {a}. They {r.choice(VERBS)} "
                    f"{r.choice(THINGS)}. Then they went home."},
    ]}


def _write(name: str, recs: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs), encoding="utf-8")


def main() -> None:
    r = random.Random(1234)
    _write("prose.jsonl", [{"text": story(r)} for _ in range(900)])
    _write("arith.jsonl", [{"text": arith_doc(r)} for _ in range(900)])
    gens = [chat_arith, chat_tool, chat_json, chat_story]
    _write("sft.jsonl", [gens[i % 4](r) for i in range(600)])
    _write("polish.jsonl", [(chat_tool if i % 2 else chat_json)(r) for i in range(200)])


if __name__ == "__main__":
    main()
