"""Benchmark: does the embedded demo raise HELD-OUT accuracy? `bitmamba demo` for several seeds on CPU.

    python bench/demo_learning.py [--seeds 0 1 2] [--parallel] [--root runs/demo_learning] [-- key=value ...]

Each seed runs the whole demo (warm start + GRPO, `configs/grpo_demo.yaml`) in its own process, as
`make demo` does, with `--seed S`. From its metrics.jsonl: held-out pass@1 with its standard error
before GRPO (the step-0 record) and after the last step, every eval in between, the training reward
per step, and the wall time of the process. Prints a table and writes bench/results/demo_learning.json.

Goal: on 2 CPU cores, under 10 minutes including the warm start, held-out pass@1 rises by at least
0.25 and ends at 0.6 or more, for every seed. Wall times depend on what else runs on the machine:
the JSON records the load average before and after each seed. `--parallel` runs the seeds at the
same time (faster on a big machine; on 2 cores each seed's wall time then includes the others').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.train.metrics import read_metrics  # noqa: E402

GOAL_GAIN, GOAL_FINAL, GOAL_WALL_S = 0.25, 0.6, 600.0


def summarize(metrics_path: Path) -> dict:
    """Held-out evals (step, pass@1, stderr), before/after, and the training reward per step."""
    recs = read_metrics(metrics_path)
    evals = [(r["step"], r["eval/pass@1"], r.get("eval/pass@1_stderr")) for r in recs if "eval/pass@1" in r]
    if not evals or evals[0][0] != 0:
        raise SystemExit(f"{metrics_path}: no step-0 held-out eval (is this a demo run?)")
    train = [(r["step"], r["reward_mean"]) for r in recs if "reward_mean" in r]
    (_, b, bse), (last_step, a, ase) = evals[0], evals[-1]
    first10 = [v for _, v in train[:10]]
    last10 = [v for _, v in train[-10:]]
    return {
        "heldout_before": {"pass@1": b, "stderr": bse},
        "heldout_after": {"pass@1": a, "stderr": ase, "step": last_step},
        "heldout_gain": a - b,
        "heldout_evals": [{"step": s, "pass@1": p, "stderr": se} for s, p, se in evals],
        "train_reward_first10": sum(first10) / max(len(first10), 1),
        "train_reward_last10": sum(last10) / max(len(last10), 1),
        "train_reward": [round(v, 4) for _, v in train],
    }


def seed_command(seed: int, root: Path, overrides: list[str]) -> list[str]:
    out = root / f"seed{seed}"
    return [sys.executable, "-m", "rl.demo", "--output-dir", str(out), "--seed", str(seed), "--overwrite",
            "wandb=false", *overrides]


def run_seeds(seeds: list[int], root: Path, overrides: list[str], parallel: bool) -> list[dict]:
    """Run the demo once per seed (one process each; all at once with `parallel`); summarize each."""
    rows: list[dict] = []
    pending = list(seeds)
    while pending:
        batch = pending if parallel else pending[:1]
        pending = pending[len(batch):]
        load0, t0 = os.getloadavg(), time.time()
        procs = {s: subprocess.Popen(seed_command(s, root, overrides), cwd=ROOT) for s in batch}
        for seed, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"seed {seed}: the demo exited with {proc.returncode}")
            wall = time.time() - t0
            res = {"seed": seed, "command": " ".join(seed_command(seed, root, overrides)[1:]),
                   "wall_s": round(wall, 1), "ran_in_parallel_with": [s for s in batch if s != seed],
                   "loadavg_before": [round(x, 2) for x in load0],
                   "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
            res.update(summarize(root / f"seed{seed}" / "metrics.jsonl"))
            res["meets_goal"] = bool(res["heldout_gain"] >= GOAL_GAIN and res["heldout_after"]["pass@1"] >= GOAL_FINAL
                                     and wall <= GOAL_WALL_S)
            rows.append(res)
            print_table(rows[-1:])
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'seed':>4} | {'held-out before':>16} | {'held-out after':>16} | {'gain':>6} | "
          f"{'train reward (first/last 10)':>28} | {'wall s':>7} | goal")
    for r in rows:
        b, a = r["heldout_before"], r["heldout_after"]
        print(f"{r['seed']:>4} | {b['pass@1']:.3f} ± {b['stderr']:.3f}    | {a['pass@1']:.3f} ± {a['stderr']:.3f}    | "
              f"{r['heldout_gain']:+.3f} | {r['train_reward_first10']:.3f} -> {r['train_reward_last10']:.3f}"
              f"{'':>14} | {r['wall_s']:>7.0f} | {'met' if r['meets_goal'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default="runs/demo_learning", help="where each seed's demo run goes")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo_learning.json"))
    p.add_argument("--parallel", action="store_true", help="run the seeds at the same time")
    p.add_argument("overrides", nargs="*", help="extra demo arguments / key=value config overrides")
    args = p.parse_args(argv)
    rows = run_seeds(args.seeds, Path(args.root), args.overrides, args.parallel)
    print_table(rows)
    result = {
        "bench": "demo_learning",
        "what": "held-out pass@1 (256 held-out problems x 4 samples at temperature 1, exact answer) of the "
                "embedded demo's policy before GRPO (after the warm start) and after the last GRPO step",
        "goal": {"gain": GOAL_GAIN, "final": GOAL_FINAL, "wall_s": GOAL_WALL_S},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "note": "wall times include the warm start and Ray start-up; other processes share the cores "
                         "(see loadavg_before/after)"},
        "overrides": args.overrides,
        "parallel": args.parallel,
        "all_meet_goal": all(r["meets_goal"] for r in rows),
        "seeds": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
