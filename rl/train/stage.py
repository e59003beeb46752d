"""The setup every supervised stage (pretrain, SFT, distill) shares, from config to `run_loop`.

    cfg = load_stage_config(PretrainConfig, args, "pretrain")        # typed config + CLI overrides
    seed_everything(cfg.train.seed)
    sources = load_sources(cfg.data.sources, config_path)            # paths relative to the config file
    tokenizer = build_tokenizer_from_spec(cfg.tokenizer, cfg.model.init_from, texts)
    model = build_model_from_spec(cfg.model, config_path)            # preset, or warm start from init_from
    out = open_stage(cfg, model, tokenizer, config_path)             # vocab check, run dir check, resolved config
    result = run_stage("pretrain", cfg, model, tokenizer, loader, loss_fn, out)   # optimizer, schedule, loop

A stage's config has `output_dir`, `optim`, `schedule` and `train` sections (plus its own); the run
directory is written only once the data, tokenizer and model are checked. Device placement, resume and
the metrics writer are `rl.train.loop.run_loop`'s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from model.config import BitMambaConfig
from model.errors import ConfigError
from model.lm import BitMambaLM
from model.typed import load_config, to_dict
from rl.train.data import DataSource, PackedLoader, load_records
from rl.train.loop import LoopResult, LossOut, LoopSpec, TrainConfig, run_loop
from rl.train.optim import OptimConfig, build_optimizer
from rl.train.run_dir import STAGE_ENTRIES, check_same_run, clear_run
from rl.train.schedule import Schedule
from rollout.tokenizer import build_tiny_tokenizer, has_tokenizer, load_tokenizer


# ----------------------------------------------------------------------------- seed, config, model, tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class ModelSpec:
    """Which model a stage trains: a preset (+ field overrides), or a checkpoint to start from."""

    preset: str | None = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)   # BitMambaConfig fields, e.g. {vocab_size: 384}
    init_from: str | None = None          # model directory (save_pretrained format); wins over preset

    def __post_init__(self):
        if self.preset is None and self.init_from is None:
            raise ConfigError("model: give model.preset or model.init_from")


@dataclass
class TokenizerSpec:
    """A HF tokenizer (local directory or hub name), or the tiny byte-level BPE built offline."""

    path: str | None = None               # AutoTokenizer directory / hub name
    tiny_vocab_size: int = 384            # used when path is None (and no tokenizer beside init_from)
    tiny_train_on_data: bool = True       # train the tiny BPE on the first records of the data
    tiny_train_records: int = 2000


def build_model_from_spec(spec: ModelSpec, config_path: str | None = None) -> nn.Module:
    where = f"{config_path}: " if config_path else ""
    if spec.init_from:
        model = BitMambaLM.from_pretrained(spec.init_from)
        have = model.config.to_dict()
        for k, v in spec.overrides.items():   # the checkpoint's config.json fixes the architecture
            if k not in have or have[k] != v:
                raise ConfigError(f"{where}model.overrides.{k}: {v!r} differs from {have.get(k)!r} in "
                                  f"{spec.init_from}/config.json; with model.init_from, overrides may only "
                                  f"repeat the checkpoint's values (drop model.overrides.{k})")
        return model.train()
    try:
        cfg = BitMambaConfig.preset(spec.preset, **spec.overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}model: {e}") from None
    return BitMambaLM(cfg)


def build_tokenizer_from_spec(spec: TokenizerSpec, init_from: str | None = None, texts: list[str] | None = None):
    if spec.path:
        return load_tokenizer(spec.path)
    if init_from and has_tokenizer(init_from):
        return load_tokenizer(init_from)
    corpus = "\n".join(texts) if (texts and spec.tiny_train_on_data) else None
    return build_tiny_tokenizer(spec.tiny_vocab_size, corpus=corpus)


def check_vocab(model: nn.Module, tokenizer: Any, config_path: str | None) -> None:
    n = len(tokenizer)
    v = model.config.vocab_size
    if n > v:
        raise ConfigError(f"{config_path or 'config'}: model vocab_size {v} is smaller than the tokenizer's "
                          f"{n} tokens (set model.overrides.vocab_size >= {n} or use another tokenizer)")


def resolve_data_path(path: str, config_path: str | None) -> str:
    """A data path as given if it exists (or is a hub name / glob), else relative to the config file."""
    p = Path(path).expanduser()
    if p.exists() or config_path is None or p.is_absolute():
        return path
    alt = Path(config_path).resolve().parent / path
    return str(alt) if alt.exists() else path


def setup_output(output_dir: str | Path, run_config: dict, train: TrainConfig | None = None,
                 extra_entries: tuple[str, ...] = ()) -> Path:
    """Create the output directory and write `config.resolved.yaml`, once the inputs are checked.

    A directory holding a run is continued only when it is the same run (its stored config differs at
    most in length and display keys, `rl.train.run_dir.RESUMABLE_CHANGES`); with `train.overwrite` that run
    (`STAGE_ENTRIES` + `extra_entries`, e.g. SFT's stage directories) is deleted first."""
    out = Path(output_dir)
    if train is not None and train.overwrite:
        clear_run(out, STAGE_ENTRIES + tuple(extra_entries))
    elif train is not None and train.resume:
        check_same_run(out, run_config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False), encoding="utf-8")
    return out


