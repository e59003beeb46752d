"""The shared training step and loop skeleton of the pretrain / SFT / distill stages.

    trainer = Trainer(model, optimizer, schedule, cfg, device)      # one optimizer step at a time
    result = trainer.step(micro_batches, loss_fn)                    # StepResult(loss, grad_norm, skipped, ...)
    run_loop(LoopSpec(...))                                          # setup/resume -> loop -> save

What a stage builds before the loop (config, seed, data, tokenizer, model, run directory, optimizer and
schedule) is `rl.train.stage`.

Step: schedule LR -> for each micro-batch: autocast forward, `loss_sum / tokens_in_step` backward (so
gradient accumulation equals one big batch) -> unscale (fp16) -> clip -> optimizer step. A NaN/inf
loss or gradient skips the step (logged as `skipped`); after `max_bad_steps` consecutive bad steps
the run stops with a `TrainingDiverged` error naming the step and the likely cause. With fp16 and a
GradScaler, inf gradients are the scaler's business (it lowers the scale and skips), not a bad step.

Precision: "auto" = bf16 autocast on CUDA, fp32 on CPU; "fp16" uses a GradScaler (CUDA only);
"bf16" / "fp32" as named. Resume restores model, optimizer, scaler, RNG and data position; the LR
schedule is a pure function of the step, so a CPU run interrupted and resumed logs the same losses as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.checkpoint import CONFIG_NAME, check_tensors, config_json, drop_tied, restore_tied
from model.errors import BitMambaError, ConfigError
from rl.train.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state, tokenizer_files
from rl.train.metrics import MetricsWriter, format_metrics
from rl.train.optim import HybridOptimizer
from rl.train.schedule import Phase, Schedule


class TrainingDiverged(BitMambaError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


@dataclass
class TrainConfig:
    max_steps: int = 100                  # optimizer steps of this stage
    batch_size: int = 8                   # sequences per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer step
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"                  # auto: cuda if available, else cpu
    compile: bool = False                 # torch.compile the model
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 0                   # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 3
    max_bad_steps: int = 5                # consecutive NaN/inf steps before stopping
    resume: bool = True                   # continue from output_dir/checkpoints when present
    overwrite: bool = False               # delete the run in output_dir first and start over
    stop_after: int | None = None         # stop this invocation after N steps (time-sliced jobs); resume continues
    wandb: bool = False
    wandb_project: str = "bitmamba-rl"
    progress: bool = True                 # tqdm bar (else one console line per log step)

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum: must be >= 1, got {self.grad_accum}")
        for k in ("max_steps", "batch_size", "log_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k}: must be >= 1, got {getattr(self, k)}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every: must be >= 0, got {self.save_every}")
        dev = self.resolved_device()
        if dev.type == "cpu" and self.precision == "fp16":
            raise ConfigError("train.precision: fp16 needs a CUDA device (train.device resolves to cpu); "
                              "use fp32 or bf16 on CPU")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {self.device!r} asked for, but CUDA is not available")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"train.device: not a device: {self.device!r}") from None

    def autocast_dtype(self) -> torch.dtype | None:
        """None: no autocast (fp32)."""
        dev = self.resolved_device()
        p = self.precision
        if p == "auto":
            p = "bf16" if dev.type == "cuda" else "fp32"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]


@dataclass
class LossOut:
    loss_sum: Tensor                      # scalar fp32: summed token loss of the micro-batch
    n_tokens: Tensor | int                # tokens in loss_sum (for logging)
    metrics: dict[str, float] = field(default_factory=dict)   # extra per-step numbers (averaged over micro-batches)


@dataclass
class StepResult:
    step: int                             # 1-based: optimizer steps completed after this one
    loss: float                           # mean token loss over the step's micro-batches (nan if bad)
    grad_norm: float
    lr: float
    n_tokens: int                         # tokens with loss
    input_tokens: int                     # tokens fed to the model
    skipped: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def _count(batch: Any) -> int:
    return int(batch.n_tokens)


class Trainer:
    """One optimizer step over a list of micro-batches; owns autocast, scaler, clipping and NaN skips."""

    def __init__(self, model: nn.Module, optimizer: HybridOptimizer, schedule: Schedule, cfg: TrainConfig):
        self.model, self.optimizer, self.schedule, self.cfg = model, optimizer, schedule, cfg
        self.device = cfg.resolved_device()
        self.amp_dtype = cfg.autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = cfg.gradient_checkpointing
        # dynamic=False: one static graph per context length (phases change it rarely); dynamic-shape
        # tracing of the chunked SSD scan is far slower to compile
        self.forward_model = torch.compile(model, dynamic=False) if cfg.compile else model
        self.bad_in_a_row = 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, step: int, micro_batches: list[Any], loss_fn: Callable[[nn.Module, Any], LossOut],
             grad_clip: float = 1.0, count_fn: Callable[[Any], int] = _count) -> StepResult:
        """Optimizer step number `step` (0-based). Raises TrainingDiverged after too many bad steps."""
        self.model.train()
        self.optimizer.set_lr_mult(self.schedule.lr_mult(step))
        self.optimizer.zero_grad(set_to_none=True)
        denom = max(sum(count_fn(b) for b in micro_batches), 1)
        loss_total = 0.0
        n_tok = 0
        in_tok = 0
        extra: dict[str, float] = {}
        reason = ""
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.autocast():
                out = loss_fn(self.forward_model, mb)
            loss = out.loss_sum.float() / denom
            if not torch.isfinite(loss):
                reason = f"loss is {loss.item()}"
                break
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_total += loss.item()
            n_tok += int(out.n_tokens)
            in_tok += int(mb.input_ids.numel())
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(micro_batches)
        grad_norm = float("nan")
        params = [p for p in self.optimizer.parameters() if p.grad is not None]
        if not reason:
            if self.scaler is not None:
                for o in self.optimizer.optimizers.values():
                    self.scaler.unscale_(o)
            max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            if not math.isfinite(grad_norm) and self.scaler is None:
                reason = f"gradient norm is {grad_norm}"
        lr = self.optimizer.lr
        if reason:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"stopping at step {step + 1}: {self.bad_in_a_row} consecutive steps skipped ({reason}). "
                    f"Likely cause: learning rate too high for this model/batch (lr {lr:.3g}), "
                    f"{'fp16 overflow (try bf16), ' if self.amp_dtype == torch.float16 else ''}"
                    f"or bad data in the batches just before this step")
            return StepResult(step + 1, float("nan"), grad_norm, lr, n_tok, in_tok, True, reason, extra)
        if self.scaler is not None:
            for o in self.optimizer.optimizers.values():
                self.scaler.step(o)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.bad_in_a_row = 0
        return StepResult(step + 1, loss_total * denom / max(n_tok, 1) if n_tok else loss_total, grad_norm, lr,
                          n_tok, in_tok, False, "", extra)


# ----------------------------------------------------------------------------- model <-> checkpoint


def model_config_file(model: nn.Module) -> bytes:
    """config.json of a BitMambaLM, so a checkpoint directory is also a `from_pretrained` directory."""
    return config_json(model.config).encode()


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_embeddings", False))


def model_state_for_save(model: nn.Module) -> dict[str, Tensor]:
    return drop_tied(model.state_dict(), _tied(model))


def load_model_state(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    tensors = restore_tied(tensors, _tied(model))
    check_tensors({k: v.shape for k, v in model.state_dict().items()}, tensors, Path("checkpoint"))
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)


def mean_zero_ratio(model: nn.Module) -> float | None:
    zr = model.zero_ratios() if hasattr(model, "zero_ratios") else {}
    return sum(zr.values()) / len(zr) if zr else None


# ----------------------------------------------------------------------------- loop


@dataclass
class LoopSpec:
    """Everything a stage hands to `run_loop`.

    loader: object with next_batch(), state_dict(), load_state_dict(); set_phase(mixture, seq_len) is
    called on phase changes when `phase_hook` is None. loss_fn(model, batch) -> LossOut.
    """

    stage: str
    model: nn.Module
    optimizer: HybridOptimizer
    schedule: Schedule
    loader: Any
    loss_fn: Callable[[nn.Module, Any], LossOut]
    train: TrainConfig
    output_dir: Path
    run_config: dict                       # the resolved stage config (logged, stored in checkpoints)
    grad_clip: float = 1.0
    tokenizer: Any = None                  # saved beside the final model
    phase_hook: Callable[[Phase], None] | None = None
    log_hook: Callable[[int, dict], None] | None = None     # extra metrics / guards at log steps
    count_fn: Callable[[Any], int] = _count


@dataclass
class LoopResult:
    final_dir: Path | None                # output_dir/final (save_pretrained format), None if stopped early
    step: int
    last_loss: float
    history: list[dict]


def _phase_batch_size(base_bs: int, base_len: int, seq_len: int) -> int:
    return max(1, base_bs * base_len // seq_len) if base_len and seq_len else base_bs


def _resume(spec: LoopSpec, ckpt: CheckpointManager, trainer: Trainer) -> int:
    """The step to start at: the newest checkpoint's (model, optimizer, data position, scaler and RNG
    restored) when resuming, else 0 with the seed set. Checkpoints without resume are refused."""
    cfg = spec.train
    if not cfg.resume and ckpt.checkpoints(verify=False):
        raise BitMambaError(f"{ckpt.root} already holds checkpoints (newest: step {ckpt.checkpoints(verify=False)[0][0]}) "
                            f"and train.resume is false: --overwrite to delete that run and start over, "
                            f"or use another --output-dir")
    latest = ckpt.latest() if cfg.resume else None
    if latest is None:
        torch.manual_seed(cfg.seed)
        return 0
    tensors, opt_state, extra = ckpt.load(latest, map_location="cpu")
    load_model_state(spec.model, tensors)
    if hasattr(spec.optimizer, "sync_from_model"):
        spec.optimizer.sync_from_model()
    spec.optimizer.load_state_dict(opt_state)
    spec.loader.load_state_dict(extra["data"])
    if trainer.scaler is not None and extra.get("scaler"):
        trainer.scaler.load_state_dict(extra["scaler"])
    restore_rng_state(extra["rng"])
    start = int(extra["step"])
    print(f"[{spec.stage}] resuming from {latest} (step {start})", file=sys.stderr, flush=True)
    return start


def _step_record(res, ph, model, tokens_per_s: float) -> dict:
    """The metrics record of a logged step."""
    rec = {"loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, "tokens_per_s": tokens_per_s,
           "tokens": res.n_tokens, "phase": ph.name, **res.metrics}
    if ph.seq_len:
        rec["seq_len"] = ph.seq_len
    zr = mean_zero_ratio(model)
    if zr is not None:
        rec["zero_ratio"] = zr
    if res.skipped:
        rec["skipped"] = True
        rec["skip_reason"] = res.reason
    return rec


def run_loop(spec: LoopSpec) -> LoopResult:
    """Resume if possible, train to max_steps (or stop_after), checkpoint, save the final model."""
    cfg, model, out = spec.train, spec.model, Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.resolved_device()
    model.to(device)
    ckpt = CheckpointManager(out / "checkpoints", keep=cfg.keep_checkpoints)
    trainer = Trainer(model, spec.optimizer, spec.schedule, cfg)
    start = _resume(spec, ckpt, trainer)
    metrics = MetricsWriter(out, wandb=cfg.wandb, project=cfg.wandb_project,
                            run_name=f"{spec.stage}-{out.name}", config=spec.run_config,
                            console=not cfg.progress, resume_step=start)
    print(spec.schedule.describe(), file=sys.stderr, flush=True)

    tok_files = tokenizer_files(spec.tokenizer) if spec.tokenizer is not None else {}   # every checkpoint: a model dir

    def save(step: int) -> Path:
        extra = {"step": step, "stage": spec.stage, "rng": capture_rng_state(), "data": spec.loader.state_dict(),
                 "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                 "config": spec.run_config}
        return ckpt.save(step, model_state_for_save(model), spec.optimizer.state_dict(), extra,
                         files={CONFIG_NAME: model_config_file(model), **tok_files})

    bar = tqdm(total=cfg.max_steps, initial=start, desc=spec.stage, disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True, leave=True)
    history: list[dict] = []
    phase = None
    base_len = spec.schedule.phases[0].seq_len
    end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, start + cfg.stop_after)
    window_tok, window_t0 = 0, time.perf_counter()
    last_loss = float("nan")
    step = start
    try:
        for step in range(start, end):
            ph = spec.schedule.phase_at(step)
            if phase is None or ph.index != phase.index:
                phase = ph
                if spec.phase_hook is not None:
                    spec.phase_hook(ph)
                elif hasattr(spec.loader, "set_phase"):
                    spec.loader.set_phase(ph.mixture, ph.seq_len or base_len)
                    if hasattr(spec.loader, "batch_size"):
                        spec.loader.batch_size = _phase_batch_size(cfg.batch_size, base_len, ph.seq_len)
            micro = [spec.loader.next_batch() for _ in range(cfg.grad_accum)]
            res = trainer.step(step, micro, spec.loss_fn, spec.grad_clip, spec.count_fn)
            window_tok += res.input_tokens
            if not res.skipped:
                last_loss = res.loss
            done = step + 1
            if done % cfg.log_every == 0 or done == end or done == start + 1 or res.skipped:
                rec = _step_record(res, ph, model, window_tok / max(time.perf_counter() - window_t0, 1e-9))
                if res.skipped:
                    print(f"[{spec.stage}] step {done} skipped: {res.reason}", file=sys.stderr, flush=True)
                if spec.log_hook is not None:
                    spec.log_hook(done, rec)
                history.append(metrics.log(done, **rec))
                bar.set_postfix_str(format_metrics(rec, ["loss", "lr", "tokens_per_s", "zero_ratio"]), refresh=False)
                window_tok, window_t0 = 0, time.perf_counter()
            bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
                save(done)
        step = end
        final_dir = None
        if end == cfg.max_steps:
            if start < end or ckpt.latest() is None:
                save(end)
            final_dir = out / "final"
            model.save_pretrained(final_dir) if hasattr(model, "save_pretrained") else None
            if spec.tokenizer is not None and hasattr(spec.tokenizer, "save_pretrained"):
                spec.tokenizer.save_pretrained(str(final_dir))
        elif start < end:
            save(end)  # stop_after: checkpoint so the next invocation continues here
    finally:
        bar.close()
        metrics.close()
    return LoopResult(final_dir, step, last_loss, history)
