"""Argument parsers of the `bitmamba` sub-commands that load torch / DeepSpeed, and `run_main`, the one
way a sub-command exits (a user error is one line on stderr, exit 2). Parsers are declared here without
importing torch, so that `bitmamba COMMAND --help` and argument errors answer at once (the router in
`rl.cli` parses with these first; each stage's `main` parses with the same parser).

Nothing here may import torch, Ray, DeepSpeed or a module of ours that does (the generate and info
parsers come from `rollout.cli` and `model.info`, which load torch only when they run).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

GEN_EVAL_MAX_NEW_TOKENS = 256    # generation evals (`bitmamba eval --gen`, rl.eval.gen) without sampling params

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


def tool_warmstart_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba tool-warmstart", description="Supervised demonstrations of the "
                                "calculator call format (bigmul task), saved as the --init of GRPO with tools.")
    p.add_argument("--config", help="YAML config (configs/tool_warmstart_tiny.yaml; default: its values)")
    p.add_argument("--output-dir", help="overrides output_dir (the model directory written)")
    p.add_argument("--overwrite", action="store_true", help="save over files already in the output directory")
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


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba eval", description="`bitmamba eval DIR ...`: zero-shot benchmarks through lm-eval, or pass@k generation evals.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="DIR", help="checkpoint directory (config.json + model.safetensors + tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tasks", help="comma-separated lm-eval task names (hub datasets need network)")
    src.add_argument("--task-file", action="append", metavar="YAML", help="local lm-eval task YAML (repeatable)")
    src.add_argument("--gen", metavar="JSONL", help="generation eval: JSONL of {prompt, ...fields}")
    p.add_argument("--tokenizer", help="tokenizer directory (default: DIR)")
    p.add_argument("--limit", type=float, help="examples per task (an int, or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompts")
    p.add_argument("--batch-size", type=int, default=64, help="contexts per prefill batch / generation slots")
    p.add_argument("--max-length", type=int, default=2048, help="forward window in tokens (state carried over)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["auto", "tf32", "bfloat16", "float32"], default="auto",
                   help="auto: fp32 with TF32 matmuls on CUDA (exact for int8 x ternary), fp32 on CPU; "
                        "bfloat16: autocast")
    p.add_argument("--no-prefix-reuse", action="store_true", help="score every request by its own full forward")
    p.add_argument("--backend", choices=["auto", "torch", "fast"], default="auto", help="decode backend")
    p.add_argument("--reference", choices=["1b", "255m", "none"], default="1b",
                   help="published BitMamba-2 numbers to print beside ours")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("generation eval (--gen)")
    g.add_argument("--reward", action="append", help="reward spec (repeatable; see docs/rewards.md)")
    g.add_argument("--samples", type=int, default=4, help="completions per prompt (n)")
    g.add_argument("--k", default="1", help="comma-separated k values for pass@k (each <= --samples)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=GEN_EVAL_MAX_NEW_TOKENS)
    g.add_argument("--correct-threshold", type=float, default=1.0, help="a sample is correct if reward >= this")
    g.add_argument("--prompt-key", default="prompt")
    g.add_argument("--reward-workers", type=int, default=2)
    return p


def _convert_parser() -> argparse.ArgumentParser:
    from model.convert_args import parser      # torch-free
    return parser()


def _generate_parser() -> argparse.ArgumentParser:
    from rollout.cli import _parser          # torch loads inside rollout.cli.main only
    return _parser()


def _info_parser() -> argparse.ArgumentParser:
    from model.info import parser            # torch loads inside model.info's functions only
    return parser()


# command -> parser factory, for the router's fast path
PARSERS = {"grpo": grpo_parser, "demo": demo_parser, "tool-warmstart": tool_warmstart_parser, "eval": eval_parser,
           "convert": _convert_parser, "generate": _generate_parser, "info": _info_parser,
           **{s: (lambda s=s: stage_parser(s)) for s in STAGE_DESCRIPTIONS}}


def run_main(fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a sub-command, turning user errors into one clean line on stderr (exit 2)."""
    from model.errors import BitMambaError
    from rewards.errors import RewardError  # rewards/ is standalone, so its errors are not BitMambaErrors

    try:
        return int(fn(argv) or 0)
    except (BitMambaError, RewardError) as e:
        if os.environ.get("BITMAMBA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
