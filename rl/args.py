"""Argument parsers of the `bitmamba` sub-commands that load torch / DeepSpeed, declared here without
importing either, so that `bitmamba COMMAND --help` and argument errors answer at once (the router in
`rl.cli` parses with these first; each stage's `main` parses with the same parser).

Nothing here may import torch, Ray, DeepSpeed or a module of ours that does (the generate and info
parsers come from `rollout.cli` and `model.info`, which load torch only when they run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

STAGE_DESCRIPTIONS = {
    "pretrain": "Pretrain a ternary Mamba-2 LM on packed documents.",
    "sft": "Multi-stage supervised fine-tuning on ChatML conversations.",
    "distill": "Distill a full-precision Mamba-2 teacher into a ternary student.",
}


def stage_argparser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser shared by the supervised stages (pretrain, sft, distill)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--output-dir", default=None, help="output directory (overrides output_dir in the config)")
    p.add_argument("--no-wandb", action="store_true", help="disable wandb even if the config enables it")
    p.add_argument("--no-resume", action="store_true",
                   help="do not continue the run in the output directory (refused if it holds checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in the output directory (checkpoints, metrics, final/) and start over")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10 optim.lr=1e-3")
    return p


def stage_parser(stage: str) -> argparse.ArgumentParser:
    return stage_argparser(f"bitmamba {stage}", STAGE_DESCRIPTIONS[stage])


def grpo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba grpo", description="GRPO fine-tuning on Ray")
    p.add_argument("--config", required=True, help="YAML config (see configs/grpo_tiny.yaml)")
    p.add_argument("--output-dir", help="overrides output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in output_dir (metrics, checkpoints, final/) and start over")
    p.add_argument("--init", help="initial policy directory (a save_pretrained / checkpoint dir)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    return p


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_demo.yaml"
# The demo's warm start: long enough that the model has half-learned the algorithm (GRPO needs some correct
# samples per group), short enough that most held-out problems are still failed when sampled.
WARM_STEPS = 900
WARM_LR = 3e-3


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba demo", description="The embedded default: a tiny BitMamba, "
                                "supervised warm start, then GRPO on CPU with a private local Ray.")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="GRPO config (default: configs/grpo_demo.yaml)")
    p.add_argument("--warm-steps", type=int, default=WARM_STEPS, help=f"warm-start optimizer steps ({WARM_STEPS})")
    p.add_argument("--warm-lr", type=float, default=WARM_LR, help=f"warm-start learning rate ({WARM_LR})")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the task, the init and GRPO (default: the config's)")
    p.add_argument("--overwrite", action="store_true", help="delete the demo run already in --output-dir first")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the GRPO config")
    return p


def _generate_parser() -> argparse.ArgumentParser:
    from rollout.cli import _parser          # torch loads inside rollout.cli.main only
    return _parser()


def _info_parser() -> argparse.ArgumentParser:
    from model.info import parser            # torch loads inside model.info's functions only
    return parser()


# command -> parser factory, for the router's fast path
PARSERS = {"grpo": grpo_parser, "demo": demo_parser, **{s: (lambda s=s: stage_parser(s)) for s in STAGE_DESCRIPTIONS},
           "generate": _generate_parser, "info": _info_parser}
