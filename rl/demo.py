"""The embedded default: tiny BitMamba, supervised warm start, then GRPO on CPU with local Ray.

    bitmamba demo --output-dir runs/demo          # about 5-8 minutes on 2 CPU cores

The task (`digits` in `rl/grpo/tasks.py`): addition and subtraction of 1-3 digit numbers written least
significant digit first (`036-3=726` is 630 - 3 = 627), scored by `rl.grpo.tasks:exact_digits`. Held-out
problems (operand pairs never trained on, about 10% of all) are what the demo reports: solving them
takes the carry/borrow algorithm, not recall.

1. warm start: the tiny model (preset `tiny`, a byte tokenizer: one token per digit) learns the format
   through the shared training step (`rl.train.loop.Trainer`), on purpose too briefly to be good
   at it: held-out pass@1 (sampled at temperature 1) starts around 0.2-0.35, so GRPO's groups have
   mixed rewards to learn from;
2. held-out pass@1 of that model (eval/pass@1 with its standard error, logged as step 0);
3. GRPO with `configs/grpo_demo.yaml` (groups of 8) from that model, held-out evals along the way;
4. `metrics.jsonl`, checkpoints and `reward.png` (held-out pass@1 beside the training reward) under
   the output directory; the last line prints held-out pass@1 before and after GRPO.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rl.grpo.driver import RAY_LOST, Driver, RunAborted, aborted_message
from rl.grpo.config import GRPOConfig, load_grpo_config
from rl.plot import plot_reward
from rl.train.run_dir import DEMO_ENTRIES, check_run_dir, clear_run
from rl.train.warmstart import warm_start_steps
from rl.grpo.tasks import make_task
from rl.args import DEMO_CONFIG, WARM_LR, demo_parser  # noqa: F401 (DEMO_CONFIG: re-exported for callers of rl.demo)
from rollout.tokenizer import MIN_VOCAB, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

WARM_BATCH = 64            # rows per warm-start optimizer step (its length and lr: rl.args)


def warm_start(cfg: GRPOConfig, out_dir: Path, steps: int, batch_size: int = WARM_BATCH,
               lr: float = WARM_LR, device: str = "cpu") -> Path:
    """Supervised warm start on the task's train split; saves a `from_pretrained` directory with the
    tokenizer it used (bytes only, so each digit is one token), which the GRPO stage then loads."""
    tok = build_tiny_tokenizer(MIN_VOCAB)
    task = make_task(cfg.task.name, cfg.task.path, seed=cfg.seed, **cfg.task.kwargs)
    mcfg = BitMambaConfig.preset(cfg.model.preset or "tiny", **cfg.model.overrides)
    torch.manual_seed(cfg.model.init_seed + cfg.seed)
    model = BitMambaLM(mcfg).to(device)
    eos = tok.eos_token_id

    def examples(step: int) -> list[tuple[list[int], list[int]]]:
        out = []
        for row in task.rows("train", 10_000_000 + step * batch_size, batch_size):   # a region GRPO never reaches
            p = tok.encode(row["prompt"], add_special_tokens=False)
            a = tok.encode(row["answer"], add_special_tokens=False) + [eos]
            out.append((p + a, [0] * len(p) + [1] * len(a)))
        return out

    warm_start_steps(model, tok, examples, steps, batch_size, lr, seed=cfg.seed, device=device)
    dst = out_dir / "warmstart"
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def grpo_from(cfg: GRPOConfig, init: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out eval of the warm-started policy (logged as step 0), then GRPO to `cfg.steps`.
    Returns (eval before GRPO, the last step's metrics record)."""
    driver = Driver(cfg, str(init))
    try:
        before = driver.evaluate()
        driver.metrics.log(0, **before)
        print(f"before GRPO: {heldout_line(before)}", file=sys.stderr, flush=True)
        return before, driver.run()
    except RAY_LOST as e:
        raise RunAborted(aborted_message(driver, e)) from None
    finally:
        driver.close()


def heldout_line(m: dict[str, float]) -> str:
    """'held-out pass@1 0.312 ± 0.021 (256 prompts)' from an eval record."""
    if "eval/pass@1" not in m:
        return "held-out pass@1 n/a (task.eval_size 0 or no eval)"
    return f"held-out pass@1 {m['eval/pass@1']:.3f} ± {m['eval/pass@1_stderr']:.3f}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    return demo_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.output_dir)
    t0 = time.time()
    overrides = list(args.overrides) + [f"output_dir={out}"]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    overrides.append(f"model.tokenizer={out / 'warmstart'}")   # the warm start's tokenizer, whatever the config says
    cfg = load_grpo_config(args.config, overrides)
    check_run_dir(out, DEMO_ENTRIES, resume=False, overwrite=args.overwrite, resume_hint=None)
    if args.overwrite:
        clear_run(out, DEMO_ENTRIES)
    random.seed(cfg.seed)
    init = warm_start(cfg, out, args.warm_steps, lr=args.warm_lr)
    print(f"warm start done in {time.time() - t0:.0f} s -> {init}", file=sys.stderr)
    before, last = grpo_from(cfg, init)
    png = plot_reward(out / "metrics.jsonl", out / "reward.png", title=f"demo: {cfg.task.name} task, seed {cfg.seed}")
    print(f"demo done in {time.time() - t0:.0f} s ({cfg.steps} GRPO steps; plot {png})\n"
          f"  before GRPO: {heldout_line(before)}\n"
          f"  after GRPO:  {heldout_line(last)}\n"
          f"  training reward (last step's groups): {last.get('reward_mean', float('nan')):.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