def load_stage_config(cls, args, stage: str):
    """Typed config from --config + overrides; --output-dir / --no-wandb / --no-resume applied."""
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.no_wandb:
        overrides.append("train.wandb=false")
    if args.no_resume:
        overrides.append("train.resume=false")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
    return load_config(cls, args.config, overrides)


# ----------------------------------------------------------------------------- data, run directory, loop


def load_sources(sources: list[DataSource], config_path: str | None) -> list[tuple[DataSource, Any]]:
    """(source, dataset) of each source, its path resolved against the config file (`resolve_data_path`)."""
    out = []
    for s in sources:
        s.path = resolve_data_path(s.path, config_path)
        out.append((s, load_records(s)))
    return out


def packed_loader(sources: list[tuple[DataSource, Any]], tokenizer: Any, data: Any, train: TrainConfig) -> PackedLoader:
    """The packed-document loader of a stage whose `data` section has `seq_len` and `shuffle`."""
    return PackedLoader(sources, tokenizer, seq_len=data.seq_len, batch_size=train.batch_size, seed=train.seed,
                        shuffle=data.shuffle)


def open_stage(cfg: Any, model: nn.Module, tokenizer: Any, config_path: str | None,
               extra_entries: tuple[str, ...] = ()) -> Path:
    """Check the tokenizer fits the model, then create (or continue, or with train.overwrite clear) the
    stage's output directory (`setup_output`); returns it."""
    check_vocab(model, tokenizer, config_path)
    return setup_output(cfg.output_dir, to_dict(cfg), cfg.train, extra_entries)


def run_stage(stage: str, cfg: Any, model: nn.Module, tokenizer: Any, loader: Any,
              loss_fn: Callable[[nn.Module, Any], LossOut], output_dir: Path, *, train: TrainConfig | None = None,
              optim: OptimConfig | None = None, base_seq_len: int = 0, run_config: dict | None = None,
              **hooks: Any) -> LoopResult:
    """Optimizer (`optim`, default cfg.optim) and schedule (cfg.schedule over train.max_steps; `train`
    default cfg.train) for `model`, then `run_loop`. run_config: what checkpoints and metrics record
    (default the whole stage config). hooks: LoopSpec's phase_hook / log_hook / count_fn."""
    train = train if train is not None else cfg.train
    optim = optim if optim is not None else cfg.optim
    spec = LoopSpec(stage=stage, model=model, optimizer=build_optimizer(model, optim),
                    schedule=Schedule(cfg.schedule, train.max_steps, base_seq_len=base_seq_len), loader=loader,
                    loss_fn=loss_fn, train=train, output_dir=output_dir,
                    run_config=run_config if run_config is not None else to_dict(cfg),
                    grad_clip=optim.grad_clip, tokenizer=tokenizer, **hooks)
    return run_loop(spec)
