"""Ternary distillation from a full-precision Mamba-2 (the Ternary Mamba recipe).

    bitmamba distill --config configs/distill_tiny.yaml [--output-dir DIR] [key=value ...]

Teacher: a frozen full-precision BitMambaLM: one of our checkpoints (`teacher.path`, typically
`quant.ternary: false`), or a Hugging Face Mamba2ForCausalLM directory converted on the fly
(`teacher.hf_path`, imported without quantization). Student: the teacher's architecture with ternary
BitLinears and grouped weight scales (`student.*`), initialized from the teacher's weights (the latent
weights are the teacher's fp weights). Loss per token (packed documents, like pretraining):

    kl_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))  +  ce_weight * CE(z_s, next token)

computed over chunks of `chunk` tokens (the full-vocabulary logits of one chunk at a time, each
chunk recomputed in backward), summed and divided by the tokens of the step.

Zero-ratio guard: at each log step the share of zero ternary codes of every layer is checked; a layer
above `zero_guard.threshold` gives a warning naming it, and with `zero_guard.stop: true` the run stops
(`ZeroRatioExceeded`) so the weights do not collapse unnoticed.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import QuantConfig
from model.convert import import_hf
from model.errors import BitMambaError, ConfigError
from model.lm import BitMambaLM
from rl.args import stage_parser
from rl.train.data import PackedBatch
from rl.train.loop import LoopResult, LossOut, TrainConfig
from rl.train.optim import OptimConfig
from rl.train.pretrain import PretrainDataConfig
from rl.train.schedule import ScheduleConfig
from rl.train.stage import (
    TokenizerSpec,
    build_tokenizer_from_spec,
    load_sources,
    load_stage_config,
    open_stage,
    packed_loader,
    resolve_data_path,
    run_stage,
    seed_everything,
)


class ZeroRatioExceeded(BitMambaError):
    """A ternary layer's share of zero weights passed the configured threshold."""


@dataclass
class TeacherSpec:
    path: str | None = None               # our checkpoint directory (save_pretrained format)
    hf_path: str | None = None            # HF Mamba2ForCausalLM directory (converted, full precision)

    def __post_init__(self):
        if (self.path is None) == (self.hf_path is None):
            raise ConfigError("teacher: give exactly one of teacher.path / teacher.hf_path")


@dataclass
class StudentSpec:
    weight_scale: Literal["tensor", "group"] = "group"
    group_size: int = 128
    activation: Literal["int8", "none"] = "int8"
    ternary_head: bool | None = None      # None: as in the teacher's config
    init_from_teacher: bool = True        # False: fresh init (ablation)


@dataclass
class DistillLossConfig:
    kl_weight: float = 1.0
    ce_weight: float = 0.0                # optional next-token CE on the data
    temperature: float = 1.0
    chunk: int = 1024                     # tokens per logits chunk

    def __post_init__(self):
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ConfigError("loss: kl_weight and ce_weight must be >= 0 and not both 0")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature: must be > 0, got {self.temperature}")
        if self.chunk < 1:
            raise ConfigError(f"loss.chunk: must be >= 1, got {self.chunk}")


@dataclass
class ZeroGuardConfig:
    threshold: float = 0.6                # share of zero codes in one layer
    stop: bool = False                    # stop the run (after the warning) when exceeded

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"zero_guard.threshold: must be in (0, 1], got {self.threshold}")


@dataclass
class DistillConfig:
    teacher: TeacherSpec
    data: PretrainDataConfig
    output_dir: str = "runs/distill"
    student: StudentSpec = field(default_factory=StudentSpec)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    zero_guard: ZeroGuardConfig = field(default_factory=ZeroGuardConfig)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- models


TEACHER_RECIPE = ("bitmamba pretrain --config configs/pretrain_tiny_fp.yaml --output-dir runs/pretrain_tiny_fp "
                  "(writes runs/pretrain_tiny_fp/final, the teacher of configs/distill_tiny.yaml)")


