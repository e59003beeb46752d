"""Pretraining stage: packed documents with document boundaries, Muon/AdamW, WSD or FG-WSD.

    bitmamba pretrain --config configs/pretrain_tiny.yaml [--output-dir DIR] [key=value ...]

Reads top to bottom: config -> tokenizer, data, model, optimizer, schedule -> `run_loop` (resume,
train, checkpoint every `train.save_every`, final model in `OUTPUT/final` in save_pretrained format
with the tokenizer beside it, so `bitmamba generate OUTPUT/final` works) -> metrics in
`OUTPUT/metrics.jsonl`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import nn

from model.errors import ConfigError
from rl.args import stage_parser
from rl.train.data import DataSource, PackedBatch
from rl.train.loop import LoopResult, LossOut, TrainConfig
from rl.train.optim import OptimConfig
from rl.train.schedule import ScheduleConfig
from rl.train.stage import (
    ModelSpec,
    TokenizerSpec,
    build_model_from_spec,
    build_tokenizer_from_spec,
    load_sources,
    load_stage_config,
    open_stage,
    packed_loader,
    run_stage,
    seed_everything,
)


@dataclass
class PretrainDataConfig:
    sources: list[DataSource] = field(default_factory=list)
    seq_len: int = 2048                   # context length (phases may change it: schedule.decay_seq_len)
    shuffle: bool = True
    keep_tokens_per_batch: bool = True    # when a phase raises the context, lower the batch size to match

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources: at least one data source is needed")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: must be >= 2, got {self.seq_len}")


@dataclass
class PretrainConfig:
    data: PretrainDataConfig
    output_dir: str = "runs/pretrain"
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def pretrain_loss(model: nn.Module, batch: PackedBatch) -> LossOut:
    """Token CE over the packed rows; the SSM state resets at each document boundary (seq_idx)."""
    out = model(batch.input_ids, seq_idx=batch.seq_idx, labels=batch.labels, return_logits=False)
    return LossOut(out.loss_sum, out.n_tokens)


def run(cfg: PretrainConfig, config_path: str | None = None) -> LoopResult:
    seed_everything(cfg.train.seed)
    sources = load_sources(cfg.data.sources, config_path)
    texts = None
    if cfg.tokenizer.path is None and cfg.tokenizer.tiny_train_on_data:
        texts = []
        per = max(1, cfg.tokenizer.tiny_train_records // len(sources))
        for s, ds in sources:
            texts += [str(r[s.text_field]) for r in ds.take(per)] if hasattr(ds, "take") else []
    tokenizer = build_tokenizer_from_spec(cfg.tokenizer, cfg.model.init_from, texts)
    model = build_model_from_spec(cfg.model, config_path)
    out = open_stage(cfg, model, tokenizer, config_path)      # only once the data, tokenizer and model are checked
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[pretrain] model {n_params:,} parameters, tokenizer {len(tokenizer)} tokens, output {out}",
          file=sys.stderr, flush=True)
    loader = packed_loader(sources, tokenizer, cfg.data, cfg.train)
    hooks = {}
    if not cfg.data.keep_tokens_per_batch:
        def keep_batch(ph):
            loader.set_phase(ph.mixture, ph.seq_len or cfg.data.seq_len)
        hooks["phase_hook"] = keep_batch
    result = run_stage("pretrain", cfg, model, tokenizer, loader, pretrain_loss, out, base_seq_len=cfg.data.seq_len,
                       **hooks)
    if result.final_dir is not None:
        print(f"[pretrain] done: final model in {result.final_dir} (loss {result.last_loss:.4f})",
              file=sys.stderr, flush=True)
    return result


def main(argv: list[str]) -> int:
    args = stage_parser("pretrain").parse_args(argv)
    cfg = load_stage_config(PretrainConfig, args, "pretrain")
    run(cfg, args.config)
    return 0


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
