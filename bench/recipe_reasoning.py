"""The reasoning recipe on one GPU, in time-sliced invocations: corpus -> SFT -> held-out eval -> GRPO -> report.

    python bench/recipe_reasoning.py [--run-dir runs/recipe_reasoning] [--budget-s 510] [--results-dir DIR]

A 62M-parameter ternary BitMamba learns multi-step arithmetic word problems (`wordproblems` in
`rl/grpo/reasoning_tasks.py`): supervised on worked solutions of 1-3 operation problems
(`configs/recipe_reasoning_sft.yaml`), then GRPO on 2-4 operation problems with the built-in math reward
(`configs/recipe_reasoning_grpo.yaml`), judged on held-out 3-4 operation problems that neither stage
trains on. Every invocation continues where the last one stopped and returns before `--budget-s` seconds
(counted from its start), so the chain runs as a series of GPU jobs of at most ~9 minutes:

1. corpus: `RUN/data/sft.jsonl` (train-split rows with worked solutions), written once;
2. SFT: `bitmamba sft` in a subprocess (it resumes its checkpoints by default), with `train.stop_after`
   sized from the step time measured by earlier invocations; without a measurement it runs until the
   budget's end and is interrupted (SIGINT), losing at most `train.save_every` steps;
3. GRPO, in this process (`rl.grpo.driver.Driver`): held-out pass@1 of the SFT model first (logged as step 0 of
   the run's metrics.jsonl), then the loop in windows of `eval_every` steps, each ending on a held-out
   eval and a checkpoint; a window starts only when the step and eval times measured so far say it ends
   before the budget (a SIGALRM at the budget's end stops an overrunning one; `--resume` then continues
   from the last window's checkpoint). The loop's end is the driver's `cfg.steps`, moved window by window;
   `learner.lr_schedule: constant` keeps the schedule independent of it;
4. rollout/learner mismatch with a bf16 SSM state: `--bf16-state-steps` GRPO steps from the final policy
   with `model.ssm_dtype=bfloat16` (the main run uses fp32 state);
5. report (every invocation, also a partial one): `RESULTS/recipe_reasoning.json` (held-out pass@1 before
   and after GRPO with standard errors, the curve, training reward, learn/mismatch_kl over the run, the
   GRPO step time breakdown: time/generate, time/learn, time/sync), `recipe_reasoning.png` (held-out
   pass@1 and training reward vs step) and copies of the stages' metrics.jsonl.

`--sft KEY=VALUE` / `--grpo KEY=VALUE` override the configs (the CPU smoke test runs the same chain at toy
sizes this way); `--overwrite` deletes the run directory's recipe files first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.errors import ConfigError  # noqa: E402
from model.info import checkpoint_info  # noqa: E402
from model.jsonl import read_jsonl  # noqa: E402
from rl.train.checkpoint import CheckpointManager, read_manifest  # noqa: E402
from rl.grpo.config import load_grpo_config  # noqa: E402
from rl.train.metrics import read_metrics  # noqa: E402
from rl.grpo.reasoning_tasks import WordProblemTask, write_sft_corpus  # noqa: E402

SFT_CONFIG = ROOT / "configs" / "recipe_reasoning_sft.yaml"
GRPO_CONFIG = ROOT / "configs" / "recipe_reasoning_grpo.yaml"
CORPUS_START = 100_000_000        # train-split rows from here on: a region the GRPO stage never reaches
RUN_ENTRIES = ("data", "sft", "grpo", "bf16_state", "eval_before.json", "invocations.jsonl")

# seconds this script allows for work it cannot measure before it starts
SFT_START_S = 90.0                # subprocess start: imports, corpus load, model build, first-step compile
GRPO_START_S = 120.0              # Ray, learner and worker start-up, the first eval's compile
FIRST_WINDOW_S = 180.0            # a first GRPO window before any was timed (the first step compiles)
CLOSE_S = 20.0                    # stopping Ray and writing the report


class ChunkDeadline(BaseException):
    """This invocation's budget is spent (SIGALRM); the last checkpoint is where the next one continues."""