def load_teacher(spec: TeacherSpec) -> nn.Module:
    if spec.hf_path:
        teacher = import_hf(spec.hf_path, no_quant=True)
    else:
        if not Path(spec.path).is_dir():
            raise ConfigError(f"teacher.path {spec.path}: no such model directory. Train a full-precision teacher "
                              f"first, e.g. {TEACHER_RECIPE}, or set teacher.path to a model directory "
                              f"(a stage's final/) or teacher.hf_path to a Hugging Face Mamba-2 directory")
        teacher = BitMambaLM.from_pretrained(spec.path)
    if teacher.zero_ratios():
        warnings.warn("the teacher has ternary layers (quant.ternary true); distillation usually starts from a "
                      "full-precision teacher", stacklevel=2)
    teacher.eval().requires_grad_(False)
    return teacher


def make_student(teacher: nn.Module, spec: StudentSpec, config_path: str | None = None) -> nn.Module:
    """Teacher architecture, ternary quantization with the student's scales; teacher weights copied."""
    tc = teacher.config
    if spec.weight_scale == "group":
        ins = {m.in_features for _, m in teacher.bitlinears()}
        bad = sorted(i for i in ins if i % spec.group_size)
        if bad:
            raise ConfigError(f"{config_path or 'config'}: student.group_size {spec.group_size} does not divide "
                              f"the input width {bad[0]} of a projection (widths: {sorted(ins)})")
    quant = QuantConfig(ternary=True, weight_scale=spec.weight_scale, group_size=spec.group_size,
                        activation=spec.activation)
    changes = {"quant": quant}
    if spec.ternary_head is not None:
        changes["ternary_head"] = spec.ternary_head
    student = BitMambaLM(tc.replace(**changes))
    if spec.init_from_teacher:
        with torch.no_grad():
            student.load_state_dict(teacher.state_dict(), strict=True)
    return student.train()


# ----------------------------------------------------------------------------- loss


def _kl_ce_chunk(hs: Tensor, ht: Tensor, w: Tensor | None, labels: Tensor, student_head: nn.Module,
                 teacher_head: nn.Module, temp: float, kl_w: float, ce_w: float) -> tuple[Tensor, Tensor, Tensor]:
    """Summed (weighted loss, KL, CE) over one chunk of tokens. hs/ht [N, d], labels [N]."""
    zs = student_head.forward_with_weight(hs, w).float()                 # [N, V]
    with torch.no_grad():
        zt = teacher_head(ht).float()                                    # [N, V]
        pt_log = F.log_softmax(zt / temp, dim=-1)
    ps_log = F.log_softmax(zs / temp, dim=-1)
    kl = (pt_log.exp() * (pt_log - ps_log)).sum() * (temp * temp)        # scalar
    valid = labels != -100
    ce = (F.cross_entropy(zs, labels.clamp(min=0), reduction="none") * valid).sum() if ce_w else zs.new_zeros(())
    return kl_w * kl + ce_w * ce, kl.detach(), ce.detach()


