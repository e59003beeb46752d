"""Benchmark: how the built-in ``math`` reward judges real answers, against labels and Math-Verify alone.

    python bench/rewards_math_agreement.py [--typical 2000]

Cases (tests/fixtures/math_equiv/, each with its source):
  public.jsonl   labelled (gold, prediction) pairs from Math-Verify's, lighteval's, hendrycks MATH's and
                 the Qwen2.5-Math grader's tests; rules.jsonl: cases for prm800k's and veRL's
                 normalisation rules. Completions as GRPO sees them (bare answers in \\boxed{}).
  wrong.jsonl    wrong answers of each class a lenient grader accepts (all expected 0).
  one-digit      every right boxed answer above with its last digit changed (expected 0).
Rows: agreement with the labels, false positives / negatives, per-case CPU seconds (caches cleared
before each case), for ours (`MathReward()`, in process) and Math-Verify alone (its default
``parse`` of the completion and of ``$gold$``, then ``verify``, as TRL's accuracy reward does).
Throughput: both on --typical completions from bench/rewards_math.py's mix. Writes
bench/results/rewards_math_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from rewards.builtin import math_verify_backend as mvb  # noqa: E402
from rewards.builtin.math_answer import MathReward, judge  # noqa: E402
from rewards_math import make_samples  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "math_equiv")


def load(name: str) -> list[dict]:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _digit_to_change(c: str) -> int | None:
    """Index of the digit to change: in the last number before any ``\\approx`` (an approximation
    after an exact answer is decoration), its last digit, or its 6th significant digit when it has
    more (changing the 16th digit of 0.0833333333333333 leaves 1/12 to 1e-15)."""
    head = c.split("\\approx")[0]
    nums = list(re.finditer(r"[0-9]+(?:\.[0-9]+)?", head))
    if not nums:
        return None
    m = nums[-1]
    digits = [m.start() + k for k, ch in enumerate(m.group(0)) if ch.isdigit()]
    sig = [i for i in digits if c[i] != "0" or any(c[j] != "0" for j in digits if j < i)]
    return sig[5] if len(sig) > 6 else digits[-1]


def one_digit_changed(rows: list[dict]) -> list[dict]:
    """Right answers in \\boxed{...} with one digit changed (d -> d+1 mod 10): all wrong."""
    out = []
    for r in rows:
        c = r["completion"]
        if not r["expected"] or not c.startswith("\\boxed{"):
            continue
        k = _digit_to_change(c)
        if k is None:
            continue
        out.append({"id": r["id"] + "-d", "gold": r["gold"], "expected": False, "class": "one digit changed",
                    "completion": c[:k] + str((int(c[k]) + 1) % 10) + c[k + 1:], "source": r["source"]})
    return out


def mv_alone():
    from math_verify import parse, verify

    def score(completion: str, gold: str) -> bool:
        g = gold if any(t in gold for t in ("$", "\\boxed", "\\(", "\\[")) else f"${gold}$"
        return bool(verify(parse(g), parse(completion)))
    return score


def clear_caches() -> None:
    judge.cache_clear()
    mvb._parse.cache_clear()


def evaluate(rows: list[dict], score) -> dict:
    """Verdicts and per-case CPU seconds (cold caches)."""
    verdicts, cpu = [], []
    for r in rows:
        clear_caches()
        t0 = time.process_time()
        verdicts.append(bool(score(r["completion"], r["gold"])))
        cpu.append(time.process_time() - t0)
    return {"verdicts": verdicts, "cpu": cpu}


def summary(rows, res) -> dict:
    exp = [bool(r.get("expected", False)) for r in rows]
    got = res["verdicts"]
    agree = sum(e == g for e, g in zip(exp, got))
    worst = max(range(len(rows)), key=res["cpu"].__getitem__)
    return {"n": len(rows), "agreement": round(agree / len(rows), 4),
            "false_positives": sum(g and not e for e, g in zip(exp, got)),
            "false_negatives": sum(e and not g for e, g in zip(exp, got)),
            "max_cpu_s": round(res["cpu"][worst], 4), "slowest_case": rows[worst]["id"],
            "disagreements": [rows[k]["id"] for k in range(len(rows)) if exp[k] != got[k]]}


def throughput(n: int, ours, theirs) -> dict:
    prompts, completions, fields = make_samples(n, seed=123)
    out = {}
    for name, fn in (("ours", ours), ("math_verify", theirs)):
        clear_caches()
        per = []
        t_all = time.perf_counter()
        for c, f in zip(completions, fields):
            t0 = time.perf_counter()
            fn(c, f["answer"])
            per.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        per.sort()
        out[name] = {"n": n, "seconds": round(total, 3), "per_s": round(n / total, 1),
                     "median_ms": round(1000 * statistics.median(per), 4),
                     "p99_ms": round(1000 * per[int(0.99 * (n - 1))], 3)}
    out["speedup"] = round(out["math_verify"]["seconds"] / out["ours"]["seconds"], 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--typical", type=int, default=2000, help="typical completions for the throughput rows")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "rewards_math_agreement.json"))
    args = ap.parse_args()
    reward = MathReward()

    def ours(completion, gold):
        return reward("", completion, answer=gold) == 1.0

    theirs = mv_alone()
    labelled = load("public.jsonl") + load("rules.jsonl")
    wrong = load("wrong.jsonl")
    for r in wrong:
        r["expected"] = False
    digits = one_digit_changed(labelled)
    sets = {"public suites (labelled)": labelled, "wrong-answer classes": wrong, "one digit changed": digits}
    results = {}
    for name, rows in sets.items():
        results[name] = {"ours": summary(rows, evaluate(rows, ours)),
                         "math_verify": summary(rows, evaluate(rows, theirs))}
    fp_classes = {}
    ours_wrong = evaluate(wrong, ours)["verdicts"]
    for r, v in zip(wrong, ours_wrong):
        fp_classes.setdefault(r["class"], 0)
        fp_classes[r["class"]] += int(v)
    tp = throughput(args.typical, ours, theirs)

    print(f"{'cases':<26}{'n':>5}  {'agree ours':>10} {'agree MV':>9}  {'FP ours':>7} {'FP MV':>6}  "
          f"{'FN ours':>7} {'FN MV':>6}  {'max CPU s ours':>14} {'MV':>6}")
    for name, r in results.items():
        o, m = r["ours"], r["math_verify"]
        print(f"{name:<26}{o['n']:>5}  {o['agreement']:>10.3f} {m['agreement']:>9.3f}  {o['false_positives']:>7} "
              f"{m['false_positives']:>6}  {o['false_negatives']:>7} {m['false_negatives']:>6}  "
              f"{o['max_cpu_s']:>14.3f} {m['max_cpu_s']:>6.3f}")
    print(f"\nwrong-answer classes accepted by ours: {sum(fp_classes.values())} "
          f"({', '.join(k for k, v in fp_classes.items() if v) or 'none'})")
    print(f"\n{'typical completions':<22}{'n':>6}{'seconds':>9}{'per s':>9}{'median ms':>11}{'p99 ms':>9}")
    for name in ("ours", "math_verify"):
        t = tp[name]
        print(f"{name:<22}{t['n']:>6}{t['seconds']:>9.2f}{t['per_s']:>9.0f}{t['median_ms']:>11.3f}{t['p99_ms']:>9.2f}")
    print(f"ours is {tp['speedup']}x Math-Verify's throughput")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "rewards_math_agreement",
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform(),
                               "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
                   "results": results, "wrong_classes_accepted": fp_classes, "throughput": tp}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
