"""The tool-use warm start: supervised demonstrations of the calculator call format on the `bigmul` task,
saved as a model directory for a GRPO run with tools.

    bitmamba tool-warmstart --output-dir runs/tool_warm [key=value ...]
    bitmamba grpo --config configs/grpo_tools.yaml --init runs/tool_warm --output-dir runs/grpo_tools

A random model never emits a well-formed `<tool_call>`, so GRPO with tools starts from this warm start.
It runs the shared warm start (`rl.train.warmstart`, as the demo's). Demonstrations are built with the
agent's exact message format (`rollout.agent.loop.ToolMessageFormat`):
`tool_fraction` of them call the calculator, the rest answer directly; the injected tool message is
never trained (loss mask 0). Rows come from far into the train split (index >= 10**7), which GRPO never
reaches, so the warm start sees none of the RL prompts.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path


from model.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from model.errors import ConfigError
from model.lm import BitMambaLM
from model.typed import load_config
from rl.grpo.config import ModelSection, build_model, build_tokenizer
from rl.train.run_dir import clear_run, check_run_dir
from rl.train.warmstart import warm_start_steps
from rl.grpo.tasks import BigMultiplyTask
from rollout.chatml import IM_END, TOOL_CALL_END, TOOL_CALL_START
from rollout.agent.loop import ToolMessageFormat

MODEL_DIR_ENTRIES = (CONFIG_NAME, WEIGHTS_NAME)   # what marks DIR as holding a saved model
FIRST_ROW = 10_000_000      # warm-start rows: far beyond any train index a GRPO run draws


def _tiny_tool_model() -> ModelSection:
    # the tiny tokenizer's vocabulary; wider and deeper than the `tiny` preset (d_model 64, 2 layers),
    # which does not learn to copy the expression and the result within a few hundred steps
    return ModelSection(preset="tiny", overrides={"vocab_size": 384, "d_model": 128, "n_layers": 4,
                                                  "d_state": 32, "headdim": 32})


@dataclass
class ToolWarmStartConfig:
    """configs/tool_warmstart_tiny.yaml; the defaults are that file's values."""

    model: ModelSection = field(default_factory=_tiny_tool_model)
    digits: int = 3                    # bigmul operands: digits x digits
    steps: int = 600
    batch: int = 32
    lr: float = 3.0e-3
    tool_fraction: float = 0.3         # share of demonstrations that call the calculator
    seed: int = 0
    output_dir: str = "runs/tool_warm"

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ConfigError(f"steps and batch: must be >= 1, got {self.steps} and {self.batch}")
        if not 0.0 <= self.tool_fraction <= 1.0:
            raise ConfigError(f"tool_fraction: must be in [0, 1], got {self.tool_fraction}")


def demonstration(tok, fmt: ToolMessageFormat, row: dict, use_tool: bool) -> tuple[list[int], list[int]]:
    """(prompt + completion ids, loss mask) of one demonstration, built with the agent's exact format:
    sampled parts get loss, the injected tool message does not."""
    p = tok.encode(row["prompt"], add_special_tokens=False)
    ids, mask = list(p), [0] * len(p)

    def add(piece: list[int], m: int) -> None:
        ids.extend(piece)
        mask.extend([m] * len(piece))
    if use_tool:
        call = json.dumps({"name": "calculator", "arguments": {"expression": row["question"]}})
        add(tok.encode(f"{TOOL_CALL_START}{call}{TOOL_CALL_END}", add_special_tokens=False), 1)
        add(fmt.ids(row["answer"]), 0)
    add(tok.encode(f"{row['answer']}{IM_END}", add_special_tokens=False), 1)
    return ids, mask


def warm_start(cfg: ToolWarmStartConfig, model: BitMambaLM, tok, log=print) -> None:
    """`cfg.steps` steps of the shared warm start (`rl.train.warmstart`) on demonstrations."""
    task = BigMultiplyTask(seed=cfg.seed, digits=cfg.digits)
    fmt = ToolMessageFormat(tok)
    rng = random.Random(cfg.seed)

    def examples(step: int) -> list[tuple[list[int], list[int]]]:
        rows = task.rows("train", FIRST_ROW + step * cfg.batch, cfg.batch)
        return [demonstration(tok, fmt, r, rng.random() < cfg.tool_fraction) for r in rows]

    warm_start_steps(model, tok, examples, cfg.steps, cfg.batch, cfg.lr, seed=cfg.seed, log_every=20, log=log)
    model.eval()


def save_warm_start(cfg: ToolWarmStartConfig, dst: str | Path | None = None, log=print) -> Path:
    """Run the warm start and save model + tokenizer as a `from_pretrained` directory (`dst`, default
    `cfg.output_dir`): the `--init` of a GRPO run with tools (configs/grpo_tools.yaml)."""
    model, tok = build_model(cfg.model), build_tokenizer(cfg.model)
    warm_start(cfg, model, tok, log)
    dst = Path(dst if dst is not None else cfg.output_dir)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    from rl.args import tool_warmstart_parser

    args = tool_warmstart_parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(ToolWarmStartConfig, args.config, overrides)
    dst = Path(cfg.output_dir)
    check_run_dir(dst, MODEL_DIR_ENTRIES, resume=False, overwrite=args.overwrite, resume_hint=None)
    clear_run(dst, MODEL_DIR_ENTRIES)                 # --overwrite: the model files only, nothing else
    save_warm_start(cfg, dst, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"warm start saved to {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
