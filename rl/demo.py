"""The embedded default: tiny BitMamba, supervised warm start, then GRPO on CPU with local Ray.

    bitmamba demo --output-dir runs/demo          # about 3-5 minutes on 2 CPU cores

1. warm start: the tiny model (preset `tiny`, tiny byte-level BPE tokenizer) learns the task format
   `12+7=19<eos>` for a few dozen optimizer steps through the shared training step
   (`rl.train_common.Trainer`), on purpose too briefly to be good at it: sampled accuracy starts
   around 0.1-0.4 (a GRPO signal needs groups with mixed rewards);
2. GRPO with `configs/grpo_demo.yaml` (the math reward, groups of 8) from that model;
3. `metrics.jsonl`, checkpoints and `reward.png` (mean reward vs step) under the output directory.
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
from rl.data import collate_sft
from rl.grpo import run as run_grpo
from rl.grpo_config import GRPOConfig, TINY_TOKENIZER_VOCAB, load_grpo_config
from rl.optim import OptimConfig, build_optimizer
from rl.plot import plot_reward
from rl.run_dir import DEMO_ENTRIES, check_run_dir, clear_run
from rl.schedule import Schedule, ScheduleConfig
from rl.tasks import make_task
from rl.train_common import LossOut, TrainConfig, Trainer
from rollout.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "grpo_demo.yaml"


def warm_start(cfg: GRPOConfig, out_dir: Path, steps: int, batch_size: int = 32, lr: float = 3e-3) -> Path:
    """Supervised warm start on the task's train split; saves a `from_pretrained` directory."""
    tok = build_tiny_tokenizer(TINY_TOKENIZER_VOCAB)
    task = make_task(cfg.task.name, cfg.task.path, seed=cfg.seed, **cfg.task.kwargs)
    mcfg = BitMambaConfig.preset(cfg.model.preset or "tiny", **cfg.model.overrides)
    torch.manual_seed(cfg.model.init_seed)
    model = BitMambaLM(mcfg)
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, muon=False), verbose=False)
    tcfg = TrainConfig(max_steps=max(steps, 1), batch_size=batch_size, precision="fp32", device="cpu",
                       seed=cfg.seed)
    trainer = Trainer(model, opt, Schedule(ScheduleConfig(kind="constant"), total_steps=max(steps, 1)), tcfg)
    eos = tok.eos_token_id

    def loss_fn(m, mb) -> LossOut:
        out = m(mb.input_ids, labels=mb.labels)
        return LossOut(out.loss_sum, out.n_tokens)

    pos = 0
    for step in range(steps):
        examples = []
        for row in task.rows("train", 10_000_000 + pos, batch_size):   # a region GRPO never reaches
            p = tok.encode(row["prompt"], add_special_tokens=False)
            a = tok.encode(row["answer"], add_special_tokens=False) + [eos]
            examples.append((p + a, [0] * len(p) + [1] * len(a)))
        pos += batch_size
        res = trainer.step(step, [collate_sft(examples, pad=tok.pad_token_id)], loss_fn)
        if (step + 1) % 20 == 0 or step + 1 == steps:
            print(f"warm start {step + 1}/{steps}: loss {res.loss:.3f}", file=sys.stderr, flush=True)
    dst = out_dir / "warmstart"
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bitmamba demo", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="GRPO config (default: configs/grpo_demo.yaml)")
    p.add_argument("--warm-steps", type=int, default=None, help="warm-start optimizer steps (default: config's)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the config's)")
    p.add_argument("--overwrite", action="store_true", help="delete the demo run already in --output-dir first")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the GRPO config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.output_dir)
    t0 = time.time()
    overrides = list(args.overrides) + [f"output_dir={out}"]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = load_grpo_config(args.config, overrides)
    check_run_dir(out, DEMO_ENTRIES, resume=False, overwrite=args.overwrite, resume_hint=None)
    if args.overwrite:
        clear_run(out, DEMO_ENTRIES)
    warm_steps = WARM_STEPS if args.warm_steps is None else args.warm_steps
    random.seed(cfg.seed)
    init = warm_start(cfg, out, warm_steps)
    print(f"warm start done in {time.time() - t0:.0f} s -> {init}", file=sys.stderr)
    last = run_grpo(cfg, init_dir=str(init))
    png = plot_reward(out / "metrics.jsonl", out / "reward.png")
    print(f"demo done in {time.time() - t0:.0f} s: reward_mean {last.get('reward_mean', float('nan')):.3f} "
          f"at step {cfg.steps}; plot {png}", file=sys.stderr)
    return 0


WARM_STEPS = 40

if __name__ == "__main__":
    from rl.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