def distill_loss_fn(teacher: nn.Module, cfg: DistillLossConfig):
    def loss_fn(student: nn.Module, batch: PackedBatch) -> LossOut:
        h_s = student.hidden_states(batch.input_ids, seq_idx=batch.seq_idx)          # [B, T, d]
        with torch.no_grad():
            h_t = teacher.hidden_states(batch.input_ids, seq_idx=batch.seq_idx)      # [B, T, d]
        head = student.lm_head
        w = head.effective_weight() if (head.ternary and torch.is_grad_enabled()) else None
        hs, ht = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
        lab = batch.labels.reshape(-1)
        total = torch.zeros((), device=hs.device)
        kl_sum = torch.zeros((), device=hs.device)
        ce_sum = torch.zeros((), device=hs.device)
        for s in range(0, hs.shape[0], cfg.chunk):
            args = (hs[s:s + cfg.chunk], ht[s:s + cfg.chunk], w, lab[s:s + cfg.chunk], head, teacher.lm_head,
                    cfg.temperature, cfg.kl_weight, cfg.ce_weight)
            part, kl, ce = (checkpoint(_kl_ce_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                            else _kl_ce_chunk(*args))
            total, kl_sum, ce_sum = total + part, kl_sum + kl, ce_sum + ce
        n = hs.shape[0]
        metrics = {"kl": float(kl_sum) / n}
        if cfg.ce_weight:
            metrics["ce"] = float(ce_sum) / max(int((lab != -100).sum()), 1)
        return LossOut(total, n, metrics)
    return loss_fn


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, batches: list[PackedBatch], temperature: float = 1.0) -> float:
    """Mean per-token KL(teacher || student) over `batches` (evaluation, student in eval mode)."""
    was = student.training
    student.eval()
    fn = distill_loss_fn(teacher, DistillLossConfig(kl_weight=1.0, ce_weight=0.0, temperature=temperature))
    dev = next(student.parameters()).device
    tot = n = 0.0
    for b in batches:
        out = fn(student, b.to(dev))
        tot += out.metrics["kl"] * out.n_tokens
        n += out.n_tokens
    student.train(was)
    return tot / max(n, 1)


def zero_guard_hook(student: nn.Module, cfg: ZeroGuardConfig):
    def hook(step: int, rec: dict) -> None:
        zr = student.zero_ratios()
        if not zr:
            return
        name, worst = max(zr.items(), key=lambda kv: kv[1])
        rec["zero_ratio_max"] = worst
        if worst > cfg.threshold:
            msg = (f"zero-ratio guard: layer {name} has {worst:.1%} zero weights at step {step} "
                   f"(threshold {cfg.threshold:.0%}); the ternary weights may be collapsing "
                   f"(lower the LR or weight decay)")
            warnings.warn(msg, stacklevel=2)
            print(f"[distill] warning: {msg}", file=sys.stderr, flush=True)
            rec["zero_guard"] = name
            if cfg.stop:
                raise ZeroRatioExceeded(msg + "; stopping (zero_guard.stop is true)")
    return hook


# ----------------------------------------------------------------------------- stage


def run(cfg: DistillConfig, config_path: str | None = None) -> LoopResult:
    seed_everything(cfg.train.seed)
    for attr in ("path", "hf_path"):
        if getattr(cfg.teacher, attr):
            setattr(cfg.teacher, attr, resolve_data_path(getattr(cfg.teacher, attr), config_path))
    teacher = load_teacher(cfg.teacher)
    init_dir = cfg.teacher.path or cfg.teacher.hf_path
    tokenizer = build_tokenizer_from_spec(cfg.tokenizer, init_dir, None)
    student = make_student(teacher, cfg.student, config_path)
    sources = load_sources(cfg.data.sources, config_path)
    out = open_stage(cfg, student, tokenizer, config_path)      # only once teacher, tokenizer and data are checked
    device = cfg.train.resolved_device()
    teacher.to(device)
    print(f"[distill] teacher {init_dir} ({sum(p.numel() for p in teacher.parameters()):,} params, frozen) -> "
          f"ternary student ({cfg.student.weight_scale} scales"
          f"{', group ' + str(cfg.student.group_size) if cfg.student.weight_scale == 'group' else ''}), output {out}",
          file=sys.stderr, flush=True)
    loader = packed_loader(sources, tokenizer, cfg.data, cfg.train)
    result = run_stage("distill", cfg, student, tokenizer, loader, distill_loss_fn(teacher, cfg.loss), out,
                       base_seq_len=cfg.data.seq_len, log_hook=zero_guard_hook(student, cfg.zero_guard),
                       count_fn=lambda b: int(b.input_ids.numel()))
    if result.final_dir is not None:
        print(f"[distill] done: ternary student in {result.final_dir}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str]) -> int:
    args = stage_parser("distill").parse_args(argv)
    cfg = load_stage_config(DistillConfig, args, "distill")
    run(cfg, args.config)
    return 0


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
