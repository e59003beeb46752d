"""Supervised fine-tuning in stages: cold start -> mixed (reasoning off for a share) -> polish.

    bitmamba sft --config configs/sft_tiny.yaml [--output-dir DIR] [key=value ...]

Each stage (`stages:` in the YAML) trains on ChatML conversations (`messages` records, see
`rl.train.chat`) with loss on assistant tokens only, padded to the longest sequence of each batch. A stage
rebuilds the optimizer and the schedule and starts from the previous stage's final model (the first
stage from `model.init_from`, e.g. a pretraining run's `final/`, or a preset). Stage outputs:
`OUTPUT/<k>_<name>/` (checkpoints, metrics.jsonl, final/); the last stage's model is also written to
`OUTPUT/final` (save_pretrained format + tokenizer). A finished stage (its `final/` exists) is
skipped on a rerun, an unfinished one resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch import nn

from model.checkpoint import WEIGHTS_NAME
from model.errors import ConfigError
from model.lm import BitMambaLM
from model.typed import to_dict
from rl.train.chat import render_chat
from rl.train.data import DataSource, SFTBatch, SFTLoader, load_records
from rl.train.run_dir import read_resolved_config
from rl.train.optim import OptimConfig
from rl.train.schedule import ScheduleConfig
from rl.args import stage_parser
from rl.train.loop import LossOut, TrainConfig
from rl.train.stage import (
    ModelSpec,
    TokenizerSpec,
    build_model_from_spec,
    build_tokenizer_from_spec,
    check_vocab,
    load_stage_config,
    resolve_data_path,
    run_stage,
    seed_everything,
    setup_output,
)
from rollout.tokenizer import has_tokenizer


@dataclass
class SFTStageConfig:
    name: str
    data: list[DataSource]
    epochs: float | None = None           # stage length in epochs over its records ...
    max_steps: int | None = None          # ... or in optimizer steps (one of the two)
    lr: float | None = None               # peak LR of this stage (default optim.lr); Muon's scales with it
    reasoning_off_share: float = 0.0      # share of samples rendered with reasoning switched off
    batch_size: int | None = None         # default train.batch_size

    def __post_init__(self):
        if (self.epochs is None) == (self.max_steps is None):
            raise ConfigError(f"stage {self.name}: give exactly one of epochs / max_steps")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"stage {self.name}: epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"stage {self.name}: max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.reasoning_off_share <= 1:
            raise ConfigError(f"stage {self.name}: reasoning_off_share must be in [0, 1], got {self.reasoning_off_share}")
        if not self.data:
            raise ConfigError(f"stage {self.name}: data needs at least one source")


@dataclass
class SFTConfig:
    stages: list[SFTStageConfig]
    output_dir: str = "runs/sft"
    max_len: int = 2048                   # tokens per conversation (longer ones are truncated)
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="cosine", warmup=0.05))
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: at least one SFT stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names must be unique, got {names}")
        if self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2, got {self.max_len}")


def sft_loss(model: nn.Module, batch: SFTBatch) -> LossOut:
    """CE on assistant tokens only (labels are -100 elsewhere, including padding)."""
    out = model(batch.input_ids, labels=batch.labels, return_logits=False)
    return LossOut(out.loss_sum, out.n_tokens)


@torch.no_grad()
def assistant_loss(model: nn.Module, batches: list[SFTBatch]) -> float:
    """Mean assistant-token CE over `batches` (evaluation)."""
    was = model.training
    model.eval()
    s = n = 0.0
    dev = next(model.parameters()).device
    for b in batches:
        b = b.to(dev)
        out = model(b.input_ids, labels=b.labels, return_logits=False)
        s += float(out.loss_sum)
        n += float(out.n_tokens)
    model.train(was)
    return s / max(n, 1)


def _stage_dataset(stage: SFTStageConfig, config_path: str | None):
    parts = []
    for src in stage.data:
        src.path = resolve_data_path(src.path, config_path)
        ds = load_records(src, streaming=False)
        if "messages" not in ds.column_names:
            raise ConfigError(f"{config_path or 'config'}: stage {stage.name}: data {src.path} has no 'messages' "
                              f"column (columns: {ds.column_names})")
        parts.append(ds.select_columns(["messages"]))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _tokenizer_texts(cfg: SFTConfig, config_path: str | None) -> list[str]:
    texts = []
    ds = _stage_dataset(cfg.stages[0], config_path)
    for rec in ds.select(range(min(len(ds), cfg.tokenizer.tiny_train_records))):
        texts.append(render_chat(rec["messages"]))
    return texts


def _stage_dirs(cfg: SFTConfig) -> tuple[str, ...]:
    """The stage directories (`<k>_<name>`) of this config and of the run already in the output
    directory (its `config.resolved.yaml`): what `--overwrite` deletes besides the common entries."""
    names = [f"{k}_{s.name}" for k, s in enumerate(cfg.stages)]
    old = read_resolved_config(cfg.output_dir) if cfg.train.overwrite else None
    for k, s in enumerate((old or {}).get("stages") or []):
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            names.append(f"{k}_{s['name']}")
    return tuple(dict.fromkeys(names))


def run(cfg: SFTConfig, config_path: str | None = None) -> Path:
    """Run every stage in order; return the directory of the final model."""
    seed_everything(cfg.train.seed)
    for k, stage in enumerate(cfg.stages):   # every stage still to run has readable data before anything is written
        if not (cfg.train.resume and not cfg.train.overwrite and (Path(cfg.output_dir) / f"{k}_{stage.name}" / "final" / WEIGHTS_NAME).is_file()):
            _stage_dataset(stage, config_path)
    texts = None
    if cfg.tokenizer.path is None and cfg.tokenizer.tiny_train_on_data:
        if not (cfg.model.init_from and has_tokenizer(cfg.model.init_from)):
            texts = _tokenizer_texts(cfg, config_path)
    tokenizer = build_tokenizer_from_spec(cfg.tokenizer, cfg.model.init_from, texts)
    out = setup_output(cfg.output_dir, to_dict(cfg), cfg.train, extra_entries=_stage_dirs(cfg))
    prev_final: Path | None = None
    for k, stage in enumerate(cfg.stages):
        sdir = out / f"{k}_{stage.name}"
        if cfg.train.resume and (sdir / "final" / WEIGHTS_NAME).is_file():
            print(f"[sft] stage {stage.name}: already finished ({sdir / 'final'}), skipping", file=sys.stderr)
            prev_final = sdir / "final"
            continue
        seed_everything(cfg.train.seed + k)
        mspec = cfg.model if prev_final is None else ModelSpec(preset=None, init_from=str(prev_final))
        model = build_model_from_spec(mspec, config_path)
        check_vocab(model, tokenizer, config_path)
        ds = _stage_dataset(stage, config_path)
        bs = stage.batch_size or cfg.train.batch_size
        steps = stage.max_steps or max(1, math.ceil(stage.epochs * len(ds) / (bs * cfg.train.grad_accum)))
        train = dataclasses.replace(cfg.train, max_steps=steps, batch_size=bs)
        optim = cfg.optim
        if stage.lr is not None:
            ratio = stage.lr / cfg.optim.lr if cfg.optim.lr else 1.0
            optim = dataclasses.replace(cfg.optim, lr=stage.lr,
                                        muon_lr=None if cfg.optim.muon_lr is None else cfg.optim.muon_lr * ratio)
        loader = SFTLoader(ds, tokenizer, batch_size=bs, max_len=cfg.max_len, seed=cfg.train.seed + k,
                           reasoning_off_share=stage.reasoning_off_share, name=stage.name)
        print(f"[sft] stage {k} {stage.name}: {len(ds)} conversations, {steps} steps, lr {optim.lr:.2e}, "
              f"reasoning off for {stage.reasoning_off_share:.0%}, from "
              f"{mspec.init_from or 'preset ' + str(mspec.preset)}", file=sys.stderr, flush=True)
        run_config = {**to_dict(cfg), "stage": to_dict(stage), "stage_index": k,
                      "init_from": mspec.init_from, "max_steps": steps}
        result = run_stage(f"sft/{stage.name}", cfg, model, tokenizer, loader, sft_loss, sdir, train=train,
                           optim=optim, run_config=run_config)
        if result.final_dir is None:  # stop_after: this invocation ends inside the stage
            return sdir
        prev_final = result.final_dir
    final = out / "final"
    BitMambaLM.from_pretrained(prev_final).save_pretrained(final)
    tokenizer.save_pretrained(str(final))
    print(f"[sft] done: final model in {final}", file=sys.stderr, flush=True)
    return final


def main(argv: list[str]) -> int:
    args = stage_parser("sft").parse_args(argv)
    cfg = load_stage_config(SFTConfig, args, "sft")
    run(cfg, args.config)
    return 0


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
