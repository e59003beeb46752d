"""Benchmark: score 10,000 short completions with the built-in ``math`` reward through RewardPool.

    python bench/rewards_math.py [--n 10000] [--workers 2]

Prints a table (seconds of the fastest of --repeats runs, completions/s) for the pool on N workers and for the in-process mode,
and writes bench/results/rewards_math.json. Completions mix boxed answers, GSM8K ``####`` answers,
LaTeX fractions, wrong answers and a few without an answer, so every code path is exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import RewardPool  # noqa: E402


def make_samples(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, completions, fields = [], [], []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        kind = i % 6
        if kind == 0:
            gold, text = str(a + b), f"We add {a} and {b}. The answer is \\boxed{{{a + b}}}."
        elif kind == 1:
            gold, text = f"{a} / {b}", f"Dividing gives \\boxed{{\\frac{{{a}}}{{{b}}}}}"
        elif kind == 2:
            gold, text = f"#### {a * b:,}", f"{a} times {b} is {a * b:,}\n#### {a * b:,}"
        elif kind == 3:
            gold, text = str(a - b), f"So the result is \\boxed{{{a - b + 1}}}"   # wrong
        elif kind == 4:
            gold, text = f"{a}x + {b}", f"<answer>{b} + {a}x</answer>"             # symbolic
        else:
            gold, text = str(a), "I am not sure."                                    # no answer
        prompts.append(f"Problem {i}: compute.")
        completions.append(text)
        fields.append({"answer": gold})
    return prompts, completions, fields


def run(num_workers: int, n: int, repeats: int) -> dict:
    """Each timed run scores fresh samples (another seed), so the answer cache cannot help."""
    t0 = time.perf_counter()
    with RewardPool("math", num_workers=num_workers, timeout_s=10) as pool:
        t_start = time.perf_counter() - t0
        prompts, completions, fields = make_samples(64, seed=10_000)
        res = pool.score(prompts, completions, fields)   # warm-up
        times = []
        for r in range(repeats):
            prompts, completions, fields = make_samples(n, seed=r)
            t1 = time.perf_counter()
            res = pool.score(prompts, completions, fields)
            times.append(time.perf_counter() - t1)
    dt = min(times)
    ok = sum(s == "ok" for s in res.status)
    mean = sum(r for r in res.rewards if r is not None) / len(res.rewards)
    return {"workers": num_workers, "n": len(completions), "seconds": round(dt, 3),
            "seconds_all_runs": [round(t, 3) for t in times],
            "completions_per_s": round(len(completions) / dt, 1), "startup_s": round(t_start, 3),
            "ok": ok, "mean_reward": round(mean, 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the table shows the fastest")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "rewards_math.json"))
    args = ap.parse_args()
    rows = [run(args.workers, args.n, args.repeats), run(0, args.n, args.repeats)]
    print(f"{'mode':<14}{'n':>8}{'seconds':>10}{'compl/s':>12}{'startup s':>11}{'mean':>8}")
    for r in rows:
        mode = f"pool x{r['workers']}" if r["workers"] else "in-process"
        print(f"{mode:<14}{r['n']:>8}{r['seconds']:>10.2f}{r['completions_per_s']:>12.0f}"
              f"{r['startup_s']:>11.2f}{r['mean_reward']:>8.3f}")
    expected = 4 / 6   # kinds 0, 1, 2, 4 are correct
    assert all(abs(r["mean_reward"] - expected) < 0.01 for r in rows), rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "rewards_math", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                   "platform": platform.platform(),
                   "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}, "results": rows}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