def log(msg: str) -> None:
    print(f"[recipe] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- corpus


def make_corpus(run: Path, size: int, ops: tuple[int, int], seed: int) -> Path:
    """`run/data/sft.jsonl`: `size` train rows of `wordproblems` with `ops` operations, written once; a
    corpus made with other options is refused (--overwrite starts over)."""
    path, stamp_path = run / "data" / "sft.jsonl", run / "data" / "corpus.json"
    stamp = {"task": "wordproblems", "size": size, "ops": list(ops), "seed": seed, "start": CORPUS_START}
    if path.is_file() and stamp_path.is_file():
        old = json.loads(stamp_path.read_text())
        if old != stamp:
            raise ConfigError(f"{path} was written with {old}, this invocation asks for {stamp}: "
                              f"--overwrite to start over, or another --run-dir")
        return path
    t0 = time.time()
    task = WordProblemTask(seed=seed, min_ops=ops[0], max_ops=ops[1])
    write_sft_corpus(path, task, size, start=CORPUS_START)
    stamp_path.write_text(json.dumps(stamp))
    log(f"corpus: {size} worked solutions ({ops[0]}-{ops[1]} operations) -> {path} in {time.time() - t0:.0f} s")
    return path


# ---------------------------------------------------------------------------------------------- SFT


def sft_overrides(run: Path, corpus: Path, sft_config: Path, steps: int | None, user: list[str]) -> list[str]:
    """The SFT stage's overrides: output dir, every stage's data = the corpus (and `steps` when given)."""
    data = yaml.safe_load(sft_config.read_text())
    stages = data.get("stages") or []
    for s in stages:
        s["data"] = [{"path": str(corpus)}]
        if steps is not None:
            s.pop("epochs", None)
            s["max_steps"] = steps
    return [f"output_dir={run / 'sft'}", f"stages={json.dumps(stages)}", *user]


def sft_seconds_per_step(sft_dir: Path) -> float | None:
    """Median wall seconds per optimizer step over the SFT metrics logged so far (None before any)."""
    rates = []
    for m in sorted(sft_dir.glob("*/metrics.jsonl")):
        recs = read_metrics(m)
        for a, b in zip(recs, recs[1:]):
            if b["step"] > a["step"] and b["time"] > a["time"]:
                rates.append((b["time"] - a["time"]) / (b["step"] - a["step"]))
    return statistics.median(rates) if rates else None


def run_sft(run: Path, overrides: list[str], sft_config: Path, deadline: float) -> bool:
    """One SFT invocation that ends before `deadline`; True when the SFT model (`run/sft/final`) exists."""
    final = run / "sft" / "final" / "model.safetensors"
    if final.is_file():
        return True
    left = deadline - time.time() - CLOSE_S
    per_step = sft_seconds_per_step(run / "sft")
    starts = _sft_startups(run)
    start_s = max(starts) if starts else SFT_START_S
    extra = []
    if per_step is not None:
        steps = int((left - start_s) / per_step)
        if steps < 1:
            log(f"SFT: {left:.0f} s left, not enough for a step ({per_step:.2f} s/step + start-up); next invocation")
            return False
        extra.append(f"train.stop_after={steps}")
    cmd = [sys.executable, "-m", "rl.train.sft", "--config", str(sft_config), *overrides, *extra]
    log(f"SFT: {' '.join(cmd[1:3])} ... {' '.join(extra) or '(until the budget ends)'}; {left:.0f} s left")
    launched = time.time()
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait(timeout=max(left, 1.0))
    except subprocess.TimeoutExpired:
        _note_sft_startup(run, launched)
        log("SFT: budget spent, interrupting (SIGINT); the next invocation resumes from its last checkpoint")
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=CLOSE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        return False
    _note_sft_startup(run, launched)
    if rc != 0 and not final.is_file():
        raise SystemExit(f"SFT failed (exit {rc}); see its messages above")
    return final.is_file()


def _sft_startups(run: Path) -> list[float]:
    path = run / "sft" / "startups.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _note_sft_startup(run: Path, launched: float) -> None:
    """Record how long an SFT subprocess took from launch to its first step (imports, data, model, the first
    step's compile): the first metrics record written after `launched`, less its steps at the median rate."""
    per_step = sft_seconds_per_step(run / "sft")
    for m in sorted((run / "sft").glob("*/metrics.jsonl")):   # the stage this process started in
        recs = read_metrics(m)
        new = [r for r in recs if r["time"] >= launched]
        if new and per_step is not None:
            break
    else:
        return
    old = [r["step"] for r in recs if r["time"] < launched]    # up to the checkpoint it resumed from
    first_steps = new[0]["step"] - (max(old) if old else 0)
    (run / "sft" / "startups.json").write_text(json.dumps(
        _sft_startups(run) + [max(new[0]["time"] - launched - max(first_steps - 1, 0) * per_step, 0.0)]))


# ---------------------------------------------------------------------------------------------- GRPO


def grpo_config(run: Path, grpo_yaml: Path, init: Path, out: Path, fresh: bool, user: list[str]):
    base = [f"model.path={init}", f"model.tokenizer={init}", f"output_dir={out}"]
    state = ["overwrite=true"] if fresh else ["resume=true"]
    return load_grpo_config(grpo_yaml, base + list(user) + state)


def latest_step(out: Path) -> int:
    """The step of the newest complete GRPO checkpoint under `out` (0 without one)."""
    if not (out / "checkpoints").is_dir():
        return 0
    path = CheckpointManager(out / "checkpoints").latest(verify=False)
    return 0 if path is None else int(read_manifest(path)["step"])


def window_seconds(records: list[dict], window: int, warm: bool) -> float | None:
    """Predicted wall seconds of `window` GRPO steps ending on an eval, from the steps logged so far: the
    median step (`time/step`) and eval (`time/eval`); a cold process (not `warm`) counts its slowest step
    once for the compile of its first. None before any step was logged."""
    steps = [r["time/step"] for r in records if r["step"] >= 1 and isinstance(r.get("time/step"), (int, float))]
    if not steps:
        return None
    evals = [r["time/eval"] for r in records if isinstance(r.get("time/eval"), (int, float))]
    med = statistics.median(steps)
    first = med if warm else max(steps)
    return (window - 1) * med + first + (statistics.median(evals) if evals else 0.0) + 10.0


def run_grpo(run: Path, grpo_yaml: Path, user: list[str], deadline: float) -> bool:
    """GRPO windows until the run is done or the next window would pass `deadline`. True when done."""
    init, out = run / "sft" / "final", run / "grpo"
    done = latest_step(out)
    cfg = grpo_config(run, grpo_yaml, init, out, fresh=done == 0, user=user)
    total, window = cfg.steps, cfg.eval_every if cfg.eval_every > 0 else 10
    if done >= total:
        return True
    if importlib.util.find_spec("ray") is None:
        log("GRPO: Ray is not installed (yet; on the GPU machine the second setup run completes it); "
            "next invocation")
        return False
    from rl.grpo.driver import RAY_LOST, Driver, RunAborted, aborted_message   # imports Ray: only once it is there

    need = window_seconds(_records(out) if done else [], window, warm=False)
    left = deadline - time.time() - CLOSE_S
    if left < GRPO_START_S + (FIRST_WINDOW_S if need is None else need):
        log(f"GRPO: {left:.0f} s left, not enough to start and finish a window; next invocation")
        return False
    log(f"GRPO: {'from step ' + str(done) if done else 'new run'} to {total} steps in windows of {window}; "
        f"{left:.0f} s left")
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(max(int(deadline - time.time() - CLOSE_S), 1))
    driver = None
    try:
        driver = Driver(cfg, None)
        if driver.step == 0:
            before = driver.evaluate()
            driver.metrics.log(0, **before)
            (run / "eval_before.json").write_text(json.dumps(before, indent=1))
            log(f"before GRPO: {heldout_line(before)}")
        warm = False
        while driver.step < total:
            need = window_seconds(_records(out), window, warm)   # a resumed writer keeps the earlier records
            if need is not None and time.time() + need > deadline - CLOSE_S:
                log(f"GRPO: the next window needs ~{need:.0f} s, {deadline - CLOSE_S - time.time():.0f} s left: "
                    f"stopping at step {driver.step}; the next invocation resumes")
                break
            driver.cfg.steps = min(total, (driver.step // window + 1) * window)
            driver.run()
            warm = True
    except RAY_LOST as e:
        raise RunAborted(aborted_message(driver, e)) from None
    except ChunkDeadline:
        log("GRPO: budget spent inside a window; the next invocation resumes from the last checkpoint")
    finally:
        signal.alarm(0)
        if driver is not None:
            driver.close()
    return latest_step(out) >= total


def _deadline(signum, frame):
    raise ChunkDeadline()


def _records(out: Path) -> list[dict]:
    return read_metrics(out) if (out / "metrics.jsonl").is_file() else []


def run_bf16_state(run: Path, grpo_yaml: Path, user: list[str], steps: int, deadline: float) -> bool:
    """A short GRPO run from the final policy with a bf16 SSM state in the worker, for its mismatch KL."""
    out = run / "bf16_state"
    if steps == 0 or (out / "final" / "model.safetensors").is_file():
        return True
    if importlib.util.find_spec("ray") is None:
        return False
    from rl.grpo.driver import run as grpo_run
    left = deadline - time.time() - CLOSE_S
    main = _records(run / "grpo")
    med = statistics.median([r["time/step"] for r in main if r["step"] >= 1]) if main else 0.0
    if left < GRPO_START_S + steps * med:
        log(f"bf16 state: {left:.0f} s left, not enough; next invocation")
        return False
    cfg = grpo_config(run, grpo_yaml, run / "grpo" / "final", out, fresh=True,
                      user=list(user) + [f"steps={steps}", "eval_every=0", "checkpoint_every=0",
                                         "model.ssm_dtype=bfloat16"])
    log(f"bf16 state: {steps} GRPO steps from {run / 'grpo' / 'final'} with model.ssm_dtype=bfloat16")
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(max(int(left), 1))
    try:
        grpo_run(cfg)
    except ChunkDeadline:
        log("bf16 state: budget spent; the next invocation runs it again")
        return False
    finally:
        signal.alarm(0)
    return True


# ---------------------------------------------------------------------------------------------- report


def heldout_line(m: dict) -> str:
    if "eval/pass@1" not in m:
        return "held-out pass@1 n/a"
    return f"held-out pass@1 {m['eval/pass@1']:.3f} ± {m['eval/pass@1_stderr']:.3f}"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summary(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "median": statistics.median(vals), "max": max(vals),
            "min": min(vals), "last": vals[-1], "n": len(vals)}


def step_breakdown(recs: list[dict]) -> dict[str, Any]:
    """Per-step seconds of the GRPO phases: the median (steady state: compile steps excluded by
    construction) and the mean over every step, with each phase's share of the median step."""
    keys = ("time/generate", "time/score", "time/learn", "time/sync", "time/step")
    steps = [r for r in recs if r["step"] >= 1]
    out: dict[str, Any] = {"steps": len(steps)}
    for k in keys:
        vals = [_num(r.get(k)) for r in steps]
        vals = [v for v in vals if v is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "mean": statistics.fmean(vals), "max": max(vals)}
    if "time/step" in out:
        tot = out["time/step"]["median"]
        out["share_of_median_step"] = {k: out[k]["median"] / tot for k in keys[:-1] if k in out and tot > 0}
    for k in ("response_len_mean", "rollout/tokens", "learn/tokens", "tokens_per_s"):
        vals = [_num(r.get(k)) for r in steps]
        if any(v is not None for v in vals):
            out[k] = summary(vals)["median"]
    return out


def sft_summary(run: Path) -> dict[str, Any] | None:
    files = sorted((run / "sft").glob("*/metrics.jsonl"))
    if not files:
        return None
    recs = [r for f in files for r in read_metrics(f)]
    if not recs:
        return None
    per_step = sft_seconds_per_step(run / "sft")
    return {"steps_logged": recs[-1]["step"], "loss_first": recs[0].get("loss"), "loss_last": recs[-1].get("loss"),
            "tokens_per_s_median": statistics.median([r["tokens_per_s"] for r in recs if "tokens_per_s" in r]),
            "seconds_per_step_median": per_step,
            "train_seconds_estimate": None if per_step is None else per_step * recs[-1]["step"],
            "finished": (run / "sft" / "final" / "model.safetensors").is_file()}


def progress(run: Path) -> dict[str, int]:
    """Where the chain stands: SFT steps checkpointed (all stages), GRPO steps checkpointed."""
    sft = 0
    for d in sorted((run / "sft").glob("*/checkpoints")):
        path = CheckpointManager(d).latest(verify=False)
        sft += 0 if path is None else int(read_manifest(path)["step"])
    return {"sft_steps": sft, "grpo_steps": latest_step(run / "grpo")}


def model_info(run: Path) -> dict[str, Any] | None:
    final = run / "sft" / "final"
    if not (final / "config.json").is_file():
        return None
    info = checkpoint_info(final)
    return {"parameters": info["parameters"], "packed_mb": info["packed_mb"], "config": info["config"]}


def build_report(run: Path, args: argparse.Namespace, grpo_total: int, done: dict[str, bool]) -> dict[str, Any]:
    recs = _records(run / "grpo")
    evals = [r for r in recs if "eval/pass@1" in r]
    before = next((r for r in evals if r["step"] == 0), None)
    after = next((r for r in reversed(evals) if r["step"] >= 1), None)

    def point(r):
        if r is None:
            return None
        out = {"step": r["step"], "pass@1": r["eval/pass@1"], "pass@1_stderr": r["eval/pass@1_stderr"],
               "reward_mean": r.get("eval/reward_mean")}
        out.update({k[5:]: v for k, v in r.items() if k.startswith("eval/pass@") and k[10:].isdigit()})
        return out

    gain = None
    if before is not None and after is not None:
        d = after["eval/pass@1"] - before["eval/pass@1"]
        se = math.hypot(after["eval/pass@1_stderr"], before["eval/pass@1_stderr"])
        gain = {"pass@1": d, "stderr": se}
    train = [r for r in recs if r["step"] >= 1]
    bf16 = _records(run / "bf16_state")
    mm = [_num(r.get("learn/mismatch_kl")) for r in train]
    window = max(len(mm) // 10, 1)
    return {
        "command": "python bench/recipe_reasoning.py " + " ".join(args.argv),
        "device": _device(),
        "complete": all(done.values()),
        "stages_done": done,
        "invocations": _invocations(run),
        "model": model_info(run),
        "corpus": {"size": args.corpus_size, "ops": list(args.corpus_ops), "seed": args.seed},
        "sft": sft_summary(run),
        "grpo": {"steps_done": train[-1]["step"] if train else 0, "steps_total": grpo_total,
                 "train_reward_first": train[0].get("reward_mean") if train else None,
                 "train_reward_last": train[-1].get("reward_mean") if train else None},
        "heldout": {"before": point(before), "after": point(after), "gain": gain,
                    "curve": [point(r) for r in evals]},
        "train_reward": [[r["step"], r.get("reward_mean")] for r in train],
        "mismatch_kl": {"fp32_state": summary(mm), "fp32_state_last_10pct": summary(mm[-window:]),
                        "bf16_state": summary([_num(r.get("learn/mismatch_kl")) for r in bf16 if r["step"] >= 1])},
        "step_time": step_breakdown(recs),
    }


def _invocations(run: Path) -> list[dict]:
    path = run / "invocations.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"cpu (torch {torch.__version__})"


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(s, r) for s, r in report["train_reward"] if r is not None]
    if tr:
        ax.plot([s for s, _ in tr], [r for _, r in tr], color="tab:gray", alpha=0.6, lw=1,
                label="training reward (2-4 operations)")
    curve = report["heldout"]["curve"]
    if curve:
        ax.errorbar([p["step"] for p in curve], [p["pass@1"] for p in curve],
                    yerr=[p["pass@1_stderr"] for p in curve], color="tab:blue", marker="o", capsize=3,
                    label="held-out pass@1 (3-4 operations, never trained on)")
    m = report["model"]
    size = f"{m['parameters']['total'] / 1e6:.1f}M-parameter " if m else ""
    ax.set(xlabel="GRPO step (0 = the SFT model)", ylabel="reward / pass@1", ylim=(0, 1),
           title=f"reasoning recipe: {size}ternary BitMamba, word problems")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(run: Path, results: Path, report: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "recipe_reasoning.json").write_text(json.dumps(report, indent=1))
    plot(report, results / "recipe_reasoning.png")
    for src, name in ((run / "grpo" / "metrics.jsonl", "recipe_reasoning_grpo_metrics.jsonl"),
                      (run / "bf16_state" / "metrics.jsonl", "recipe_reasoning_bf16_state_metrics.jsonl")):
        if src.is_file():
            shutil.copyfile(src, results / name)
    sft = sorted((run / "sft").glob("*/metrics.jsonl"))
    if sft:
        shutil.copyfile(sft[-1], results / "recipe_reasoning_sft_metrics.jsonl")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/recipe_reasoning.py", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/recipe_reasoning", help="where every stage writes (continued)")
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"),
                   help="recipe_reasoning.json / .png and the stages' metrics copies (on the GPU machine: $OUT)")
    p.add_argument("--budget-s", type=float, default=510.0,
                   help="wall seconds of this invocation, from its start (default 510: a 10-minute GPU job)")
    p.add_argument("--sft-config", default=str(SFT_CONFIG))
    p.add_argument("--grpo-config", default=str(GRPO_CONFIG))
    p.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE", help="SFT config override")
    p.add_argument("--grpo", action="append", default=[], metavar="KEY=VALUE", help="GRPO config override")
    p.add_argument("--sft-steps", type=int, default=None, help="max_steps of every SFT stage (default: the config's)")
    p.add_argument("--corpus-size", type=int, default=128_000, help="worked solutions in the SFT corpus (1000 steps x 128: each seen once)")
    p.add_argument("--corpus-ops", type=int, nargs=2, default=(1, 3), metavar=("LO", "HI"),
                   help="operations per corpus problem (default 1 3; GRPO trains on 2-4, evaluates 3-4)")
    p.add_argument("--seed", type=int, default=0, help="the corpus's task seed")
    p.add_argument("--bf16-state-steps", type=int, default=4,
                   help="GRPO steps with a bf16 SSM state after the run, for its mismatch KL (0: skip)")
    p.add_argument("--overwrite", action="store_true", help="delete the run directory's recipe files first")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t0 = time.time()
    deadline = t0 + args.budget_s
    run = Path(args.run_dir).resolve()     # Ray actors and the SFT subprocess see the same paths
    # the SFT subprocess and the Ray actors (started from other directories) import the project from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if args.overwrite:
        for e in RUN_ENTRIES:
            p = run / e
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(run, args.corpus_size, tuple(args.corpus_ops), args.seed)
    sft_yaml, grpo_yaml = Path(args.sft_config), Path(args.grpo_config)
    grpo_total = load_grpo_config(grpo_yaml, list(args.grpo)).steps
    done = {"sft": False, "grpo": False, "bf16_state": args.bf16_state_steps == 0}
    start = progress(run)
    done["sft"] = run_sft(run, sft_overrides(run, corpus, sft_yaml, args.sft_steps, args.sft), sft_yaml, deadline)
    if done["sft"]:
        done["grpo"] = run_grpo(run, grpo_yaml, args.grpo, deadline)
    if done["grpo"]:
        done["bf16_state"] = run_bf16_state(run, grpo_yaml, args.grpo, args.bf16_state_steps, deadline)
    with open(run / "invocations.jsonl", "a", encoding="utf-8") as f:   # what this invocation did, and how long
        f.write(json.dumps({"start": round(t0, 1), "seconds": round(time.time() - t0, 1), "before": start,
                            "after": progress(run), "done": done}) + "\n")
    report = build_report(run, args, grpo_total, done)
    write_results(run, Path(args.results_dir), report)
    h = report["heldout"]
    log(f"invocation done in {time.time() - t0:.0f} s; stages done: {done}")
    print(f"held-out pass@1 before GRPO: {_fmt(h['before'])}\n"
          f"held-out pass@1 after GRPO:  {_fmt(h['after'])}"
          + (f"\ngain: {h['gain']['pass@1']:+.3f} ± {h['gain']['stderr']:.3f}" if h["gain"] else "")
          + f"\nmismatch KL (fp32 state): {_fmt_kl(report['mismatch_kl']['fp32_state'])}"
          f"; bf16 state: {_fmt_kl(report['mismatch_kl']['bf16_state'])}"
          f"\nresults: {Path(args.results_dir) / 'recipe_reasoning.json'}"
          + ("" if report["complete"] else "\nNOT COMPLETE: run the same command again to continue"), flush=True)
    return 0


def _fmt(p: dict | None) -> str:
    return "n/a" if p is None else f"{p['pass@1']:.3f} ± {p['pass@1_stderr']:.3f} (step {p['step']})"


def _fmt_kl(s: dict | None) -> str:
    return "n/a" if s is None else f"mean {s['mean']:.2e}, max {s['max']:.2e} over {s['n']} steps"


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
